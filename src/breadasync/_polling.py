"""Adaptive polling: when to ask a running job for its status next (the pure schedule; the
watch engine in ``_fanout`` sends the polls)."""

from __future__ import annotations

import random

from ._config import PollPolicy
from ._models import JobStatus

LAG_RATIO = 0.25
"""The next poll comes at most this fraction of the time watched so far after the last one,
so a job that says nothing about its progress is still seen complete within about a quarter
of its age (a 6 s job within ~1.5 s), while a long job is polled ever more rarely."""


class PollSchedule:
    """The poll intervals of one job.

    Intervals start at ``policy.initial`` and grow by ``policy.factor`` up to
    ``policy.maximum``, but never beyond :data:`LAG_RATIO` of the time the job has been
    watched (and never below ``policy.initial`` for that reason): the service may report no
    progress at all (only ``lines``, or ``lines`` 0 until the end), and then the job's age is
    the only guide. When the job does report progress (``progress_percent``, or ``lines``
    against ``total_expected``), the rate between two readings gives an estimate of when it
    will finish, and the next poll comes no later than that. Jitter spreads many schedules
    apart.
    """

    __slots__ = ("_eta", "_first", "_interval", "_last", "_read_at", "_rng", "policy", "polls")

    def __init__(self, policy: PollPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.polls = 0
        self._interval: float | None = None
        self._last: tuple[float, float] | None = None
        self._read_at: float | None = None
        self._first: float | None = None
        self._eta: float | None = None
        self._rng = rng or random.Random()

    def observe(self, status: JobStatus, now: float) -> None:
        """Record a status read at time ``now`` (seconds, any monotonic clock)."""
        progress = status.progress
        previous_read, self._read_at = self._read_at, now
        if self._first is None:
            self._first = now
        if progress is None:
            self._eta = None
            return
        last = self._last
        if last is not None and progress > last[1] and now > last[0]:
            rate = (progress - last[1]) / (now - last[0])
            self._eta = (100.0 - progress) / rate
        elif self._eta is not None and previous_read is not None:
            # No progress since the last reading: the estimate still holds, aged by the time
            # since that reading; once it has passed, it no longer guides the next poll.
            remaining = self._eta - (now - previous_read)
            self._eta = remaining if remaining > 0 else None
        if last is None or progress != last[1]:
            self._last = (now, progress)

    def next_delay(self) -> float:
        """Seconds to wait before the next poll."""
        policy = self.policy
        if self._interval is None:
            delay = policy.initial
        else:
            delay = min(policy.maximum, self._interval * policy.factor)
        if self._first is not None and self._read_at is not None:
            age = self._read_at - self._first
            delay = min(delay, max(policy.initial, age * LAG_RATIO))
        if self._eta is not None:
            # Aim just past the estimated finish.
            delay = min(delay, self._eta * 1.05)
        delay = min(policy.maximum, max(policy.minimum, delay))
        self._interval = delay
        self.polls += 1
        if policy.jitter:
            # Only ever later: an early poll before an estimated finish would be wasted.
            delay *= 1.0 + policy.jitter * self._rng.random()
        return delay
