"""rollout_many, wait_many and as_completed against the emulator (a sped-up clock)."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections import Counter
from collections.abc import Callable
from functools import partial

import anyio
import pytest

from breadasync import (
    BadRequestError,
    BreadClient,
    InvalidArgumentError,
    JobError,
    JobFailedError,
    JobState,
    JobStatus,
    NotFoundError,
    Outcome,
    PollPolicy,
    PollTimeoutError,
    RetryPolicy,
    RolloutResults,
    RolloutUpdate,
    TargetRef,
)
from breadasync._config import NOT_GIVEN
from breadasync._fanout import Fanout, _unwrap, collect
from breadasync.emulator import Emulator, Faults, TargetPlan
from tests.conftest import quiet, wait_until

POLL = PollPolicy(initial=0.02, maximum=0.2, minimum=0.01)
sped_up = pytest.mark.bread_emulator(speed=100)


def running_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if not t.done()}


async def nothing_follows(client: BreadClient, before: set[asyncio.Task[object]]) -> None:
    """No request can follow: no task of the watch outlives it (a poll needs one), and the
    loop turning over many times sends nothing. Counted in loop iterations, not seconds."""
    assert running_tasks() - before == set()
    sent = client.stats.requests
    for _ in range(200):
        await asyncio.sleep(0)
    assert client.stats.requests == sent


@pytest.fixture
def fan_client(make_client: Callable[..., BreadClient]) -> BreadClient:
    return make_client(
        poll=POLL, retry=RetryPolicy(max_retries=8, initial_backoff=0.002, max_backoff=0.02)
    )


@pytest.mark.soak
@sped_up
async def test_hundreds_of_mixed_targets_each_get_the_right_result(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    emu = bread_emulator
    expected: dict[str, Outcome] = {}
    for i in range(240):  # fast and slow: 1..120 emulated seconds, 0.01..1.2 s real
        emu.add_target(
            "r", f"ok{i}", plan=TargetPlan(stimuli=5 + i % 7, rollout_seconds=1 + (i * 7) % 120)
        )
        expected[f"ok{i}"] = Outcome.COMPLETE
    for i in range(20):
        emu.add_target(
            "r", f"failing{i}", plan=TargetPlan(fail="rollout", stimuli=10, rollout_seconds=20)
        )
        expected[f"failing{i}"] = Outcome.FAILED
    for i in range(15):
        expected[f"ghost{i}"] = Outcome.ERROR
    for i in range(15):
        emu.add_target("r", f"nostim{i}", stim="running", plan=TargetPlan(stim_seconds=10**6))
        expected[f"nostim{i}"] = Outcome.ERROR
    for i in range(10):
        emu.add_target("r", f"nomodel{i}", overrides={"model_name": None})
        expected[f"nomodel{i}"] = Outcome.ERROR
    emu.set_faults(
        Faults(errors={503: 0.05, 502: 0.02, 429: 0.03}, retry_after=0.005, retry_after_format="ms")
    )

    names = list(expected)
    results = await fan_client.rollout_many(names, repo_name="r")

    assert [r.target.target_name for r in results] == names
    got = {r.target.target_name: r.outcome for r in results}
    assert got == expected
    by_name = {r.target.target_name: r for r in results}
    for name, result in by_name.items():
        if name.startswith("ok"):
            assert result.status is not None
            assert result.status.is_complete
            assert result.lines == emu.job("r", name).lines
            assert result.error is None
        elif name.startswith("failing"):
            assert isinstance(result.error, JobFailedError)
        elif name.startswith("ghost"):
            assert isinstance(result.error, NotFoundError)
        else:
            assert isinstance(result.error, BadRequestError)
    summary = results.summary()
    assert (summary.complete, summary.failed, summary.errored) == (240, 20, 40)
    assert emu.stats.faults() > 0

    # Requests per target are bounded: one start, a few adaptive polls, a few retries.
    per_target = Counter(r.target for r in emu.stats.records())
    assert max(per_target.values()) <= 40
    polls = sorted(r.polls for r in results)
    assert polls[len(polls) // 2] <= 20
    assert emu.stats.jobs_started("rollout") == 260

    # Re-running starts nothing new and reports the current state at once.
    emu.set_faults(None)
    emu.stats.reset()
    again = await fan_client.rollout_many(names, repo_name="r")
    assert {r.target.target_name: r.outcome for r in again} == expected
    assert emu.stats.jobs_started() == 0
    assert emu.stats.count("get_rollout") == 0  # every job was already terminal
    assert emu.stats.count("run_rollout") == len(names)


@sped_up
async def test_target_forms_mixed_repos_and_duplicates(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r1", "a", rows=3)
    bread_emulator.add_target("r2", "a", rows=4)
    bread_emulator.add_target("r1", "b", rows=5)
    results = await fan_client.rollout_many(
        ["a", ("r2", "a"), TargetRef("r1", "b"), "a"], repo_name="r1"
    )
    assert [str(r.target) for r in results] == ["r1/a", "r2/a", "r1/b", "r1/a"]
    assert [r.lines for r in results] == [3, 4, 5, 3]
    assert results[0] is results[3]
    assert bread_emulator.stats.jobs_started() == 3


@pytest.mark.parametrize(
    ("targets", "repo", "message"),
    [
        (["a"], None, "has no repo"),
        ([("r", "")], None, "target_name must not be empty"),
        ([("r",)], None, "is not a target"),
        ([42], "r", "is not a target"),
        ("abc", "r", "not a single one"),
        (["a"], "..", "must not be '..'"),
    ],
)
async def test_malformed_targets_send_nothing(
    fan_client: BreadClient,
    bread_emulator: Emulator,
    targets: object,
    repo: str | None,
    message: str,
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        await fan_client.rollout_many(targets, repo_name=repo)  # type: ignore[arg-type]
    assert bread_emulator.stats.count() == 0


async def test_bad_fanout_options(fan_client: BreadClient) -> None:
    with pytest.raises(InvalidArgumentError, match="concurrency"):
        await fan_client.rollout_many(["a"], repo_name="r", concurrency=0)
    with pytest.raises(InvalidArgumentError, match="target_timeout"):
        await fan_client.rollout_many(["a"], repo_name="r", target_timeout=0)


async def test_bad_user_id_fails_the_call_before_any_request(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    # One clear error for the call, not the same error as every target's result.
    with pytest.raises(InvalidArgumentError, match="user_id must not be empty"):
        await fan_client.rollout_many(["a", "b"], repo_name="r", user_id="")
    with pytest.raises(InvalidArgumentError, match="must be ASCII"):
        await fan_client.wait_many(["a"], repo_name="r", user_id="ünï")
    assert bread_emulator.stats.count() == 0


async def test_no_targets_no_requests(fan_client: BreadClient, bread_emulator: Emulator) -> None:
    results = await fan_client.rollout_many([], repo_name="r")
    assert len(results) == 0
    assert bread_emulator.stats.count() == 0


@pytest.mark.bread_emulator(speed=0)
async def test_wait_false_only_starts(fan_client: BreadClient, bread_emulator: Emulator) -> None:
    for name in ("a", "b"):
        bread_emulator.add_target("r", name, rows=10)
    results = await fan_client.rollout_many(["a", "b"], repo_name="r", wait=False)
    assert [r.outcome for r in results] == [Outcome.STARTED, Outcome.STARTED]
    assert all(r.ok for r in results)
    assert bread_emulator.stats.count() == 2

    bread_emulator.clock.advance(60)
    watched = await fan_client.wait_many([("r", "a"), ("r", "b")])
    assert [r.outcome for r in watched] == [Outcome.COMPLETE, Outcome.COMPLETE]
    assert bread_emulator.stats.count("run_rollout") == 2  # wait_many starts nothing


async def test_wait_many_reports_a_job_never_started(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "idle")
    (result,) = await fan_client.wait_many(["idle"], repo_name="r")
    assert result.outcome is Outcome.ERROR
    assert isinstance(result.error, JobError)
    assert "has not been started" in str(result.error)


@sped_up
async def test_wait_for_stim_starts_the_rollout_after_the_stim(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target(
        "r", "late", stim="running", plan=TargetPlan(stim_seconds=20, rollout_seconds=10, stimuli=6)
    )
    bread_emulator.add_target("r", "nomodel", overrides={"model_name": None})
    bread_emulator.add_target("r", "idle", stim="not_started")
    results = await fan_client.rollout_many(
        ["late", "nomodel", "idle"], repo_name="r", wait_for_stim=True
    )
    late, nomodel, idle = results
    assert late.outcome is Outcome.COMPLETE
    assert late.lines == 6
    assert bread_emulator.stats.count("get_stim", target="late") >= 1
    # A missing model_name stays a permanent error, and a stim never started is reported.
    assert nomodel.outcome is Outcome.ERROR
    assert isinstance(nomodel.error, BadRequestError)
    assert idle.outcome is Outcome.ERROR
    assert "stim of r/idle is not started" in str(idle.error)


@pytest.mark.bread_emulator(speed=0)
async def test_as_completed_yields_in_completion_order(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    for name, seconds in (("slow", 60), ("fast", 5), ("middle", 30)):
        bread_emulator.add_target("r", name, plan=TargetPlan(rollout_seconds=seconds, stimuli=3))
    clock = bread_emulator.clock
    order = []
    async with fan_client.as_completed(["slow", "fast", "middle"], repo_name="r") as results:
        assert len(results) == 3
        await wait_until(lambda: bread_emulator.stats.jobs_started("rollout") == 3)
        # The frozen clock moves to each job's end in turn, so no two ever end between the
        # same two polls, however slowly a busy machine polls.
        for end in (5, 30, 60):
            clock.advance(end - clock.now())
            order.append((await anext(results)).target.target_name)
        assert [result async for result in results] == []
    assert order == ["fast", "middle", "slow"]


@sped_up
async def test_leaving_as_completed_early_stops_the_watch(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "fast", plan=TargetPlan(rollout_seconds=1, stimuli=3))
    bread_emulator.add_target("r", "forever", plan=TargetPlan(rollout_seconds=10**6))
    before = running_tasks()
    async with fan_client.as_completed(["fast", "forever"], repo_name="r") as results:
        async for result in results:
            assert result.target.target_name == "fast"
            break
        assert running_tasks() - before  # the watch runs inside the block
    assert fan_client.stats.in_flight == 0
    await nothing_follows(fan_client, before)


async def test_as_completed_needs_async_with(fan_client: BreadClient) -> None:
    with pytest.raises(RuntimeError, match="use 'async with"):
        async for _ in fan_client.as_completed(["a"], repo_name="r"):
            pass


@pytest.mark.bread_emulator(speed=0)
async def test_target_and_total_timeouts(fan_client: BreadClient, bread_emulator: Emulator) -> None:
    # Frozen clock: "quick" is complete already (its start says so at once) and "endless"
    # never ends, so only the timeout can end its watch, whatever the machine's load.
    bread_emulator.add_target("r", "quick", rows=2, rollout="complete")
    bread_emulator.add_target("r", "endless", plan=TargetPlan(rollout_seconds=10**6))
    quick, endless = await fan_client.rollout_many(
        ["quick", "endless"], repo_name="r", target_timeout=1.5
    )
    assert quick.outcome is Outcome.COMPLETE
    assert endless.outcome is Outcome.TIMEOUT
    assert isinstance(endless.error, PollTimeoutError)
    assert "target_timeout=1.5 s" in str(endless.error)
    assert endless.status is not None
    assert endless.status.status == "running"

    (again,) = await fan_client.wait_many(["endless"], repo_name="r", total_timeout=0.3)
    assert again.outcome is Outcome.TIMEOUT
    assert "total_timeout=0.3 s" in str(again.error)
    assert fan_client.stats.in_flight == 0


@sped_up
async def test_fail_fast_raises_the_first_failure_and_stops(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    for i in range(20):
        bread_emulator.add_target("r", f"t{i}", plan=TargetPlan(rollout_seconds=10**6))
    before = running_tasks()
    # The 20 endless jobs would take 10**4 s: raising at all says the failure stopped them.
    with pytest.raises(NotFoundError, match="ghost"):
        await fan_client.rollout_many(
            [f"t{i}" for i in range(20)] + ["ghost"], repo_name="r", fail_fast=True
        )
    assert fan_client.stats.in_flight == 0
    await nothing_follows(fan_client, before)

    results = await fan_client.rollout_many(["t0", "ghost"], repo_name="r", wait=False)
    with pytest.raises(NotFoundError):
        results.raise_for_failures()
    assert [r.target.target_name for r in results.failures()] == ["ghost"]


@sped_up
async def test_progress_updates(fan_client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "a", plan=TargetPlan(rollout_seconds=30, stimuli=100))
    updates: list[RolloutUpdate] = []
    await fan_client.rollout_many(["a"], repo_name="r", on_progress=updates.append)
    assert len(updates) >= 2
    assert all(u.result is None for u in updates[:-1])
    assert updates[-1].result is not None
    assert updates[-1].result.outcome is Outcome.COMPLETE
    lines = [u.status.lines for u in updates if u.status is not None]
    assert lines == sorted(lines)
    assert lines[-1] == 100


@sped_up
async def test_user_id_on_every_start_and_poll(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    for name in ("a", "b"):
        bread_emulator.add_target("r", name, plan=TargetPlan(rollout_seconds=20, stimuli=4))
    await fan_client.rollout_many(["a", "b"], repo_name="r", user_id="alice")
    records = bread_emulator.stats.records()
    assert len(records) > 2
    assert {r.user_id for r in records} == {"alice"}


@pytest.mark.bread_emulator(speed=1)
async def test_concurrency_bound_and_prompt_cancellation(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    for i in range(30):
        bread_emulator.add_target("r", f"t{i}", plan=TargetPlan(rollout_seconds=10**6))
    bread_emulator.set_faults(Faults(latency=0.02))
    before = running_tasks()
    names = [f"t{i}" for i in range(30)]

    def polled() -> bool:
        return bread_emulator.stats.count("get_rollout") >= 5

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(fan_client.rollout_many, names, repo_name="r", concurrency=5))
        # Cancelled once every job is started and polling is under way, whenever that is.
        await wait_until(lambda: bread_emulator.stats.jobs_started() == 30 and polled())
        tg.cancel_scope.cancel()
    assert bread_emulator.stats.max_in_flight <= 5
    assert bread_emulator.stats.jobs_started() == 30
    assert fan_client.stats.in_flight == 0
    await quiet(bread_emulator)
    await nothing_follows(fan_client, before)


@sped_up
async def test_fail_fast_with_a_total_timeout_raises_the_timeout(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "endless", plan=TargetPlan(rollout_seconds=10**6))
    with pytest.raises(PollTimeoutError, match="total_timeout"):
        await fan_client.rollout_many(["endless"], repo_name="r", total_timeout=0.3, fail_fast=True)


# --- the engine in-process, on a virtual clock ------------------------------------------------


class _VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready, so an
    engine's sleeps and deadlines run in simulated seconds, whatever the machine's load."""

    def __init__(self) -> None:
        super().__init__()
        self._virtual_now = 0.0

    def time(self) -> float:
        return self._virtual_now

    def _run_once(self) -> None:
        ready, scheduled = self._ready, self._scheduled  # type: ignore[attr-defined]
        if not ready and scheduled:
            self._virtual_now = max(self._virtual_now, scheduled[0].when())
        super()._run_once()  # type: ignore[misc]


