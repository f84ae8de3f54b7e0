"""Time for the transport layer: every wait and every reading of the time goes through a
:class:`Clock`, so retry, backoff and pacing logic can run on virtual time in tests
(:mod:`breadasync.testing`)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import anyio


class Clock(Protocol):
    """What the transport needs of time.

    ``now`` is the event loop's clock (monotonic seconds): deadlines and timeouts are armed on
    it. ``wall`` is seconds since the epoch, for ``Retry-After`` HTTP dates.
    """

    def now(self) -> float:
        """Monotonic seconds, the event loop's time."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock: anyio's time and sleep, and :func:`time.time`."""

    def now(self) -> float:
        """The event loop's time."""
        # asyncio's own reading first: anyio.current_time() looks the backend up on every
        # call, which cost each request ~20 us of CPU at five readings a request.
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # another backend (trio)
            return anyio.current_time()

    def wall(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the event loop."""
        await anyio.sleep(seconds)


def seconds_text(value: float | None) -> str:
    """A duration for a person: ``0.486 s``, ``3600 s``, ``none``."""
    if value is None:
        return "none"
    return f"{value:.3f}".rstrip("0").rstrip(".") + " s"
