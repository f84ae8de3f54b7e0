"""The retry rules, Retry-After, idempotency keys and the client's limits, counted by the
emulator."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import anyio
import pytest

from breadasync import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BreadClient,
    InternalServerError,
    RetryPolicy,
    Timeouts,
)
from breadasync.emulator import Emulator, Faults

ROLLOUT = frozenset({"get_rollout"})


@pytest.fixture
def target(bread_emulator: Emulator) -> Emulator:
    bread_emulator.add_target("r", "t", rows=2500, rollout="complete")
    return bread_emulator


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_transient_statuses_are_retried_until_the_budget_runs_out(
    client: BreadClient, target: Emulator, status: int
) -> None:
    target.set_faults(Faults(errors={status: 1.0}, retry_after=0.001, retry_after_format="ms"))
    with pytest.raises(APIStatusError) as caught:
        await client.targets.rollout.get("t", repo_name="r")
    assert caught.value.status == status
    assert target.stats.count("get_rollout") == 4  # 1 + max_retries (3)
    assert client.stats.retries == 3


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 409, 422])
async def test_permanent_statuses_are_never_retried(
    client: BreadClient, target: Emulator, status: int
) -> None:
    # Not even when the service says ``x-should-retry: true``.
    target.set_faults(Faults(errors={status: 1.0}, should_retry=True))
    with pytest.raises(APIStatusError) as caught:
        await client.targets.rollout.get("t", repo_name="r")
    assert caught.value.status == status
    assert target.stats.count("get_rollout") == 1


async def test_a_transient_fault_is_ridden_out(client: BreadClient, target: Emulator) -> None:
    target.set_faults(
        Faults(errors={503: 1.0}, retry_after=0.001, retry_after_format="ms", max_faults=2)
    )
    status = await client.targets.rollout.get("t", repo_name="r")
    assert status.is_complete
    assert target.stats.count("get_rollout") == 3
    assert client.stats.retries == 2
    assert client.stats.responses[503] == 2


async def test_x_should_retry_is_honoured(client: BreadClient, target: Emulator) -> None:
    target.set_faults(Faults(errors={503: 1.0}, should_retry=False))
    with pytest.raises(InternalServerError):
        await client.targets.rollout.get("t", repo_name="r")
    assert target.stats.count("get_rollout") == 1

    target.stats.reset()
    target.set_faults(Faults(errors={418: 1.0}))
    with pytest.raises(APIStatusError):
        await client.targets.rollout.get("t", repo_name="r")
    assert target.stats.count("get_rollout") == 1  # 418 is not retried by default...

    target.stats.reset()
    target.set_faults(Faults(errors={418: 1.0}, should_retry=True))
    with pytest.raises(APIStatusError):
        await client.targets.rollout.get("t", repo_name="r")
    assert target.stats.count("get_rollout") == 4  # ...unless the service says so


@pytest.mark.parametrize(("fmt", "floor"), [("seconds", 0.3), ("ms", 0.3), ("http-date", 0.45)])
async def test_retry_after_is_a_floor_for_the_wait(
    client: BreadClient, target: Emulator, fmt: str, floor: float
) -> None:
    # An HTTP date has whole seconds: 1.5 s ahead, truncated, is still >= 0.5 s ahead.
    wait = 1.5 if fmt == "http-date" else 0.3
    target.set_faults(
        Faults(errors={503: 1.0}, retry_after=wait, retry_after_format=fmt, max_faults=1)
    )  # type: ignore[arg-type]
    started = time.monotonic()
    await client.targets.rollout.get("t", repo_name="r")
    assert time.monotonic() - started >= floor
    gap = [r.started for r in target.stats.records()]
    assert gap[1] - gap[0] >= floor


async def test_a_retry_after_beyond_the_cap_is_raised_at_once(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    target.set_faults(Faults(errors={429: 1.0}, retry_after=120, retry_after_format="seconds"))
    client = make_client(retry=RetryPolicy(max_retries=3, max_retry_after=10))
    with pytest.raises(APIStatusError, match="more than max_retry_after=10 s") as caught:
        await client.targets.rollout.get("t", repo_name="r")
    assert caught.value.retry_after == 120
    assert target.stats.count() == 1


async def test_one_idempotency_key_per_post_across_its_retries(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=10)
    bread_emulator.set_faults(
        Faults(
            errors={503: 1.0},
            retry_after=0.001,
            retry_after_format="ms",
            max_faults=2,
            routes=frozenset({"run_rollout"}),
        )
    )
    await client.targets.rollout.run("t", repo_name="r", poll=False)
    posts = [r for r in bread_emulator.stats.records() if r.route == "run_rollout"]
    assert [r.status for r in posts] == [503, 503, 200]
    assert len({r.idempotency_key for r in posts}) == 1
    assert posts[0].idempotency_key
    await client.targets.rollout.run("t", repo_name="r", poll=False)
    keys = {r.idempotency_key for r in bread_emulator.stats.records() if r.route == "run_rollout"}
    assert len(keys) == 2  # a new call, a new key
    assert bread_emulator.stats.jobs_started("rollout") == 1


async def test_post_answer_lost_mid_body_is_retried_safely(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=10)
    bread_emulator.set_faults(Faults(drop=1.0, max_faults=1, routes=frozenset({"run_rollout"})))
    status = await client.targets.rollout.run("t", repo_name="r", poll=False)
    assert status.status == "running"
    assert bread_emulator.stats.count("run_rollout") == 2
    assert bread_emulator.stats.jobs_started("rollout") == 1  # the POST is idempotent


async def test_a_body_cut_short_is_retried(client: BreadClient, target: Emulator) -> None:
    target.set_faults(Faults(drop=1.0, max_faults=2))
    page = await client.targets.rollout.get_output("t", repo_name="r", limit=1000)
    assert page.output == target.trajectories("r", "t", 0, 1000)
    assert target.stats.count("get_rollout_output") == 3
    assert target.stats.faults("drop") == 2
    assert client.stats.connection_errors == 2


async def test_drops_beyond_the_budget_raise_a_connection_error(
    client: BreadClient, target: Emulator
) -> None:
    target.set_faults(Faults(drop=1.0))
    with pytest.raises(APIConnectionError, match="dropped mid-body") as caught:
        await client.targets.rollout.get_output("t", repo_name="r", limit=1000)
    assert caught.value.attempts == 4


async def test_a_drip_fed_body_hits_the_attempt_deadline(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    # Each chunk arrives well within the read timeout; only the attempt's deadline stops it.
    target.set_faults(Faults(slow_body=4000), repo="r", target="t")
    client = make_client(
        timeout=Timeouts(connect=1, read=5, request=0.3),
        retry=RetryPolicy(max_retries=1, initial_backoff=0.001),
    )
    started = time.monotonic()
    with pytest.raises(APITimeoutError):
        await client.targets.rollout.get_output("t", repo_name="r", limit=10)
    assert time.monotonic() - started < 2.0
    # The emulator counts a request when its answer ends, which the client cut short; the
    # client's own counters tell the attempts.
    assert client.stats.requests == 2
    assert client.stats.connection_errors == 2


async def test_total_time_across_retries_is_bounded(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    target.set_faults(Faults(errors={503: 1.0}, retry_after=0.2, retry_after_format="ms"))
    client = make_client(
        timeout=Timeouts(total=0.5), retry=RetryPolicy(max_retries=50, initial_backoff=0.001)
    )
    started = time.monotonic()
    with pytest.raises(InternalServerError, match=r"would pass the total timeout of 0\.5 s"):
        await client.targets.rollout.get("t", repo_name="r")
    assert time.monotonic() - started < 0.6
    assert 2 <= target.stats.count() <= 3


async def test_in_flight_never_exceeds_max_concurrency(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    target.set_faults(Faults(latency=0.05))
    client = make_client(max_concurrency=8)
    async with anyio.create_task_group() as tg:
        for _ in range(60):
            tg.start_soon(partial(client.targets.rollout.get, "t", repo_name="r"))
    assert target.stats.max_in_flight == 8
    assert target.stats.count("get_rollout", status=200) == 60


async def test_backpressure_shrinks_concurrency_and_success_restores_it(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    target.set_faults(Faults(rate_limit=200, rate_burst=8))
    client = make_client(
        max_concurrency=32,
        retry=RetryPolicy(max_retries=30, initial_backoff=0.005, max_backoff=0.05),
    )

    async def one() -> None:
        status = await client.targets.rollout.get("t", repo_name="r")
        assert status.is_complete

    async with anyio.create_task_group() as tg:
        for _ in range(300):
            tg.start_soon(one)
    shrunk = client.stats
    assert shrunk.throttled > 0
    assert shrunk.concurrency_limit < 32
    assert target.stats.max_in_flight <= 32
    target.set_faults(None)
    for _ in range(200):
        await client.targets.rollout.get("t", repo_name="r")
    assert client.stats.concurrency_limit > shrunk.concurrency_limit


async def test_requests_per_second_limit(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    client = make_client(max_requests_per_second=50)
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(partial(client.targets.rollout.get, "t", repo_name="r"))
    elapsed = time.monotonic() - started
    assert elapsed >= 19 / 50 * 0.95
    stamps = sorted(r.started for r in target.stats.records())
    assert stamps[-1] - stamps[0] >= 19 / 50 * 0.9


async def test_no_attempt_outlives_the_total_timeout(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    target.set_faults(Faults(latency=5))
    client = make_client(timeout=Timeouts(request=60, total=0.4))
    started = time.monotonic()
    with pytest.raises(APITimeoutError):
        await client.targets.rollout.get("t", repo_name="r")
    assert time.monotonic() - started < 1.5
