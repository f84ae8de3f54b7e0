"""The adaptive poll schedule, and the pure retry arithmetic, without a clock."""

from __future__ import annotations

import itertools
import random
import statistics
from email.utils import formatdate

import pytest

from breadasync import ConfigError, JobState, JobStatus, PollPolicy, RetryPolicy
from breadasync._polling import PollSchedule
from breadasync._retry import backoff, is_retryable_status, parse_retry_after

POLICY = PollPolicy(initial=1, maximum=30, minimum=0.25, factor=1.5, jitter=0)


def running(percent: float | None) -> JobStatus:
    return JobStatus(JobState.RUNNING, progress_percent=percent)


def test_intervals_grow_geometrically_to_the_maximum() -> None:
    schedule = PollSchedule(POLICY)
    delays = []
    now = 0.0
    for _ in range(30):
        schedule.observe(running(None), now)
        delays.append(schedule.next_delay())
        now += delays[-1]
    # Early on, a quarter of the time watched caps the growth (and the initial 1 s floors it).
    assert delays[:5] == [1, 1, 1, 1, 1]
    assert delays[5] == pytest.approx(1.25)
    for earlier, later in itertools.pairwise(delays):
        assert earlier <= later <= earlier * POLICY.factor
    assert delays[-1] == 30
    assert schedule.polls == 30


def _simulate(durations: list[float], seed: int) -> tuple[list[int], list[float]]:
    """Polls and detection lag of jobs that report nothing but their state, on a virtual
    clock: each job is read at 0 (its start) and then whenever the schedule says."""
    rng = random.Random(seed)
    polls, lags = [], []
    for duration in durations:
        schedule = PollSchedule(PollPolicy(), random.Random(rng.random()))
        now, count = 0.0, 0
        # ``lines`` 0 until the end, no percent, no total: nothing to predict with.
        schedule.observe(JobStatus(JobState.RUNNING, lines=0), now)
        while True:
            now += schedule.next_delay()
            count += 1
            if now >= duration:
                break
            schedule.observe(JobStatus(JobState.RUNNING, lines=0), now)
        polls.append(count)
        lags.append(now - duration)
    return polls, lags


def test_jobs_without_progress_are_seen_complete_soon_with_few_polls() -> None:
    # Issue 12's fan-out: 300 jobs of 1-6 s that report only lines (or 0 lines to the end).
    rng = random.Random(12)
    durations = [rng.uniform(1, 6) for _ in range(300)]
    polls, lags = _simulate(durations, seed=3)
    assert max(d + lag for d, lag in zip(durations, lags, strict=True)) <= max(durations) + 2
    assert max(lags) <= 2
    assert statistics.median(polls) <= 20
    # and in fact far fewer: the schedule is not polling every 0.25 s to get there
    assert statistics.median(polls) <= 8


def test_lines_without_a_total_do_not_predict_a_finish() -> None:
    schedule = PollSchedule(PollPolicy(initial=1, jitter=0))
    schedule.observe(JobStatus(JobState.RUNNING, lines=10), 0)
    schedule.next_delay()
    schedule.observe(JobStatus(JobState.RUNNING, lines=5000), 1)
    # No total: lines alone say nothing about the end, so no early "estimated finish" poll.
    assert schedule.next_delay() == 1


def test_a_long_silent_job_is_polled_ever_more_rarely() -> None:
    polls, lags = _simulate([3600.0], seed=1)
    assert polls[0] < 160  # 30 s apart once grown (plus jitter), not every second
    assert lags[0] <= 30 * 1.1


def test_progress_brings_the_next_poll_to_the_estimated_finish() -> None:
    schedule = PollSchedule(PollPolicy(initial=10, maximum=30, jitter=0))
    schedule.observe(running(0), 0.0)
    assert schedule.next_delay() == 10
    schedule.observe(running(80), 8.0)  # 10 %/s: 2 s to go, sooner than the next 15 s
    assert schedule.next_delay() == pytest.approx(2 * 1.05)


def test_progress_beyond_100_percent_does_not_keep_polls_at_the_minimum() -> None:
    """A service that counts past 100 (say, lines in ``progress_percent``) guides the
    schedule only as far as "done": one early poll, then the usual backoff, not a poll at
    the minimum interval for as long as the count grows."""
    schedule = PollSchedule(PollPolicy(initial=10, maximum=30, minimum=0.25, jitter=0))
    now, delays = 0.0, []
    for percent in (0, 50, 300, 900, 1500, 2100, 2700, 3300):
        schedule.observe(running(percent), now)
        delays.append(schedule.next_delay())
        now += delays[-1]
    assert delays.count(0.25) == 1, delays
    after = delays[delays.index(0.25) :]
    assert all(a < b for a, b in itertools.pairwise(after)), delays
    assert (running(250).progress, running(250).progress_percent) == (100.0, 250)
    assert running(-5).progress == 0.0