class _SilentJobsApi:
    """The part of the API layer the engine uses, serving jobs that report no progress:
    ``lines`` 0 until complete (``grow=False``) or growing ``lines`` with no total."""

    def __init__(self, durations: dict[TargetRef, float], *, grow: bool) -> None:
        self.user_id = None
        self.poll_policy = PollPolicy()  # the production default
        self.max_concurrency = 64
        self._durations = durations
        self._grow = grow
        self.started: dict[TargetRef, float] = {}
        self.starts: Counter[TargetRef] = Counter()
        self.finished_at: dict[TargetRef, float] = {}

    def user(self, user_id: object) -> None:
        return None

    def _status(self, ref: TargetRef) -> JobStatus:
        now = asyncio.get_running_loop().time()
        age = now - self.started[ref]
        duration = self._durations[ref]
        if age >= duration:
            self.finished_at.setdefault(ref, self.started[ref] + duration)
            return JobStatus(JobState.COMPLETE, lines=1000)
        lines = int(1000 * age / duration) if self._grow else 0
        return JobStatus(JobState.RUNNING, lines=lines)

    async def start_job(self, ref: TargetRef, kind: str, **_: object) -> JobStatus:
        await asyncio.sleep(0.005)  # a request's latency
        self.starts[ref] += 1
        self.started.setdefault(ref, asyncio.get_running_loop().time())
        return self._status(ref)

    async def get_job(self, ref: TargetRef, kind: str, **_: object) -> JobStatus:
        await asyncio.sleep(0.005)
        return self._status(ref)


