"""Client-wide limits: requests in flight (adaptive) and requests per second."""

from __future__ import annotations

import math

import anyio


class Slot:
    """Permission for one request to be in flight; give it back with ``release``."""

    __slots__ = ("generation",)

    def __init__(self, generation: int) -> None:
        self.generation = generation


class AdaptiveConcurrency:
    """A cap on requests in flight that gives way when the service pushes back.

    An anyio :class:`~anyio.CapacityLimiter` holds the tokens; its size follows an AIMD
    window: a 429 or 503 halves it (once per round trip: only answers to requests sent after
    the last cut count), and each success grows it by ``1/window``, so about one more slot
    per window of successes, never above ``maximum``.
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
        """An answer that was not backpressure: grow the window a little."""
        if self._window < self.maximum:
            self._window = min(float(self.maximum), self._window + 1.0 / self._window)
            self._apply()

    def pushed_back(self, slot: Slot) -> None:
        """A 429 or 503: halve the window, unless it was already cut since this request left."""
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


class RateLimiter:
    """Spaces requests at least ``1/rate`` seconds apart, across every task of a client."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = -math.inf

    async def wait(self) -> None:
        """Wait for this request's turn."""
        now = anyio.current_time()
        turn = max(now, self._next)
        self._next = turn + self._interval
        if turn > now:
            await anyio.sleep(turn - now)


class Pause:
    """A client-wide "not before": when the service answers 429 or 503 with a wait, no
    request of the client goes out before it ends (a limit is usually per key, so the
    other requests would only be refused too)."""

    def __init__(self) -> None:
        self._until = -math.inf

    def hold(self, seconds: float) -> None:
        """Hold every request for ``seconds`` from now (an earlier, longer hold stands)."""
        self._until = max(self._until, anyio.current_time() + seconds)

    async def wait(self) -> None:
        """Wait out the hold, if any."""
        remaining = self._until - anyio.current_time()
        if remaining > 0:
            await anyio.sleep(remaining)
