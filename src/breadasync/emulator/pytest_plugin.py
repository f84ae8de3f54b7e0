"""pytest plugin (registered by installing breadasync): fixtures giving a running emulator.

``bread_emulator`` is an :class:`~breadasync.emulator.Emulator` already serving on
``127.0.0.1`` from a background thread, so it works in sync and async tests alike; its
``url`` and ``api_key`` are what a client needs. Configure it with a marker::

    @pytest.mark.bread_emulator(dialect="spec", speed=100)
    async def test_something(bread_emulator): ...

``bread_emulator_factory`` starts more (or differently configured) emulators on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ._app import Emulator
from ._server import EmulatorThread


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``bread_emulator`` marker."""
    config.addinivalue_line(
        "markers",
        "bread_emulator(**kwargs): keyword arguments for the Emulator behind the "
        "bread_emulator fixture",
    )


@pytest.fixture
def bread_emulator_factory() -> Iterator[Callable[..., Emulator]]:
    """A function ``(**Emulator kwargs) -> Emulator`` that starts a served emulator; all of
    them stop when the test ends."""
    threads: list[EmulatorThread] = []

    def start(**kwargs: Any) -> Emulator:
        emulator = Emulator(**kwargs)
        thread = EmulatorThread(emulator)
        thread.start()
        threads.append(thread)
        return emulator

    try:
        yield start
    finally:
        for thread in reversed(threads):
            thread.stop()


@pytest.fixture
def bread_emulator(
    request: pytest.FixtureRequest, bread_emulator_factory: Callable[..., Emulator]
) -> Emulator:
    """A running emulator (see the module docstring); stopped when the test ends."""
    marker = request.node.get_closest_marker("bread_emulator")
    return bread_emulator_factory(**(marker.kwargs if marker else {}))