def test_stalled_progress_ages_the_estimate() -> None:
    schedule = PollSchedule(PollPolicy(initial=10, maximum=30, jitter=0))
    schedule.observe(running(0), 0)
    schedule.next_delay()
    schedule.observe(running(50), 10)  # 5 %/s: 10 s to go
    schedule.observe(running(50), 14)  # no news since: about 6 s to go
    assert schedule.next_delay() == pytest.approx(6 * 1.05)


def test_a_long_job_is_polled_rarely() -> None:
    schedule = PollSchedule(POLICY)
    now = 0.0
    polls = 0
    while now < 1800:  # a 30-minute rollout, 1/18 % per second
        schedule.observe(running(now / 18), now)
        now += schedule.next_delay()
        polls += 1
    assert polls < 80  # ~30 s apart once grown, not every second


def test_jitter_only_delays() -> None:
    policy = PollPolicy(initial=1, jitter=0.2)
    delays = [PollSchedule(policy, random.Random(i)).next_delay() for i in range(200)]
    assert min(delays) >= 1
    assert max(delays) <= 1.2
    assert len(set(delays)) > 100


@pytest.mark.parametrize(
    "kwargs", [{"initial": 0}, {"minimum": 40}, {"factor": 0.5}, {"jitter": 1.5}]
)
def test_bad_poll_policies(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        PollPolicy(**kwargs)


def test_retryable_statuses() -> None:
    assert all(is_retryable_status(s, {}) for s in (408, 429, 500, 502, 503, 504, 599))
    assert not any(is_retryable_status(s, {}) for s in (400, 401, 402, 403, 404, 409, 422, 418))
    assert not is_retryable_status(503, {"x-should-retry": "false"})
    assert is_retryable_status(418, {"x-should-retry": "true"})
    assert not is_retryable_status(404, {"x-should-retry": "true"})


def test_retry_after_parsing() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": "3"}) == 3
    assert parse_retry_after({"Retry-After": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "nope", "Retry-After": "2"}) == 2
    assert parse_retry_after({"Retry-After": formatdate(1000.0 + 7, usegmt=True)}, now=1000.0) == 7
    assert parse_retry_after({"Retry-After": formatdate(900.0, usegmt=True)}, now=1000.0) == 0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({"Retry-After": "-1"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize("value", ["1_0", "+5", "1e1", "\u0665", "inf", "nan", "0x10", " "])
def test_retry_after_that_is_not_delay_seconds_is_unreadable(value: str) -> None:
    """Only digits (and a decimal fraction) are seconds; what ``float`` alone would read
    (``1_0`` as 10, Arabic-Indic digits) is not a wait the service asked for."""
    assert parse_retry_after({"Retry-After": value}) is None
    assert parse_retry_after({"retry-after-ms": value, "Retry-After": "2"}) == 2


def test_retry_after_too_long_for_a_float_is_unreadable() -> None:
    assert parse_retry_after({"retry-after-ms": "9" * 400, "Retry-After": "2"}) == 2
    assert parse_retry_after({"Retry-After": "9" * 400}) is None


def test_retry_after_in_every_http_date_form() -> None:
    """RFC 9110's three date forms, all GMT (the asctime one says so by convention only)."""
    for form in ("Thu, 01 Jan 1970 00:16:47 GMT", "Thursday, 01-Jan-70 00:16:47 GMT"):
        assert parse_retry_after({"Retry-After": form}, now=1000.0) == 7
    assert parse_retry_after({"Retry-After": "Thu Jan  1 00:16:47 1970"}, now=1000.0) == 7


def test_backoff_is_exponential_capped_jittered_and_floored() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=8, jitter=0.25)
    rng = random.Random(1)
    waits = [backoff(policy, n, None, rng) for n in range(8)]
    for n, wait in enumerate(waits):
        base = min(8, 0.5 * 2**n)
        assert base * 0.75 <= wait <= base
    assert backoff(policy, 0, 5.0, rng) == 5.0


def test_a_stalled_estimate_ages_by_reading_and_then_stops_guiding() -> None:
    schedule = PollSchedule(PollPolicy(initial=10, maximum=30, minimum=0.25, jitter=0))
    schedule.observe(running(0), 0)
    schedule.next_delay()
    schedule.observe(running(10), 100)  # 0.1 %/s: 900 s to go
    for now in (200, 300, 400):  # no progress since
        schedule.observe(running(10), now)
    assert schedule.next_delay() == pytest.approx(min(15, 600 * 1.05))
    for now in range(500, 1300, 100):
        schedule.observe(running(10), now)
    # The estimate has passed without the job finishing: plain backoff, not 4 polls a second.
    assert schedule.next_delay() > 1


async def test_a_cut_counts_requests_that_leave_after_it() -> None:
    from breadasync._limits import AdaptiveConcurrency

    limiter = AdaptiveConcurrency(8)
    early = await limiter.acquire()
    limiter.pushed_back(early)  # cut: 8 -> 4
    late = await limiter.acquire()  # queued or not, it leaves after the cut
    limiter.pushed_back(late)  # so it cuts again: 4 -> 2
    assert limiter.limit == 2
    assert limiter.cuts == 2
    limiter.release(early)
    limiter.release(late)
