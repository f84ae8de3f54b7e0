"""The retry rules, Retry-After, error mapping and the client's fixed limits, in-process:
a MockTransport answers, and the event loop's time is virtual (nothing really sleeps)."""

from __future__ import annotations

import email.utils
import itertools
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import orjson
import pytest
from yarl import URL

from breadasync import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BreadClient,
    CertificateError,
    InternalServerError,
    JobFailedError,
    JobStatus,
    Limits,
    MockTransport,
    PollTimeoutError,
    ProtocolError,
    RateLimitError,
    RedirectError,
    RetryPolicy,
    Timeouts,
    TransportRequest,
    TransportResponse,
)
from breadasync._limits import RETRY_BURST, RETRY_PER_SECOND, RETRY_RATIO, RetryBudget
from breadasync._transport import Transport
from breadasync.testing import VirtualClock, run_virtual

KEY = "sk-transport-test-key-0123"
POLICY = RetryPolicy(max_retries=3, initial_backoff=0.5, max_backoff=8)
T = TypeVar("T")

Handler = Callable[[TransportRequest], Awaitable[TransportResponse]]


def make(
    handler: Handler,
    *,
    retry: RetryPolicy = POLICY,
    limits: Limits | None = None,
    timeouts: Timeouts | None = None,
) -> tuple[Transport, MockTransport]:
    mock = MockTransport(handler)
    transport = Transport(
        api_key=KEY,
        base_url=URL("https://bread.test"),
        timeouts=timeouts or Timeouts(),
        retry=retry,
        limits=limits or Limits(),
        transport=mock,
        clock=CLOCK,
        rng=random.Random(1),
    )
    return transport, mock


CLOCK = VirtualClock()


def answer(status: int, headers: dict[str, str] | None = None, body: bytes = b"{}") -> Handler:
    async def handler(request: TransportRequest) -> TransportResponse:
        await CLOCK.sleep(0.01)
        return TransportResponse(status, headers or {}, body)

    return handler


def virtual(main: Callable[[], Awaitable[T]]) -> T:
    return run_virtual(main)


async def get(transport: Transport, path: str = "/v1/repo/r/targets/t/rollout") -> Any:
    try:
        return await transport.request("GET", path)
    finally:
        await transport.aclose()


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_transient_statuses_are_retried_until_the_retries_run_out(status: int) -> None:
    transport, mock = make(answer(status))

    async def main() -> None:
        with pytest.raises(APIStatusError) as caught:
            await get(transport)
        assert caught.value.status == status
        assert caught.value.attempts == 4
        assert "gave up after 4 attempts" in str(caught.value)

    virtual(main)
    assert len(mock.requests) == 4
    assert transport.stats().retries == 3


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 409, 422])
def test_permanent_statuses_are_never_retried(status: int) -> None:
    # Not even when the service says ``x-should-retry: true``.
    transport, mock = make(answer(status, {"x-should-retry": "true"}))

    async def main() -> None:
        with pytest.raises(APIStatusError) as caught:
            await get(transport)
        assert caught.value.attempts == 1

    virtual(main)
    assert len(mock.requests) == 1


