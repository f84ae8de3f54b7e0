"""The watch engine: start and watch stim or rollout jobs, of one target or of many, with
one scheduler.

One dispatcher keeps a heap of targets by the time their next request is due and hands due
ones to short tasks, at most ``concurrency`` at a time (and always under the client's own
limits). So 10,000 watched targets are 10,000 small records and one timer, not 10,000
sleeping tasks. A target's failure (an error answer, a failed job, its deadline) becomes its
result and never touches the others, unless the caller asked to fail fast.

The same engine serves ``rollout_many``, ``wait_many``, ``as_completed`` and, for a single
target, ``run(poll=True)`` and ``wait`` (:func:`watch`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._api import Api, JobKind
from ._config import NOT_GIVEN, NotGiven, PollPolicy, TimeoutArg
from ._errors import (
    BadRequestError,
    BreadError,
    InvalidArgumentError,
    JobError,
    JobFailedError,
    PollTimeoutError,
)
from ._models import JobState, JobStatus, ProgressCallback, TargetRef
from ._polling import PollSchedule
from ._results import Outcome, RolloutResult, RolloutResults, RolloutUpdate
from ._validation import check_int, check_seconds

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
        "starting",
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
        self.starting = False
        """Whether a start request is in flight (unanswered: the job may have started)."""


class Fanout:
    """The engine behind ``rollout_many``, ``wait_many``, ``as_completed``, ``run`` and
    ``wait``: drives each target's ``kind`` job to a result.

    ``request_timeout`` and ``idempotency_key`` are the per-request options of a single
    call (``run``); ``start_hint`` says how to start a job found never started.
    """

    def __init__(
        self,
        api: Api,
        refs: list[TargetRef],
        *,
        kind: JobKind = "rollout",
        start: bool,
        wait: bool,
        wait_for_stim: bool,
        concurrency: int | None,
        poll_policy: PollPolicy | NotGiven,
        target_timeout: float | None,
        total_timeout: float | None,
        fail_fast: bool,
        user_id: str | NotGiven | None,
        on_progress: ProgressCallback[RolloutUpdate] | None,
        request_timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        idempotency_key: str | None = None,
        start_hint: str = "rollout_many",
        timeout_name: str = "target_timeout",
    ) -> None:
        self._target_timeout = check_seconds(target_timeout, timeout_name)
        self._timeout_name = timeout_name
        self._total_timeout = check_seconds(total_timeout, "total_timeout")
        limit = check_int(
            api.max_concurrency if concurrency is None else concurrency, "concurrency", 1
        )
        # Resolved once: an invalid user_id fails the call, not every target in turn.
        self._user_id = api.user(user_id)
        self._api = api
        self._kind: JobKind = kind
        self._wait = wait
        self._wait_for_stim = wait_for_stim and kind == "rollout"
        check_poll_policy(poll_policy)
        if on_progress is not None and not callable(on_progress):
            raise InvalidArgumentError(
                f"on_progress must be a callable or None, not {type(on_progress).__name__}"
            )
        self._policy = api.poll_policy if poll_policy is NOT_GIVEN else poll_policy
        self._fail_fast = fail_fast
        self._on_progress = on_progress
        self._request_timeout = request_timeout
        self._idempotency_key = idempotency_key
        self._start_hint = start_hint
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
            try:
                async with anyio.create_task_group() as tg:
                    await self._dispatch(tg)
            except BaseExceptionGroup as group:
                # A bug or a raising callback. One error is raised as itself; several stay
                # together, so no sibling's error is lost.
                raise _unwrap(group) from None
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
            self._timeout(entry, f"{self._timeout_name}={self._target_timeout} s")
            return None
        ref = entry.ref
        api = self._api
        entry.requests += 1
        # The deadline bounds the request in flight too (its retries and their waits).
        with anyio.CancelScope(deadline=entry.deadline) as scope:
            return await self._request(entry, ref, api)
        assert scope.cancelled_caught
        self._timeout(entry, f"{self._timeout_name}={self._target_timeout} s")
        return None

    async def _request(self, entry: _Entry, ref: TargetRef, api: Api) -> float | None:
        try:
            if entry.phase == "start":
                entry.starting = True
                try:
                    status = await api.start_job(
                        ref,
                        self._kind,
                        user_id=self._user_id,
                        timeout=self._request_timeout,
                        idempotency_key=self._idempotency_key,
                    )
                except BadRequestError as exc:
                    entry.starting = False
                    if not self._wait_for_stim:
                        raise
                    return await self._check_stim(entry, exc)
                entry.starting = False
            elif entry.phase == "stim":
                entry.polls += 1
                stim = await api.get_job(ref, "stim", user_id=self._user_id)
                return self._after_stim(entry, stim)
            else:
                entry.polls += 1
                status = await api.get_job(
                    ref, self._kind, user_id=self._user_id, timeout=self._request_timeout
                )
                if status.status is JobState.NOT_STARTED and entry.status is None:
                    raise JobError(
                        f"{self._kind} of {ref} has not been started; start it with "
                        f"{self._start_hint}",
                        repo_name=ref.repo_name,
                        target_name=ref.target_name,
                        kind=self._kind,
                        job=status,
                    )
        except BreadError as exc:
            self._finish(entry, Outcome.ERROR, exc)
            return None
        return self._after_job(entry, status)

    def _after_job(self, entry: _Entry, status: JobStatus) -> float | None:
        entry.status = status
        ref = entry.ref
        if status.is_complete:
            self._finish(entry, Outcome.COMPLETE, None)
        elif status.is_failed:
            error = JobFailedError.of(self._kind, ref.repo_name, ref.target_name, status)
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
        stim = await self._api.get_job(ref, "stim", user_id=self._user_id)
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
            what = stim.status.ended if stim.is_failed else "is not started"
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
        lines = "" if status.lines is None else f" ({status.lines} lines)"
        if entry.phase == "start" and entry.status is None and entry.requests == 0:
            message = f"{self._kind} of {ref} was not started: {why} ran out before its turn"
        elif entry.starting:
            message = (
                f"{self._kind} of {ref}: the start request was not answered when {why} ran "
                "out; the job may or may not have started on the service"
            )
        else:
            message = (
                f"{self._kind} of {ref} still {status.status}{lines} when {why} ran out; it "
                "keeps running on the service"
            )
        error = PollTimeoutError(
            message,
            repo_name=ref.repo_name,
            target_name=ref.target_name,
            kind=self._kind,
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
        self._stack: AsyncExitStack | None = None
        self._receive: MemoryObjectReceiveStream[RolloutResult] | None = None

    async def __aenter__(self) -> AsCompleted:
        if self._stack is not None:
            raise RuntimeError("an as_completed(...) block can be entered only once")
        async with AsyncExitStack() as stack:
            send, receive = anyio.create_memory_object_stream[RolloutResult](math.inf)
            stack.enter_context(receive)
            self._fanout.on_result = send.send_nowait
            tg = await stack.enter_async_context(anyio.create_task_group())
            # Runs first on the way out: leaving the block stops whatever is still watched.
            stack.callback(tg.cancel_scope.cancel)
            tg.start_soon(self._drive, send)
            self._stack = stack.pop_all()
        self._receive = receive
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
        assert self._stack is not None
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

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


def check_poll_policy(poll_policy: object) -> None:
    """Raise :class:`InvalidArgumentError` unless ``poll_policy`` is a :class:`PollPolicy`
    (or not given)."""
    if poll_policy is not NOT_GIVEN and not isinstance(poll_policy, PollPolicy):
        raise InvalidArgumentError(
            f"poll_policy must be a breadasync.PollPolicy, not {type(poll_policy).__name__}"
        )


async def watch(
    api: Api,
    ref: TargetRef,
    kind: JobKind,
    *,
    start: bool,
    poll_timeout: float | None,
    poll_policy: PollPolicy | NotGiven,
    raise_on_failure: bool,
    user_id: str | NotGiven | None,
    timeout: TimeoutArg | NotGiven,
    idempotency_key: str | None = None,
) -> JobStatus:
    """One target's job to a terminal state (``run(poll=True)`` and ``wait``): the engine
    with one entry, its result turned back into a status or an error."""
    fanout = Fanout(
        api,
        [ref],
        kind=kind,
        start=start,
        wait=True,
        wait_for_stim=False,
        concurrency=1,
        poll_policy=poll_policy,
        target_timeout=poll_timeout,
        total_timeout=None,
        fail_fast=False,
        user_id=user_id,
        on_progress=None,
        request_timeout=timeout,
        idempotency_key=idempotency_key,
        start_hint=f"client.targets.{kind}.run(...)",
        timeout_name="poll_timeout",
    )
    result = (await collect(fanout, [ref]))[0]
    if result.outcome is Outcome.COMPLETE or (
        result.outcome is Outcome.FAILED and not raise_on_failure
    ):
        assert result.status is not None
        return result.status
    assert result.error is not None
    raise result.error


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error of ``group`` (cancellations aside), or the group itself when it holds
    several, so none is discarded."""
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif not isinstance(exc, cancelled):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group
