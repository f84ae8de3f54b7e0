"""How hard one client pushes the service: the :class:`Governor` decides when each attempt
may leave, and learns from every answer.

Three mechanisms, each taken from a published design and kept apart so each can be reasoned
about (and tested on virtual time):

* **A pace that rides a rate limit** (AWS SDKs' ``adaptive`` retry mode). A token bucket
  (:class:`Pacer`) paces sends once the service has said "too fast"; its rate follows CUBIC
  (:class:`CubicRate`): on a 429 it drops to ``BETA`` (0.7) of the rate actually being sent,
  then grows as ``C*(t-K)**3 + W_max`` (``C`` = 0.4), flat near the rate that was throttled
  and probing beyond it only slowly, so the client stays just under an unknown limit instead
  of oscillating into it. As in TCP, one cut per round trip: only an answer to a request sent
  after the last cut cuts again. A rate that has grown to twice the last throttled rate
  without a new 429 is dropped: the limit is gone. Unlike AWS's bucket, a 503 alone does
  not cut (isolated 5xx from one flaky instance are not a reason to slow the whole client)
  and the rate is not capped at twice the measured rate, so it recovers in seconds.
* **Overload detection** (Google SRE book, "Handling Overload": client-side adaptive
  throttling with ``K`` = 2). When at least ``OVERLOAD_MIN_ANSWERS`` answers of the last
  ``OVERLOAD_WINDOW`` seconds are in, and half or more of them are failures (5xx, dropped
  connections, timeouts), the service as a whole is refusing work: the pace is cut like on
  a 429, and every further failure cuts again (once per round trip) down to ``MIN_RATE``
  request per second, until ``OVERLOAD_EXIT_STREAK`` answers in a row are accepted. (The
  concurrency cap stays where it is: halving it, as this client did before, took thousands
  of answers to undo after a short outage; the pace alone bounds the load.) Instead of
  rejecting requests locally as SRE does, requests wait for their turn, so a call survives
  an outage shorter than its timeout.
  Recovery grows back toward the rate before the overload along the same cubic.
* **A retry budget** (Finagle's ``RetryBudget``; AWS ``standard`` mode's retry quota).
  Retries may add at most ``RETRY_RATIO`` (20%) to the first attempts, plus a trickle of
  ``RETRY_PER_SECOND``, banked up to ``RETRY_BURST``; a retry that is answered gives its
  token back (AWS's refund), so only retries that keep failing drain it. A retry beyond the
  budget waits for it rather than failing, so a retry storm cannot multiply the load.

``Retry-After`` is not here: it delays only the request that received it (see
:mod:`breadasync._transport`).

Bounds these give (checked in ``tests/test_transport_governor.py`` on virtual time, seeded):
with 64 callers against a service that answers every request with 503 for 10 s, the client
sends at most 250 requests in those 10 s (183 measured: 64 a second while the first
Retry-Afters run, then about one a second); within 4 s of the start of a total outage
the pace is ``MIN_RATE``; in the first second after the service returns the client sends
at least 35% of its earlier rate, and 90% in the next. Under an unknown limit of R = 50,
300 or 1000 requests/s it sends at least 0.85 R from 5 s on, under 2% of it throttled.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

import anyio

from ._clock import Clock

BETA = 0.7
"""CUBIC's multiplicative decrease: the pace after a cut, as a share of the pace before."""
CUBIC_C = 0.4
"""CUBIC's scaling constant (requests/s per s³), as in AWS's adaptive mode."""
MIN_RATE = 1.0
"""The slowest pace, requests per second: one probe a second during an outage."""
OVERLOAD_WINDOW = 2.0
"""Seconds of answers the overload share is computed over..."""
OVERLOAD_WINDOW_ANSWERS = 100
"""...and at most this many of the latest answers, so a busy client notices at once."""
OVERLOAD_EXIT_STREAK = 3
"""Accepted answers in a row that end an overload."""
OVERLOAD_MIN_ANSWERS = 20
"""Answers needed in the window before their share counts as evidence of overload."""
OVERLOAD_SHARE = 0.5
"""Failures at or above this share of recent answers are overload (SRE's K = 2)."""
SEND_WINDOW = 1.0
"""Seconds over which the rate actually sent is measured."""
PEAK_SECONDS = 5
"""How far back the pace before an overload is looked for."""
RECOVERY_SECONDS = 3.0
"""After overload, the pace is back at its earlier level within this many seconds (CUBIC's
curve, compressed)."""
QUIET_SECONDS = 30.0
"""Without pushback for this long, and grown to twice the last throttled rate, the pace is
dropped: the limit is gone."""
RETRY_RATIO = 0.2
"""Retries allowed per first attempt (Finagle's ``percentCanRetry``)."""
RETRY_PER_SECOND = 5.0
"""Retries allowed per second whatever the traffic."""
RETRY_BURST = 100.0
"""Retries that can be banked (AWS's quota of 500 at 5 per retry)."""


