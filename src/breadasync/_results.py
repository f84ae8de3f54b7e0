"""Per-target results of many targets: the sequence they share (input order, failures), and
the fan-out's own records (:class:`RolloutResult`, :class:`RolloutResults`, summaries and
progress updates)."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, overload

from ._errors import BreadError
from ._models import JobStatus, TargetRef


class _Outcome(Protocol):
    @property
    def ok(self) -> bool: ...

    @property
    def error(self) -> BreadError | None: ...


R = TypeVar("R", bound=_Outcome)


class Results(Sequence[R]):
    """One result per input target, in input order."""

    def __init__(self, results: list[R]) -> None:
        self._results = results

    @overload
    def __getitem__(self, index: int) -> R: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[R]: ...
    def __getitem__(self, index: int | slice) -> R | Sequence[R]:
        return self._results[index]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[R]:
        return iter(self._results)

    def failures(self) -> list[R]:
        """The results that are not ``ok``."""
        return [r for r in self._results if not r.ok]

    def raise_for_failures(self) -> None:
        """Raise the first failure's error, if any target did not end ``ok``."""
        for result in self._results:
            if not result.ok and result.error is not None:
                raise result.error


class Outcome(enum.StrEnum):
    """How a target ended in a fan-out."""

    COMPLETE = "complete"
    """The job completed."""
    FAILED = "failed"
    """The job failed on the service (``error`` is a :class:`JobFailedError`)."""
    ERROR = "error"
    """A request failed: no such target, a missing prerequisite, retries exhausted..."""
    TIMEOUT = "timeout"
    """A deadline passed first (``error`` is a :class:`PollTimeoutError`)."""
    STARTED = "started"
    """Started (or already running) and not watched: ``wait=False``."""


@dataclass(frozen=True, slots=True)
class RolloutResult:
    """What happened to one target.

    Attributes:
        target: Which target.
        outcome: How it ended.
        status: Its last known job status (``None`` if none was read).
        error: Why it did not complete, for ``FAILED``, ``ERROR`` and ``TIMEOUT``.
        started, finished: When its first request left and its result was known
            (``anyio.current_time()`` seconds).
        polls: Status reads made for it (rollout and, with ``wait_for_stim``, stim).
        requests: Requests made for it, its start included (retries not counted).
    """

    target: TargetRef
    outcome: Outcome
    status: JobStatus | None
    error: BreadError | None
    started: float
    finished: float
    polls: int
    requests: int

    @property
    def ok(self) -> bool:
        """Whether the target got what was asked: complete, or started when not waiting."""
        return self.outcome in (Outcome.COMPLETE, Outcome.STARTED)

    @property
    def lines(self) -> int | None:
        """Lines of the job at the end, if known."""
        return self.status.lines if self.status is not None else None

    @property
    def elapsed(self) -> float:
        """Seconds from its first request to its result."""
        return self.finished - self.started


@dataclass(frozen=True, slots=True)
class FanoutSummary:
    """Counts of outcomes."""

    total: int
    complete: int
    failed: int
    errored: int
    timed_out: int
    started: int
    lines: int
    """Lines of the complete jobs, together."""

    def __str__(self) -> str:
        parts = [f"{self.complete} complete"]
        for count, label in (
            (self.failed, "failed"),
            (self.errored, "errored"),
            (self.timed_out, "timed out"),
            (self.started, "started"),
        ):
            if count:
                parts.append(f"{count} {label}")
        noun = "target" if self.total == 1 else "targets"
        return f"{self.total} {noun}: {', '.join(parts)} ({self.lines:,} lines)"


class RolloutResults(Results[RolloutResult]):
    """One :class:`RolloutResult` per input target, in input order."""

    def __repr__(self) -> str:
        return f"<RolloutResults {self.summary()}>"

    def summary(self) -> FanoutSummary:
        """How many completed, failed, errored, timed out, or were only started."""
        count = dict.fromkeys(Outcome, 0)
        lines = 0
        for result in self._results:
            count[result.outcome] += 1
            if result.outcome is Outcome.COMPLETE:
                lines += result.lines or 0
        return FanoutSummary(
            total=len(self._results),
            complete=count[Outcome.COMPLETE],
            failed=count[Outcome.FAILED],
            errored=count[Outcome.ERROR],
            timed_out=count[Outcome.TIMEOUT],
            started=count[Outcome.STARTED],
            lines=lines,
        )


@dataclass(frozen=True, slots=True)
class RolloutUpdate:
    """A progress report for ``on_progress``: a target's newest status, and its result once
    it has one."""

    target: TargetRef
    status: JobStatus | None
    result: RolloutResult | None
