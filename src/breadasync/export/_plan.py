"""The export plan: which rows go to which part file, and which pages fetch them.

Pure values, so a worker elsewhere (a distributed reader) can be handed a range and fetch
exactly what a local export would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from breadasync._models import TargetRef


@dataclass(frozen=True, slots=True)
class Part:
    """Rows ``start..stop-1`` of a job, written to one Parquet file."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """The part's file name."""
        return f"part-{self.index:05d}.parquet"

    @property
    def rows(self) -> int:
        """How many rows it holds."""
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What an export of one target will write.

    Attributes:
        target: The target.
        lines: Rows the export holds (the job's ``lines`` when the export began).
        status: The job's status then (``complete``, or what a partial export saw).
        rows_per_part: Rows per part file (the last may hold fewer).
        page_size: Rows asked per page.
    """

    target: TargetRef
    lines: int
    status: str
    rows_per_part: int
    page_size: int

    @property
    def parts(self) -> list[Part]:
        """The part files, in offset order."""
        return [
            Part(i, start, min(start + self.rows_per_part, self.lines))
            for i, start in enumerate(range(0, self.lines, self.rows_per_part))
        ]

    def pages(self, part: Part) -> Iterator[tuple[int, int]]:
        """``(offset, limit)`` of the pages that fetch a part (pages never cross parts)."""
        for offset in range(part.start, part.stop, self.page_size):
            yield offset, min(self.page_size, part.stop - offset)