class Verdict(enum.Enum):
    """What one answer says about the service."""

    ACCEPTED = "accepted"
    """It answered (2xx, or a permanent 4xx: the request was wrong, not the service)."""
    THROTTLED = "throttled"
    """429: this key is over its rate."""
    FAILED = "failed"
    """5xx (503 included), a dropped connection, a timeout."""


class Slot:
    """Permission for one request to be in flight; give it back with ``release``."""

    __slots__ = ("generation",)

    def __init__(self, generation: int) -> None:
        self.generation = generation


class AdaptiveConcurrency:
    """A cap on requests in flight, which can give way under pushback (``pushed_back``).

    The :class:`Governor` uses it as a fixed cap and lowers the pace instead (see the module
    docstring); the AIMD window stays available to callers that cap by concurrency.

    An anyio :class:`~anyio.CapacityLimiter` holds the tokens; its size follows an AIMD
    window: overload halves it (once per round trip: only answers to requests sent after the
    last cut count), and each accepted answer grows it by ``1/window``, so about one more
    slot per window of successes, never above ``maximum``.
    """

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._window = float(maximum)
        self._limiter = anyio.CapacityLimiter(maximum)
        self._generation = 0
        self.cuts = 0
        """How many times the window was cut."""

    @property
    def limit(self) -> int:
        """Requests allowed in flight right now."""
        return int(self._limiter.total_tokens)

    @property
    def in_flight(self) -> int:
        """Requests in flight right now."""
        return self._limiter.borrowed_tokens

    async def acquire(self) -> Slot:
        """Wait for room; the returned slot must be released."""
        slot = Slot(-1)
        await self._limiter.acquire_on_behalf_of(slot)
        # Stamped as the request leaves, not when it started waiting: a request queued
        # before a cut but sent after it is fresh evidence.
        slot.generation = self._generation
        return slot

    def release(self, slot: Slot) -> None:
        """Give the slot back."""
        self._limiter.release_on_behalf_of(slot)

    def succeeded(self) -> None:
        """An accepted answer: grow the window a little."""
        if self._window < self.maximum:
            self._window = min(float(self.maximum), self._window + 1.0 / self._window)
            self._apply()

    def pushed_back(self, slot: Slot) -> None:
        """Overload: halve the window, unless it was already cut since this request left."""
        if slot.generation < self._generation:
            return
        self._generation += 1
        self.cuts += 1
        self._window = max(1.0, self._window / 2)
        self._apply()

    def _apply(self) -> None:
        tokens = max(1, math.floor(self._window))
        if tokens != self._limiter.total_tokens:
            self._limiter.total_tokens = tokens


class Pacer:
    """A token bucket that paces sends, first come first served; ``rate=None`` lets every
    send through at once. A raised rate wakes the waiting sender at once."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.rate: float | None = None
        self._burst = 1.0
        self._tokens = 1.0
        self._stamp = -math.inf
        self._lock = anyio.Lock()
        self._changed: anyio.Event | None = None
        self.waited_at = -math.inf
        """When a send last had to wait for its turn (the pace was what held it back)."""

    def set_rate(self, rate: float | None, burst: float = 1.0) -> None:
        """Pace at ``rate`` sends per second with ``burst`` sends banked at most."""
        raised = rate is None or (self.rate is not None and rate > self.rate)
        if self._stamp > -math.inf:  # not before first use: there may be no event loop yet
            self._refill()
        if self.rate is None and rate is not None:
            self._tokens = min(self._tokens, 1.0)
        self.rate, self._burst = rate, max(1.0, burst)
        self._tokens = min(self._tokens, self._burst)
        if raised and self._changed is not None:
            self._changed.set()
            self._changed = None

    def _refill(self) -> None:
        now = self._clock.now()
        if self.rate is not None and now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self) -> None:
        """Wait for this send's turn."""
        if self.rate is None and not self._lock.locked():
            return
        async with self._lock:
            while True:
                self._refill()
                if self.rate is None:
                    return
                # A hair short of a token counts: a wait below the clock's resolution would
                # never see time move.
                if self._tokens >= 1.0 - 1e-9:
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                self.waited_at = self._stamp
                if self._changed is None:
                    self._changed = anyio.Event()
                changed = self._changed
                # Never below a microsecond: a shorter timer can fire before time moves.
                with anyio.move_on_after(max((1.0 - self._tokens) / self.rate, 1e-6)):
                    await changed.wait()


