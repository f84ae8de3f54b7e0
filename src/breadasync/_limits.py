"""How hard one client pushes the service: the :class:`Governor` decides when each attempt
may leave, and learns from every answer.

Three mechanisms, each taken from a published design and kept apart so each can be reasoned
about (and tested on virtual time):

* **A pace that rides a rate limit** (AWS SDKs' ``adaptive`` retry mode). A token bucket
  (:class:`Pacer`) paces sends once the service has said "too fast"; its rate follows CUBIC
  (:class:`CubicRate`). The pace is cut to ``BETA`` (0.7) of itself when 429s pass
  ``THROTTLE_SHARE`` (2%) of recent answers, not on each 429: a one-token bucket answers
  429 to two sends that met it close together (network and event-loop jitter) at any pace,
  and a cut per such 429 ratchets the pace down to a fraction of the limit. It then grows
  as ``C*(t-K)**3 + W_max``, scaled to be back at the rate it was cut from after
  ``REGROW_SECONDS``, flat there and probing beyond it ever faster, so the client stays
  just under an unknown limit and finds a raised one within seconds, at any R. One cut per
  round trip, as in TCP. A rate grown to twice the last throttled rate without a new 429
  is dropped: the limit is gone. A 503 alone does not cut (isolated 5xx from one flaky
  instance are no reason to slow the whole client).
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

* **Bad luck is not escalated** (:meth:`Governor.bad_luck`): a request's failures in a row
  that are likely at the client's recent failure share are retried at the first, short
  wait, not a doubled one; the budget bounds what they add. A burst of failures among the
  latest answers is not bad luck but an outage starting: its calls back off as usual, so
  they outlast it.

``Retry-After`` is not here: it delays only the request that received it (see
:mod:`breadasync._transport`).

Bounds (``tests/test_transport_governor.py``, virtual time, seeded): 64 callers against
10 s of 503 send at most 250 requests then (183 measured); within 4 s of a total outage
the pace is ``MIN_RATE``, and after it 30% of the earlier rate in the first second, 90% in
the next. Under an unknown limit of R = 50, 300 or 1000/s (bucket R/10): >= 0.95 R
accepted from 5 s on, < 3% throttled; a one-token bucket behind 1 ms of jitter: 0.85 R,
0.7 R, 0.45 R, < 5% throttled; 1% of 429s at random never pace it; a limit dropping from
300 to 100 is followed within 2 s, one rising from 100 to 300 found within 5 s. A GET
failing 4 times in a row among 15% flaky answers is retried within 0.36 s in all; an
outage of 0.5-3 s whose failures come back at once costs no call.

Why it is long: the pace, the overload state, the retry budget and the bad-luck rule read
one window of answers and one CUBIC state, in one decision per attempt; split, each part
would reach into the others' state.
"""

from __future__ import annotations

