"""Fan-out: start and watch rollouts across many targets with one scheduler.

One dispatcher keeps a heap of targets by the time their next request is due and hands due
ones to short tasks, at most ``concurrency`` at a time (and always under the client's own
limits). So 10,000 watched targets are 10,000 small records and one timer, not 10,000
sleeping tasks. A target's failure (an error answer, a failed job, its deadline) becomes its
result and never touches the others, unless the caller asked to fail fast.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._config import NOT_GIVEN, NotGiven, PollPolicy
from ._errors import (
    BadRequestError,
    BreadError,
    InvalidArgumentError,
    JobError,
    JobFailedError,
    PollTimeoutError,
)
from ._models import JobState, JobStatus
from ._polling import PollSchedule
from ._results import Results
from ._validation import check_int, check_name, check_seconds

if TYPE_CHECKING:
    from ._client import BreadClient


@dataclass(frozen=True, slots=True, order=True)
class TargetRef:
    """One target of one repo."""

    repo_name: str
    target_name: str

    def __str__(self) -> str:
        return f"{self.repo_name}/{self.target_name}"


TargetLike = str | tuple[str, str] | TargetRef
"""A target name (with ``repo_name=``), a ``(repo, target)`` pair, or a :class:`TargetRef`."""


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


ProgressCallback = Callable[[RolloutUpdate], Any]


def normalise_targets(targets: Iterable[TargetLike], repo_name: str | None) -> list[TargetRef]:
    """The targets as :class:`TargetRef`, checked; nothing is sent if one is invalid."""
    if isinstance(targets, str | TargetRef):
        raise InvalidArgumentError("targets must be an iterable of targets, not a single one")
    if repo_name is not None:
        check_name(repo_name, "repo_name")
    refs = []
    for item in targets:
        if isinstance(item, TargetRef):
            ref = item
        elif isinstance(item, str):
            if repo_name is None:
                raise InvalidArgumentError(
                    f"target {item!r} has no repo: pass repo_name=..., or (repo, target) pairs"
                )
            ref = TargetRef(repo_name, item)
        elif isinstance(item, tuple) and len(item) == 2:
            ref = TargetRef(*item)
        else:
            raise InvalidArgumentError(
                f"{item!r} is not a target: give a name, a (repo, target) pair or a TargetRef"
            )
        check_name(ref.repo_name, "repo_name")
        check_name(ref.target_name, "target_name")
        refs.append(ref)
    return refs


_Phase = Literal["start", "stim", "poll"]


class _Entry:
    __slots__ = (
        "deadline",
        "done",
        "phase",
        "polls",
        "ref",
        "requests",
        "schedule",
        "started",
        "status",
    )

    def __init__(self, ref: TargetRef, phase: _Phase, schedule: PollSchedule) -> None:
        self.ref = ref
        self.phase: _Phase = phase
        self.schedule = schedule
        self.status: JobStatus | None = None
        self.polls = 0
        self.requests = 0
        self.started = math.nan
        self.deadline = math.inf
        self.done = False


class Fanout:
    """The engine behind ``rollout_many``, ``wait_many`` and ``as_completed``."""

    def __init__(
        self,
        client: BreadClient,
        refs: list[TargetRef],
        *,
        start: bool,
        wait: bool,
        wait_for_stim: bool,
        concurrency: int | None,
        poll_policy: PollPolicy | NotGiven,
        target_timeout: float | None,
        total_timeout: float | None,
        fail_fast: bool,
        user_id: str | NotGiven | None,
        on_progress: ProgressCallback | None,
    ) -> None:
        self._target_timeout = check_seconds(target_timeout, "target_timeout")
        self._total_timeout = check_seconds(total_timeout, "total_timeout")
        limit = check_int(
            client.max_concurrency if concurrency is None else concurrency, "concurrency", 1
        )
        # Resolved once: an invalid user_id fails the call, not every target in turn.
        self._user_id = client._user(user_id)
        self._client = client
        self._wait = wait
        self._wait_for_stim = wait_for_stim
        self._policy = client.poll_policy if poll_policy is NOT_GIVEN else poll_policy
        self._fail_fast = fail_fast
        self._on_progress = on_progress
        self._slots = anyio.CapacityLimiter(limit)
        phase: _Phase = "start" if start else "poll"
        unique = dict.fromkeys(refs)
        self._entries = {ref: _Entry(ref, phase, PollSchedule(self._policy)) for ref in unique}
        self._heap: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._remaining = len(self._entries)
        self._fatal: BreadError | None = None
        self._scope: anyio.CancelScope | None = None
        self.on_result: Callable[[RolloutResult], Any] = lambda result: None

    async def run(self) -> None:
        """Drive every target to a result (each reported through ``on_result``)."""
        now = anyio.current_time()
        for entry in self._entries.values():
            heapq.heappush(self._heap, (now, next(self._seq), entry))
        with anyio.CancelScope(deadline=now + (self._total_timeout or math.inf)) as scope:
            self._scope = scope
            async with anyio.create_task_group() as tg:
                await self._dispatch(tg)
        if self._fatal is None:
            for entry in self._entries.values():
                if not entry.done:
                    self._timeout(entry, f"total_timeout={self._total_timeout} s")
        if self._fatal is not None:  # a failure, or (fail_fast) a timeout just recorded
            raise self._fatal

    async def _dispatch(self, tg: TaskGroup) -> None:
        heap = self._heap
        while self._remaining:
            now = anyio.current_time()
            if heap and heap[0][0] <= now:
                _, _, entry = heapq.heappop(heap)
                await self._slots.acquire_on_behalf_of(entry)
                tg.start_soon(self._step, entry)
                continue
            self._wake = anyio.Event()
            with anyio.move_on_after(heap[0][0] - now if heap else None):
                await self._wake.wait()

    async def _step(self, entry: _Entry) -> None:
        try:
            delay = await self._advance(entry)
        finally:
            self._slots.release_on_behalf_of(entry)
        if delay is not None:
            due = min(anyio.current_time() + delay, entry.deadline)
            heapq.heappush(self._heap, (due, next(self._seq), entry))
        # Rescheduled or done, the dispatcher must look again (it may be the last one).
        self._wake.set()

    async def _advance(self, entry: _Entry) -> float | None:
        """One request for this target; the delay until its next one, or None if done."""
        now = anyio.current_time()
        if math.isnan(entry.started):
            entry.started = now
            if self._target_timeout is not None:
                entry.deadline = now + self._target_timeout
        elif now >= entry.deadline:
            self._timeout(entry, f"target_timeout={self._target_timeout} s")
            return None
        ref = entry.ref
        rollout = self._client.targets.rollout
        entry.requests += 1
        try:
            if entry.phase == "start":
                try:
                    status = await rollout.run(
                        ref.target_name, repo_name=ref.repo_name, poll=False, user_id=self._user_id
                    )
                except BadRequestError as exc:
                    if not self._wait_for_stim:
                        raise
                    return await self._check_stim(entry, exc)
            elif entry.phase == "stim":
                entry.polls += 1
                stim = await self._client.targets.stim.get(
                    ref.target_name, repo_name=ref.repo_name, user_id=self._user_id
                )
                return self._after_stim(entry, stim)
            else:
                entry.polls += 1
                status = await rollout.get(
                    ref.target_name, repo_name=ref.repo_name, user_id=self._user_id
                )
                if status.status is JobState.NOT_STARTED and entry.status is None:
                    raise JobError(
                        f"rollout of {ref} has not been started; start it with rollout_many",
                        repo_name=ref.repo_name,
                        target_name=ref.target_name,
                        kind="rollout",
                        job=status,
                    )
        except BreadError as exc:
            self._finish(entry, Outcome.ERROR, exc)
            return None
        return self._after_rollout(entry, status)

    def _after_rollout(self, entry: _Entry, status: JobStatus) -> float | None:
        entry.status = status
        ref = entry.ref
        if status.is_complete:
            self._finish(entry, Outcome.COMPLETE, None)
        elif status.is_failed:
            error = JobFailedError.of("rollout", ref.repo_name, ref.target_name, status)
            self._finish(entry, Outcome.FAILED, error)
        elif not self._wait:
            self._finish(entry, Outcome.STARTED, None)
        else:
            self._progress(entry, None)
            entry.phase = "poll"
            entry.schedule.observe(status, anyio.current_time())
            return entry.schedule.next_delay()
        return None

    async def _check_stim(self, entry: _Entry, refused: BadRequestError) -> float | None:
        """A 400 on start with ``wait_for_stim``: wait if the stim job is still going."""
        ref = entry.ref
        entry.requests += 1
        stim = await self._client.targets.stim.get(
            ref.target_name, repo_name=ref.repo_name, user_id=self._user_id
        )
        if stim.is_complete:
            # The stim is done, so the refusal was about something else (no model_name).
            self._finish(entry, Outcome.ERROR, refused)
            return None
        entry.phase = "stim"
        entry.schedule = PollSchedule(self._policy)
        return self._after_stim(entry, stim)

    def _after_stim(self, entry: _Entry, stim: JobStatus) -> float | None:
        ref = entry.ref
        if stim.is_complete:
            entry.phase = "start"
            entry.schedule = PollSchedule(self._policy)
            return 0.0
        if stim.is_failed or stim.status is JobState.NOT_STARTED:
            what = "failed" if stim.is_failed else "is not started"
            error = JobFailedError if stim.is_failed else JobError
            self._finish(
                entry,
                Outcome.ERROR,
                error(
                    f"stim of {ref} {what}, so its rollout cannot start"
                    + (f": {stim.error}" if stim.error else ""),
                    repo_name=ref.repo_name,
                    target_name=ref.target_name,
                    kind="stim",
                    job=stim,
                ),
            )
            return None
        entry.schedule.observe(stim, anyio.current_time())
        return entry.schedule.next_delay()

    def _timeout(self, entry: _Entry, why: str) -> None:
        ref = entry.ref
        status = entry.status or JobStatus(JobState.NOT_STARTED)
        error = PollTimeoutError(
            f"rollout of {ref} still {status.status} when {why} ran out; it keeps running on "
            "the service",
            repo_name=ref.repo_name,
            target_name=ref.target_name,
            kind="rollout",
            job=status,
        )
        self._finish(entry, Outcome.TIMEOUT, error)

    def _finish(self, entry: _Entry, outcome: Outcome, error: BreadError | None) -> None:
        entry.done = True
        self._remaining -= 1
        now = anyio.current_time()
        result = RolloutResult(
            target=entry.ref,
            outcome=outcome,
            status=entry.status,
            error=error,
            started=now if math.isnan(entry.started) else entry.started,
            finished=now,
            polls=entry.polls,
            requests=entry.requests,
        )
        if self._fail_fast and not result.ok and self._fatal is None:
            self._fatal = error
            if self._scope is not None:
                self._scope.cancel()
            return
        self._progress(entry, result)
        self.on_result(result)

    def _progress(self, entry: _Entry, result: RolloutResult | None) -> None:
        if self._on_progress is not None:
            self._on_progress(RolloutUpdate(entry.ref, entry.status, result))


async def collect(fanout: Fanout, refs: list[TargetRef]) -> RolloutResults:
    """Run a fan-out to the end; one result per input target, in input order."""
    by_ref: dict[TargetRef, RolloutResult] = {}
    fanout.on_result = lambda result: by_ref.__setitem__(result.target, result)
    await fanout.run()
    return RolloutResults([by_ref[ref] for ref in refs])


class AsCompleted:
    """Results the moment each target reaches one, inside ``async with``::

        async with client.as_completed(targets, repo_name="r") as results:
            async for result in results:
                ...

    Leaving the block early stops the watch and cancels its requests.
    """

    def __init__(self, fanout: Fanout, count: int) -> None:
        self._fanout = fanout
        self._count = count
        self._tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[RolloutResult] | None = None
        self._receive: MemoryObjectReceiveStream[RolloutResult] | None = None

    async def __aenter__(self) -> AsCompleted:
        send, receive = anyio.create_memory_object_stream[RolloutResult](math.inf)
        self._send, self._receive = send, receive
        self._fanout.on_result = send.send_nowait
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._drive, send)
        return self

    async def _drive(self, send: MemoryObjectSendStream[RolloutResult]) -> None:
        async with send:
            await self._fanout.run()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        assert self._receive is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._receive.close()

    def __aiter__(self) -> AsCompleted:
        if self._receive is None:
            raise RuntimeError(
                "use 'async with client.as_completed(...) as results: async for result in "
                "results', so that stopping early cancels what is still running"
            )
        return self

    async def __anext__(self) -> RolloutResult:
        assert self._receive is not None
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def __len__(self) -> int:
        return self._count