@pytest.mark.parametrize(
    ("status", "hint", "attempts"),
    [(503, "false", 1), (418, None, 1), (418, "true", 4)],
)
def test_x_should_retry_decides(status: int, hint: str | None, attempts: int) -> None:
    transport, mock = make(answer(status, {"x-should-retry": hint} if hint else {}))

    async def main() -> None:
        with pytest.raises(APIStatusError):
            await get(transport)

    virtual(main)
    assert len(mock.requests) == attempts


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "2500"}, 2.5),
        # An HTTP date has whole seconds: 7 s ahead of the (whole-second) virtual wall clock.
        ({"Retry-After": email.utils.formatdate(CLOCK.epoch + 7, usegmt=True)}, 7.0),
    ],
)
def test_retry_after_delays_that_request_only(headers: dict[str, str], wait: float) -> None:
    """The request that got Retry-After is not sent again before it; the client's other
    requests go on meanwhile (no client-wide hold)."""
    sent: list[tuple[str, float]] = []
    refused = False

    async def handler(request: TransportRequest) -> TransportResponse:
        nonlocal refused
        sent.append((request.path, CLOCK.now()))
        await CLOCK.sleep(0.01)
        if request.path == "/v1/slow" and not refused:
            refused = True
            return TransportResponse(503, headers, b"{}")
        return TransportResponse(200, {}, b"{}")

    transport, _ = make(handler, retry=RetryPolicy(initial_backoff=0.001))

    async def main() -> None:
        async def others() -> None:
            for _ in range(150):
                await transport.request("GET", "/v1/fast")
                await CLOCK.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(others)
            await transport.request("GET", "/v1/slow")
        await transport.aclose()

    virtual(main)
    slow = [t for path, t in sent if path == "/v1/slow"]
    assert len(slow) == 2
    assert slow[1] - slow[0] >= wait
    fast_meanwhile = [t for path, t in sent if path == "/v1/fast" and slow[0] < t < slow[1]]
    assert len(fast_meanwhile) >= int(wait / 0.06) - 1


def test_a_retry_after_beyond_the_cap_is_raised_at_once() -> None:
    transport, mock = make(
        answer(429, {"Retry-After": "120"}), retry=RetryPolicy(max_retry_after=10)
    )

    async def main() -> None:
        with pytest.raises(RateLimitError, match="more than max_retry_after=10 s") as caught:
            await get(transport)
        assert caught.value.retry_after == 120

    virtual(main)
    assert len(mock.requests) == 1


def test_total_time_across_retries_is_bounded() -> None:
    transport, mock = make(
        answer(503, {"retry-after-ms": "200"}),
        retry=RetryPolicy(max_retries=50, initial_backoff=0.001),
        timeouts=Timeouts(total=0.5),
    )

    async def main() -> float:
        started = CLOCK.now()
        with pytest.raises(InternalServerError, match=r"would pass the total timeout of 0\.5 s"):
            await get(transport)
        return CLOCK.now() - started

    elapsed = virtual(main)
    assert elapsed <= 0.5
    assert len(mock.requests) == 3  # at 0, 0.21 and 0.42 s


def test_no_attempt_outlives_the_total_timeout() -> None:
    async def slow(request: TransportRequest) -> TransportResponse:
        await CLOCK.sleep(5)
        return TransportResponse(200, {}, b"{}")

    transport, _ = make(slow, timeouts=Timeouts(request=60, total=0.4))

    async def main() -> float:
        started = CLOCK.now()
        with pytest.raises(APITimeoutError):
            await get(transport)
        return CLOCK.now() - started

    assert virtual(main) == pytest.approx(0.4, abs=0.01)


def test_one_idempotency_key_per_post_across_its_retries() -> None:
    calls = 0

    async def handler(request: TransportRequest) -> TransportResponse:
        nonlocal calls
        calls += 1
        return TransportResponse(503 if calls % 3 else 200, {"retry-after-ms": "1"}, b"{}")

    transport, mock = make(handler)

    async def main() -> None:
        await transport.request("POST", "/v1/run", json_body={"a": 1})
        await transport.request("POST", "/v1/run")
        await transport.aclose()

    virtual(main)
    keys = [r.headers["Idempotency-Key"] for r in mock.requests]
    assert len(keys) == 6
    assert len(set(keys[:3])) == 1
    assert len(set(keys[3:])) == 1
    assert keys[0] != keys[3]
    assert mock.requests[0].content == b'{"a":1}'


