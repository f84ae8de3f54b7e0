"""An emulator of the Bread API, for tests, benchmarks, demos and your own code.

It speaks the rollout endpoints over real HTTP, simulates jobs on a clock you can speed up
or stop, serves deterministic rows (:func:`trajectory_row`; the ``realistic`` profile by
default, ``profile="simple"`` for the friendly one), injects faults on demand
(:class:`Faults`) and counts every request (:class:`Stats`)::

    from breadasync.emulator import Emulator, EmulatorServer, Faults

    emulator = Emulator(speed=100)
    emulator.add_target("my_repo", "coding_target", rows=5000)
    async with EmulatorServer(emulator) as server:
        ...  # point a client at server.url with emulator.api_key

In pytest, the ``bread_emulator`` fixture (installed with the package) gives a running one.
"""

from ._app import DEFAULT_MODEL, Emulator, retry_after_headers
from ._data import PROFILES, Dialect, Profile, RowShape, stimulus_row, target_seed, trajectory_row
from ._faults import HOSTILE_KINDS, ROUTES, CorruptKind, Faults, RetryAfterFormat
from ._server import EmulatorServer, EmulatorThread
from ._state import Clock, JobView, Progress, TargetPlan
from ._stats import RequestRecord, Stats

__all__ = [
    "DEFAULT_MODEL",
    "HOSTILE_KINDS",
    "PROFILES",
    "ROUTES",
    "Clock",
    "CorruptKind",
    "Dialect",
    "Emulator",
    "EmulatorServer",
    "EmulatorThread",
    "Faults",
    "JobView",
    "Profile",
    "Progress",
    "RequestRecord",
    "RetryAfterFormat",
    "RowShape",
    "Stats",
    "TargetPlan",
    "retry_after_headers",
    "stimulus_row",
    "target_seed",
    "trajectory_row",
]