class CubicRate:
    """The pace learnt from pushback: ``None`` until the service pushes back, then CUBIC."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.overloaded = False
        """Whether the last cut was overload (not a 429) and answers are still mostly bad."""
        self.cuts = 0
        self._w_max = 0.0
        self._k = 0.0
        self._c = CUBIC_C
        self._epoch = 0.0
        self.cut_at = -math.inf
        """When the pace was last cut."""

    def cut(self, now: float, sent_at: float, measured: float, *, overload: bool) -> bool:
        """Pushback seen on a request sent at ``sent_at``: lower the pace, unless it was
        already lowered since that request left. ``measured`` is the rate actually sent (the
        pace when the pace is what holds sends back). Returns whether it cut."""
        if sent_at < self.cut_at:
            return False
        base = measured if self.rate is None else min(self.rate, measured)
        base = max(base, MIN_RATE)
        if not (overload and self.overloaded):
            # During an overload the peak to grow back to is the pace before it began.
            self._w_max = base
        self.overloaded = overload
        self.rate = max(MIN_RATE, base * BETA)
        self.cut_at = now
        self._restart(now)
        self.cuts += 1
        return True

    def _restart(self, now: float) -> None:
        assert self.rate is not None
        self._epoch = now
        gap = max(0.0, self._w_max - self.rate)
        self._c = CUBIC_C
        self._k = math.cbrt(gap / CUBIC_C)
        if self.overloaded and self._k > RECOVERY_SECONDS:
            # After an outage the pace climbs back to where it was within seconds, not the
            # ten or more that CUBIC's constant would take from the floor.
            self._k = RECOVERY_SECONDS
            self._c = gap / RECOVERY_SECONDS**3

    def failed(self, now: float) -> None:
        """A failure during an overload: growth starts again from here."""
        if self.overloaded and self.rate is not None:
            self._restart(now)

    def grow(self, now: float) -> None:
        """An accepted answer: follow the cubic up; drop the pace once it has doubled the
        last throttled rate without new pushback."""
        if self.rate is None:
            return
        target = self._c * (now - self._epoch - self._k) ** 3 + self._w_max
        if target > self.rate:
            self.rate = target
        if target > 2 * self._w_max and now - self.cut_at > QUIET_SECONDS:
            self.rate = None
            self.overloaded = False


class RetryBudget:
    """Retries allowed: ``RETRY_RATIO`` per first attempt plus ``RETRY_PER_SECOND``, banked up
    to ``RETRY_BURST``."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._balance = RETRY_BURST
        self._stamp = -math.inf
        self.waits = 0
        """Retries that had to wait for the budget."""

    def _refill(self) -> None:
        now = self._clock.now()
        if now > self._stamp:
            if self._stamp > -math.inf:
                gained = (now - self._stamp) * RETRY_PER_SECOND
                self._balance = min(RETRY_BURST, self._balance + gained)
            self._stamp = now

    def deposit(self) -> None:
        """A first attempt: it earns ``RETRY_RATIO`` of a retry."""
        self._balance = min(RETRY_BURST, self._balance + RETRY_RATIO)

    def refund(self) -> None:
        """A retry that was answered: its token comes back."""
        self._balance = min(RETRY_BURST, self._balance + 1.0)

    def withdraw(self) -> float:
        """Take one retry: 0 if taken, else the seconds until the trickle brings one."""
        self._refill()
        if self._balance >= 1.0 - 1e-9:
            self._balance = max(0.0, self._balance - 1.0)
            return 0.0
        return max((1.0 - self._balance) / RETRY_PER_SECOND, 1e-3)


@dataclass(slots=True)
class Ticket:
    """One admitted attempt: its concurrency slot and when it left."""

    slot: Slot
    sent_at: float
    retry: bool = False


