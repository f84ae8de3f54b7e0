"""Splitting the rows of many targets into balanced read tasks (pure, no Ray needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from breadasync._models import TargetRef


@dataclass(frozen=True, slots=True)
class TargetRows:
    """A planned target: its rollout's ``lines`` when planned, whether it was complete, and
    its ``job_id`` (``None`` when the service gives none)."""

    target: TargetRef
    lines: int
    complete: bool
    job_id: int | str | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows ``start..stop-1`` of one target, read by one task (of the job planned)."""

    target: TargetRef
    start: int
    stop: int
    lines: int
    complete: bool
    job_id: int | str | None = None

    @property
    def rows(self) -> int:
        """How many rows it holds."""
        return self.stop - self.start


def split(
    targets: Sequence[TargetRows], parallelism: int, page_size: int, min_pages: int = 1
) -> list[list[Segment]]:
    """Cut all targets' rows, in order, into at most ``parallelism`` tasks of nearly equal
    rows, each of ``min_pages`` pages or more where there are enough (a task costs a
    client and a connection, so tiny tasks are mostly overhead).

    Task ``k`` ends at the page boundary nearest to ``(k+1)/n`` of all rows, so every task
    is within one page of the mean whether the rows come from thousands of small targets or
    one huge one; a cut inside a target falls on a page boundary, so no page is split and a
    task asks for exactly the pages a local export would. There are never more tasks than
    pages (over ``min_pages``). Empty targets give no segment.
    """
    total = sum(t.lines for t in targets)
    pages = sum(-(-t.lines // page_size) for t in targets)
    if total == 0:
        return []
    n = max(1, min(parallelism, pages // max(1, min_pages)))
    tasks: list[list[Segment]] = [[] for _ in range(n)]
    k = 0
    base = 0  # rows of the targets before this one
    for t in targets:
        pos = 0
        while pos < t.lines:
            end = (k + 1) * total / n - base  # where task k should end, within this target
            if k == n - 1 or end >= t.lines:
                stop = t.lines
            else:
                stop = min(t.lines, page_size * round(end / page_size))
            if stop <= pos:
                k += 1  # task k is full up to a page boundary before this one
                continue
            tasks[k].append(Segment(t.target, pos, stop, t.lines, t.complete, t.job_id))
            pos = stop
            if stop >= end and k < n - 1:
                k += 1
        base += t.lines
    return [task for task in tasks if task]