@pytest.mark.parametrize(
    ("exc", "error", "attempts"),
    [
        (ConnectionResetError("reset by peer"), APIConnectionError, 4),
        (TimeoutError(), APITimeoutError, 4),
        (ssl.SSLCertVerificationError(1, "self-signed certificate"), CertificateError, 1),
    ],
)
def test_failures_of_any_transport_are_mapped(
    exc: Exception, error: type[APIConnectionError], attempts: int
) -> None:
    async def handler(request: TransportRequest) -> TransportResponse:
        raise exc

    transport, mock = make(handler)

    async def main() -> None:
        with pytest.raises(error) as caught:
            await get(transport)
        assert type(caught.value) is error
        assert caught.value.attempts == attempts
        assert caught.value.path == "/v1/repo/r/targets/t/rollout"

    virtual(main)
    assert len(mock.requests) == attempts


def test_a_certificate_error_says_what_to_check() -> None:
    async def handler(request: TransportRequest) -> TransportResponse:
        raise ssl.SSLCertVerificationError(1, "certificate verify failed")

    transport, _ = make(handler)

    async def main() -> None:
        with pytest.raises(CertificateError, match=r"TLS certificate of bread\.test cannot be"):
            await get(transport)

    virtual(main)


def test_redirects_and_oversized_bodies_are_protocol_errors() -> None:
    transport, mock = make(answer(302, {"Location": f"https://evil.example/?k={KEY}"}))

    async def redirect() -> None:
        with pytest.raises(RedirectError) as caught:
            await get(transport)
        assert KEY not in str(caught.value)

    virtual(redirect)
    assert len(mock.requests) == 1

    transport, mock = make(answer(200, body=b"x" * 5000), limits=Limits(max_body_bytes=4096))

    async def large() -> None:
        with pytest.raises(ProtocolError, match="5,000 bytes, over the limit of 4,096"):
            await get(transport)

    virtual(large)
    assert len(mock.requests) == 1


def test_requests_per_second_ceiling_is_a_steady_pace() -> None:
    transport, _ = make(answer(200), limits=Limits(max_requests_per_second=50))
    stamps: list[float] = []

    async def main() -> None:
        async def one() -> None:
            await transport.request("GET", "/v1/x")
            stamps.append(CLOCK.now())

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        await transport.aclose()

    virtual(main)
    assert max(stamps) - min(stamps) == pytest.approx(19 / 50, abs=1e-6)


def test_in_flight_never_exceeds_max_concurrency() -> None:
    in_flight = peak = 0

    async def handler(request: TransportRequest) -> TransportResponse:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await CLOCK.sleep(0.05)
        in_flight -= 1
        return TransportResponse(200, {}, b"{}")

    transport, mock = make(handler, limits=Limits(max_concurrency=8))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(60):
                tg.start_soon(transport.request, "GET", "/v1/x")
        await transport.aclose()

    virtual(main)
    assert peak == 8
    assert len(mock.requests) == 60