@pytest.mark.parametrize("grow", [False, True], ids=["lines-0-until-done", "lines-only"])
def test_300_silent_jobs_are_seen_complete_soon_with_few_polls(grow: bool) -> None:
    rng = random.Random(300)
    refs = [TargetRef("r", f"t{i}") for i in range(300)]
    api = _SilentJobsApi({ref: rng.uniform(1, 6) for ref in refs}, grow=grow)

    async def main() -> RolloutResults:
        fanout = Fanout(
            api,  # type: ignore[arg-type]
            refs,
            start=True,
            wait=True,
            wait_for_stim=False,
            concurrency=None,
            poll_policy=NOT_GIVEN,
            target_timeout=None,
            total_timeout=None,
            fail_fast=False,
            user_id=NOT_GIVEN,
            on_progress=None,
        )
        return await collect(fanout, refs)

    loop = _VirtualClockLoop()
    try:
        results = loop.run_until_complete(main())
    finally:
        loop.close()
    assert all(r.outcome is Outcome.COMPLETE for r in results)
    assert set(api.starts.values()) == {1}  # nothing started twice
    slowest_end = max(api.finished_at.values())
    assert max(r.finished for r in results) <= slowest_end + 2
    lags = [r.finished - api.finished_at[r.target] for r in results]
    assert max(lags) <= 2
    polls = [r.polls for r in results]
    assert statistics.median(polls) <= 20


async def test_one_failure_in_a_group_is_raised_as_itself_and_several_stay_together() -> None:
    one = ValueError("callback broke")
    assert _unwrap(BaseExceptionGroup("g", [one, asyncio.CancelledError()])) is one
    nested = BaseExceptionGroup("g", [ExceptionGroup("inner", [one])])
    assert _unwrap(nested) is one
    several = BaseExceptionGroup("g", [one, KeyError("other")])
    assert _unwrap(several) is several


@sped_up
async def test_a_raising_progress_callback_is_raised_as_itself(
    fan_client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", plan=TargetPlan(stimuli=5, rollout_seconds=5))

    def broken(update: RolloutUpdate) -> None:
        raise ValueError("the callback broke")

    with pytest.raises(ValueError, match="the callback broke"):
        await fan_client.rollout_many(["t"], repo_name="r", on_progress=broken)