class Governor:
    """Admits each attempt (retry budget, pace, concurrency) and learns from its answer.

    Args:
        max_concurrency: The ceiling of requests in flight.
        max_rate: A fixed ceiling of requests per second (the user's), or ``None``.
        clock: Where time comes from.
    """

    def __init__(self, *, max_concurrency: int, max_rate: float | None, clock: Clock) -> None:
        self._clock = clock
        self._ceiling = max_rate
        self.concurrency = AdaptiveConcurrency(max_concurrency)
        self.cubic = CubicRate()
        self.pacer = Pacer(clock)
        self.budget = RetryBudget(clock)
        self._sends: deque[float] = deque()
        self._seconds: deque[list[int]] = deque()
        self._first_send = math.inf
        self._answers: deque[tuple[float, bool]] = deque()
        self._bad = 0
        self._streak = 0
        self._apply()

    @property
    def rate(self) -> float | None:
        """The pace now (requests per second), or ``None``: unpaced."""
        return self.pacer.rate

    async def admit(self, *, retry: bool) -> Ticket:
        """Wait until this attempt may leave; a retry first waits for the retry budget."""
        if retry:
            while (wait := self.budget.withdraw()) > 0:
                self.budget.waits += 1
                await self._clock.sleep(wait)
        else:
            self.budget.deposit()
        await self.pacer.acquire()
        slot = await self.concurrency.acquire()
        now = self._clock.now()
        self._sends.append(now)
        self._first_send = min(self._first_send, now)
        second = math.floor(now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += 1
        else:
            self._seconds.append([second, 1])
        return Ticket(slot, now, retry)

    def peak_rate(self, now: float) -> float:
        """The most requests sent in one whole second of the last ``PEAK_SECONDS``, or the
        measured rate if higher: what an overload interrupted, to grow back to."""
        while self._seconds and self._seconds[0][0] < now - PEAK_SECONDS:
            self._seconds.popleft()
        whole = [count for second, count in self._seconds if second + 1 <= now]
        return max([self.measured_rate(now), *whole])

    def measured_rate(self, now: float) -> float:
        """Requests per second actually sent: the pace, while it holds sends back; else the
        sends of the last ``SEND_WINDOW`` seconds."""
        if self.pacer.rate is not None and now - self.pacer.waited_at < SEND_WINDOW / 2:
            return self.pacer.rate
        sends = self._sends
        while sends and sends[0] < now - SEND_WINDOW:
            sends.popleft()
        span = min(SEND_WINDOW, max(now - self._first_send, 0.05))
        return len(sends) / span

    def finish(self, ticket: Ticket, verdict: Verdict | None) -> None:
        """Give the slot back and learn from the answer (``None``: nothing to learn, e.g.
        the attempt was cancelled)."""
        self.concurrency.release(ticket.slot)
        if verdict is None:
            return
        now = self._clock.now()
        share = self._record(now, verdict is Verdict.FAILED)
        cubic = self.cubic
        if verdict is not Verdict.ACCEPTED:
            self._streak = 0
        elif ticket.sent_at >= cubic.cut_at:
            # Only answers to requests sent after the last cut say the service is back.
            self._streak += 1
        if verdict is Verdict.ACCEPTED:
            if ticket.retry:
                # A retry that worked gives its token back (AWS's refund): the budget only
                # drains while retries keep failing.
                self.budget.refund()
            if cubic.overloaded and self._streak >= OVERLOAD_EXIT_STREAK:
                cubic.overloaded = False
            cubic.grow(now)
        elif verdict is Verdict.THROTTLED:
            cubic.cut(now, ticket.sent_at, self.measured_rate(now), overload=False)
        else:
            overload = cubic.overloaded or (
                len(self._answers) >= OVERLOAD_MIN_ANSWERS and share >= OVERLOAD_SHARE
            )
            # Cut once per round trip; a failure in a later part of the round only delays
            # the regrowth.
            # An overload's first cut remembers the pace before it (failures back off, so
            # the last second may already be quiet); further cuts follow the pace itself.
            measured = self.measured_rate(now) if cubic.overloaded else self.peak_rate(now)
            if overload and not cubic.cut(now, ticket.sent_at, measured, overload=True):
                cubic.failed(now)
        self._apply()

    def _record(self, now: float, bad: bool) -> float:
        answers = self._answers
        answers.append((now, bad))
        self._bad += bad
        while len(answers) > OVERLOAD_WINDOW_ANSWERS or answers[0][0] < now - OVERLOAD_WINDOW:
            self._bad -= answers.popleft()[1]
        return self._bad / len(answers)

    def _apply(self) -> None:
        rate = self.cubic.rate
        if self._ceiling is not None and (rate is None or self._ceiling <= rate):
            # The user's pace is strict: one send per interval, nothing banked.
            self.pacer.set_rate(self._ceiling, 1.0)
        elif rate != self.pacer.rate:
            # Nothing banked: a service whose bucket holds one token (nginx's limit_req
            # without burst) answers two sends close together with a 429, and each such
            # 429 cuts the pace again (measured: 0.28 R with 20 ms banked, 0.5 R without).
            # After an overload nothing holds a bucket that tight, so 20 ms of sends stay
            # banked and a late wake-up of the event loop costs the recovery nothing.
            banked = rate / 50 if rate is not None and self.cubic.overloaded else 1.0
            self.pacer.set_rate(rate, banked)