def test_every_attempt_is_logged_without_the_key(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def handler(request: TransportRequest) -> TransportResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return TransportResponse(503, {"Retry-After": "2"}, f'{{"error": "{KEY}"}}'.encode())
        if calls == 2:
            raise ConnectionResetError(f"reset while sending {KEY}")
        return TransportResponse(200, {}, b"{}")

    transport, _ = make(handler)
    caplog.set_level(logging.DEBUG, logger="breadasync")
    virtual(lambda: get(transport, "/v1/x"))
    lines = [r.getMessage() for r in caplog.records if r.name == "breadasync"]
    assert lines[0] == "GET /v1/x -> 503 (attempt 1); retrying in 2.00 s"
    assert lines[1].startswith("GET /v1/x -> APIConnectionError: reset while sending *** ")
    assert "(attempt 2); retrying in " in lines[1]
    assert lines[2] == "GET /v1/x -> 200 (attempt 3, 2 bytes)"
    assert not any(KEY in line for line in lines)


def test_the_client_takes_a_transport() -> None:
    async def handler(request: TransportRequest) -> TransportResponse:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert request.url == "https://bread.test/v1/repo/r/bakes"
        return TransportResponse(200, {"Content-Type": "application/json"}, b'{"ok": true}')

    async def main() -> Any:
        async with BreadClient(KEY, "https://bread.test/v1", transport=MockTransport(handler)) as c:
            return await c.request("GET", "/v1/repo/r/bakes")

    assert virtual(main) == {"ok": True}


def test_a_recorded_request_shows_no_credentials() -> None:
    """A failed assertion on ``MockTransport.requests`` prints them: without the key."""

    async def main() -> TransportRequest:
        mock = MockTransport(answer(200, {"Content-Type": "application/json"}))
        async with BreadClient(KEY, "https://bread.test/v1", transport=mock) as c:
            await c.request("GET", "/v1/repo/r/bakes")
        return mock.requests[0]

    request = virtual(main)
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(request)
    assert KEY not in repr([request])
    assert "'Authorization': '***'" in repr(request)


STALL = 600.0
"""Seconds a stalled answer takes (as a read timeout of 60 s per attempt, times retries)."""


@pytest.mark.parametrize("phase", ["start", "poll"])
def test_poll_timeout_bounds_a_request_in_flight(phase: str) -> None:
    """``poll_timeout`` bounds the whole wait, a stalled request included: it is given up
    at the deadline, not when its answer (or its timeouts and retries) come."""

    async def handler(request: TransportRequest) -> TransportResponse:
        if phase == "start" or request.method == "GET":
            await anyio.sleep(STALL)
        body = b'{"status": "running", "lines": 1}'
        return TransportResponse(200, {"Content-Type": "application/json"}, body)

    async def main() -> tuple[PollTimeoutError, float]:
        started = anyio.current_time()
        async with BreadClient(KEY, "https://bread.test", transport=MockTransport(handler)) as c:
            with pytest.raises(PollTimeoutError) as caught:
                await c.targets.rollout.run("t", repo_name="r", poll_timeout=2)
        return caught.value, anyio.current_time() - started

    error, took = virtual(main)
    assert took < STALL / 10  # virtual seconds: the deadline, not the stalled answer
    if phase == "start":
        assert "the start request was not answered" in str(error)
        assert "may or may not have started" in str(error)
    else:
        assert "still running (1 lines) when poll_timeout=2" in str(error)


@pytest.mark.parametrize(
    ("states", "ending"),
    [
        (["PENDING", " Running ", "COMPLETE"], "complete"),
        (["running", "Cancelled"], "ended cancelled after 1 lines"),
        (["queued", "queued", "failed"], "failed after 1 lines"),
    ],
)
def test_job_states_are_read_whatever_their_case_and_a_cancel_ends_the_wait(
    states: list[str], ending: str
) -> None:
    """A state in capitals or padded is the state; ``cancelled`` (and the like) is a stop,
    so the wait ends instead of polling forever; an unknown state (``queued``) is waited
    through."""
    answers = iter(states)

    async def handler(request: TransportRequest) -> TransportResponse:
        body = orjson.dumps({"status": next(answers), "lines": 1, "error": None})
        return TransportResponse(200, {"Content-Type": "application/json"}, body)

    async def main() -> JobStatus | JobFailedError:
        async with BreadClient(KEY, "https://bread.test", transport=MockTransport(handler)) as c:
            try:
                return await c.targets.rollout.run("t", repo_name="r", poll_timeout=600)
            except JobFailedError as exc:
                return exc

    outcome = virtual(main)
    if isinstance(outcome, JobFailedError):
        assert outcome.job.is_failed
        assert outcome.job.is_terminal
        assert ending in str(outcome)
    else:
        assert outcome.is_complete
        assert ending == outcome.status


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_the_retry_budget_bounds_retries_to_a_share_of_first_attempts() -> None:
    clock = _Clock()
    budget = RetryBudget(clock)
    taken = 0
    while budget.withdraw() == 0:
        taken += 1
    assert taken == RETRY_BURST  # the bank, then nothing
    for _ in range(100):
        budget.deposit()  # 100 first attempts earn 20 retries
    assert sum(budget.withdraw() == 0 for _ in range(50)) == round(100 * RETRY_RATIO)
    assert budget.withdraw() == pytest.approx(1 / RETRY_PER_SECOND)
    clock.t += 1.0  # and time earns RETRY_PER_SECOND a second
    assert sum(budget.withdraw() == 0 for _ in range(50)) == RETRY_PER_SECOND


def test_a_read_retries_soon_once_then_follows_the_schedule() -> None:
    """A GET that failed without Retry-After retries after ``first_read_backoff`` (one flaky
    answer), then on the schedule one step later; with Retry-After, and for a POST, the
    schedule is unchanged (Retry-After its floor)."""
    policy = RetryPolicy(max_retries=4, initial_backoff=0.5, max_backoff=8, jitter=0.0)

    def gaps(
        method: str, headers: dict[str, str] | None = None, retry: RetryPolicy = policy
    ) -> list[float]:
        sent: list[float] = []

        async def handler(request: TransportRequest) -> TransportResponse:
            sent.append(CLOCK.now())
            return TransportResponse(500, headers or {}, b"{}")

        transport, _ = make(handler, retry=retry)

        async def main() -> None:
            with pytest.raises(APIStatusError):
                await transport.request(method, "/v1/x")
            await transport.aclose()

        virtual(main)
        return [round(b - a, 6) for a, b in itertools.pairwise(sent)]

    assert gaps("GET") == [0.05, 0.5, 1.0, 2.0]
    assert gaps("POST") == [0.5, 1.0, 2.0, 4.0]
    assert gaps("GET", {"Retry-After": "1"}) == [1.0, 1.0, 2.0, 4.0]
    assert gaps("POST", {"Retry-After": "1"}) == [1.0, 1.0, 2.0, 4.0]
    # A first_read_backoff above initial_backoff changes nothing.
    quick = RetryPolicy(max_retries=2, initial_backoff=0.01, jitter=0.0)
    assert gaps("GET", retry=quick) == [0.01, 0.02]


def test_caller_slots_are_held_by_attempts_not_by_waits() -> None:
    """A caller's own cap (the exporter's ``concurrency``) passed as ``slots`` bounds the
    attempts in flight, and a request waiting out its Retry-After leaves its slot free:
    with one slot, a second request goes out during the first one's wait."""
    slots = anyio.CapacityLimiter(1)
    sent: list[tuple[str, float]] = []
    in_flight = peak = 0
    refused = False

    async def handler(request: TransportRequest) -> TransportResponse:
        nonlocal in_flight, peak, refused
        in_flight += 1
        peak = max(peak, in_flight)
        sent.append((request.path, CLOCK.now()))
        await CLOCK.sleep(0.01)
        in_flight -= 1
        if request.path == "/v1/slow" and not refused:
            refused = True
            return TransportResponse(503, {"Retry-After": "2"}, b"{}")
        return TransportResponse(200, {}, b"{}")

    transport, _ = make(handler)

    async def main() -> None:
        async def fast() -> None:
            await CLOCK.sleep(0.1)  # after the slow one's first answer
            for _ in range(10):
                await transport.request("GET", "/v1/fast", slots=slots)

        async with anyio.create_task_group() as tg:
            tg.start_soon(fast)
            await transport.request("GET", "/v1/slow", slots=slots)
        await transport.aclose()

    virtual(main)
    assert peak == 1
    slow = [t for path, t in sent if path == "/v1/slow"]
    fast_times = [t for path, t in sent if path == "/v1/fast"]
    assert slow[1] - slow[0] >= 2.0
    assert len(fast_times) == 10
    assert all(slow[0] < t < slow[1] for t in fast_times)
