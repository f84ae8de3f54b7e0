"""Blocking work in a worker thread that a cancellation can never leave running.

``anyio.to_thread.run_sync`` shields the wait for its thread against anyio's own cancel
scopes, but a native ``Task.cancel()`` (``asyncio.timeout``, ``wait_for``, a web server
cancelling its handler) still interrupts the wait while the thread goes on: the export
then releases its folder lock, or closes a Parquet writer, under a thread still writing
to it (a SIGSEGV in Arrow). :func:`run_to_end` waits for the thread whatever happens and
re-raises the cancellation only once the thread is done.
"""

from __future__ import annotations

import asyncio

# The loop's default executor imports this lazily, on its first use; load it with the
# exporter instead, so a process that drops its privileges after importing still works.
import concurrent.futures.thread  # noqa: F401
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio

_T = TypeVar("_T")

_running = 0
"""Calls handed to a thread by :func:`run_to_end` that have not returned yet."""
_count_lock = threading.Lock()


def running() -> int:
    """How many calls of :func:`run_to_end` are running in a thread right now (a test can
    check that none outlives the call that started it)."""
    return _running


def _counted(call: Callable[[], _T]) -> _T:
    global _running
    with _count_lock:
        _running += 1
    try:
        return call()
    finally:
        with _count_lock:
            _running -= 1


async def run_to_end(
    func: Callable[..., _T], *args: object, limiter: anyio.CapacityLimiter | None = None
) -> _T:
    """``func(*args)`` in a worker thread; returns its result or raises its error.

    A cancellation that arrives meanwhile is delivered when the thread has finished, so
    nothing the thread touches is ever used by two threads at once, and no thread work
    outlives the call. Thread work here is bounded (one page, one row group, one fsync), so
    the delay is too.
    """
    if limiter is not None:
        async with limiter:
            return await _run(func, args)
    return await _run(func, args)


async def _run(func: Callable[..., _T], args: tuple[object, ...]) -> _T:
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, _counted, functools.partial(func, *args))
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError as exc:
            cancelled = exc
            if not future.done():
                continue  # deliver it once the thread is done
            if not future.cancelled():
                future.exception()  # retrieved, so no "exception never retrieved" warning
            raise
        except BaseException:
            if cancelled is not None:
                raise cancelled from None
            raise
        if cancelled is not None:
            raise cancelled
        return result
