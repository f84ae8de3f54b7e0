"""Helpers for testing code that uses breadasync without a network or real waiting.

:func:`run_virtual` runs a coroutine on an event loop whose time is virtual: when every
task is waiting, the loop jumps to the next timer instead of sleeping, so ten minutes of
retries, backoff and pacing take milliseconds, in the same order every run. Pair it with
:class:`breadasync.MockTransport` and :class:`VirtualClock`::

    async def main() -> None:
        async with BreadClient("key", transport=MockTransport(handler)) as client:
            ...

    run_virtual(main)
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

_T = TypeVar("_T")

DEFAULT_EPOCH = 1_767_225_600.0
"""The wall time a :class:`VirtualClock` starts from by default (2026-01-01T00:00:00Z)."""


class _VirtualSelector(selectors.DefaultSelector):
    """Never blocks while a timer is pending: advances the loop's virtual time instead."""

    def __init__(self, advance: Callable[[float], None]) -> None:
        super().__init__()
        self._advance = advance

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            # No timer at all: only real I/O (another thread's wake-up) can move things on.
            return super().select(None)
        if timeout > 0:
            self._advance(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` is virtual and jumps to the next timer when idle."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(_VirtualSelector(self._advance))

    def _advance(self, seconds: float) -> None:
        self._virtual_now += seconds

    def time(self) -> float:
        """The virtual time, in seconds from the loop's creation."""
        return self._virtual_now


def run_virtual(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``main()`` to completion on a fresh :class:`VirtualTimeLoop`."""

    async def wrapper() -> _T:
        return await main()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(wrapper())


class VirtualClock:
    """A :class:`~breadasync._clock.Clock` for a :class:`VirtualTimeLoop`: its time is the
    loop's, and its wall clock is ``epoch`` plus that, so HTTP dates are reproducible too."""

    def __init__(self, epoch: float = DEFAULT_EPOCH) -> None:
        self.epoch = epoch

    def now(self) -> float:
        """The loop's (virtual) time."""
        return anyio.current_time()

    def wall(self) -> float:
        """``epoch`` plus the loop's time."""
        return self.epoch + anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the loop (instant under virtual time)."""
        await anyio.sleep(seconds)


__all__ = ["DEFAULT_EPOCH", "VirtualClock", "VirtualTimeLoop", "run_virtual"]