import enum
import itertools
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
THROTTLE_WINDOW = 2.0
"""Seconds of answers (to requests sent since the last cut) the throttled share covers."""
THROTTLE_SHARE = 0.02
"""A throttled share of recent answers above this cuts the pace; isolated 429s below it
are the price of riding a limit closely, not evidence that the pace is too high."""
THROTTLE_MIN = 2
"""429s needed in the window before their share counts: one alone never cuts."""
REGROW_SECONDS = 2.0
"""After a 429 cut, the pace is back at the rate it was cut from within this many seconds."""
PACER_SLACK = 0.002
"""Seconds of sends the pacer banks: a timer woken a millisecond or two late is made up."""
PEAK_SECONDS = 5
"""How far back the pace before an overload is looked for."""
RECOVERY_SECONDS = 3.0
"""After overload, the pace is back at its earlier level within this many seconds (CUBIC's
curve, compressed)."""
QUIET_SECONDS = 30.0
"""Without pushback for this long, and grown to twice the last throttled rate, the pace is
dropped: the limit is gone."""
BAD_LUCK = 1e-4
"""Failures in a row are bad luck while as many are this likely at the client's recent
failure share: 4 in a row at 15% (5e-4), 3 at 5%."""
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
        already lowered since that request left. ``measured`` is the rate to cut from (the
        pace, or unpaced the rate sent, for a 429; the rate sent, for overload). Returns whether
        it cut."""
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
        # Back where it was within seconds, not the 5-10 that CUBIC's constant takes from
        # 0.7 of a few hundred/s (or from the floor): the same curve, compressed. After a
        # 429 always scaled to W_max: the constant alone probes a limit of 50 too slowly.
        regrow = RECOVERY_SECONDS if self.overloaded else REGROW_SECONDS
        if self._k > regrow or (not self.overloaded and gap > 0):
            self._k = regrow
            self._c = gap / regrow**3

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
        self._recent: deque[tuple[float, bool]] = deque()
        self._throttled = 0
        self._window_since = -math.inf
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
        return self.sent_rate(now)

    def bad_luck(self, failures: int) -> bool:
        """Whether one request's ``failures`` in a row are likely bad luck: no overload, at
        least ``OVERLOAD_MIN_ANSWERS`` recent answers, not a burst of failures among the
        latest ``OVERLOAD_MIN_ANSWERS``, and at the recent failure share ``p``,
        ``p**failures >= BAD_LUCK``."""
        self._record_expire(self._clock.now())
        answers = self._answers
        if self.cubic.overloaded or len(answers) < OVERLOAD_MIN_ANSWERS:
            return False
        share = self._bad / len(answers)
        if share >= OVERLOAD_SHARE or share**failures < BAD_LUCK:
            return False
        # An outage starting after successes raises the share only as fast as its failures
        # come back: instant ones (a refused connection, a proxy's 502) would let a request
        # spend its retries in a fraction of a second. The latest answers tell a burst.
        latest = itertools.islice(reversed(answers), OVERLOAD_MIN_ANSWERS)
        return sum(bad for _, bad in latest) < OVERLOAD_SHARE * OVERLOAD_MIN_ANSWERS

    def sent_rate(self, now: float) -> float:
        """Requests per second sent over the last ``SEND_WINDOW`` seconds."""
        sends = self._sends
        while sends and sends[0] < now - SEND_WINDOW:
            sends.popleft()
        span = min(SEND_WINDOW, max(now - self._first_send, 0.05))
        return len(sends) / span

    def _expire(self, now: float) -> None:
        recent = self._recent
        while recent and recent[0][0] < now - THROTTLE_WINDOW:
            self._throttled -= recent.popleft()[1]

    def _too_fast(self, now: float, ticket: Ticket, throttled: bool) -> bool:
        """Count one answer toward the throttled share; whether the share now says the
        pace is too high (more than ``THROTTLE_SHARE`` of recent answers, and at least
        ``THROTTLE_MIN`` of them)."""
        if self._window_since != self.cubic.cut_at:
            # A new cut: the pace is new, and so is the evidence about it.
            self._window_since = self.cubic.cut_at
            self._recent.clear()
            self._throttled = 0
        if ticket.sent_at < self.cubic.cut_at:
            # Sent before the last cut: it says nothing about the pace now.
            return False
        self._recent.append((now, throttled))
        self._throttled += throttled
        if not throttled:
            return False
        self._expire(now)
        return self._throttled >= THROTTLE_MIN and self._throttled > THROTTLE_SHARE * len(
            self._recent
        )

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
        too_fast = self._too_fast(now, ticket, verdict is Verdict.THROTTLED)
        if verdict is Verdict.ACCEPTED:
            if ticket.retry:
                # A retry that worked gives its token back (AWS's refund): the budget only
                # drains while retries keep failing.
                self.budget.refund()
            if cubic.overloaded and self._streak >= OVERLOAD_EXIT_STREAK:
                cubic.overloaded = False
            cubic.grow(now)
        elif verdict is Verdict.THROTTLED:
            if too_fast:
                # From the pace (the pacer banks enough to keep it on a real event loop);
                # unpaced, from the rate sent. Not from the rate sent or accepted while
                # paced: callers held by their Retry-After (after the first storm against
                # a one-token bucket, most of them for a second) send and get little
                # whatever the limit, and a cut from that rate ratchets the pace down.
                base = self.sent_rate(now) if cubic.rate is None else cubic.rate
                cubic.cut(now, ticket.sent_at, base, overload=False)
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
        self._record_expire(now)
        return self._bad / len(answers)

    def _record_expire(self, now: float) -> None:
        answers = self._answers
        while answers and (
            len(answers) > OVERLOAD_WINDOW_ANSWERS or answers[0][0] < now - OVERLOAD_WINDOW
        ):
            self._bad -= answers.popleft()[1]

    def _apply(self) -> None:
        rate = self.cubic.rate
        if self._ceiling is not None and (rate is None or self._ceiling <= rate):
            # The user's pace is strict: one send per interval, nothing banked.
            self.pacer.set_rate(self._ceiling, 1.0)
        elif rate != self.pacer.rate:
            # A late wake-up of the event loop is made up by the next send, not lost; two
            # sends are never closer than the pace by more than PACER_SLACK, which a
            # one-token bucket mostly tolerates. After an overload no bucket is that
            # tight: 20 ms of sends stay banked and a late wake-up costs the recovery
            # nothing.
            banked = 1.0 + (rate * PACER_SLACK if rate is not None else 0.0)
            if rate is not None and self.cubic.overloaded:
                banked = max(banked, rate / 50)
            self.pacer.set_rate(rate, banked)
