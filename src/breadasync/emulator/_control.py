"""The control API, ``/_emulator/...``: drives an emulator in another process (benchmarks,
the CLI, other languages) with no key. Each route is a thin wrapper of a public method of
:class:`~breadasync.emulator.Emulator`; a bad body answers 400.

    GET  /_emulator/health           {"ok", "dialect", "profile", "speed"}
    GET  /_emulator/stats            the counters (Stats.snapshot)
    POST /_emulator/stats/reset
    GET  /_emulator/requests         the request log
    PUT  /_emulator/faults           {"faults": {...} | null, "repo"?, "target"?}
    POST /_emulator/targets          one target table of a scenario, or a list of them
    POST /_emulator/clock            {"speed"?: x, "advance"?: seconds}
    POST /_emulator/rerun            {"repo", "target", "lines"?, "overrides"?, "rollout"?}
    POST /_emulator/overload         {"seconds", "retry_after"?: s | null, "repo"?, "target"?}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ._core import Handler
from ._faults import Faults

if TYPE_CHECKING:
    from ._app import Emulator


def _ok(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


class ControlApi:
    """The control routes of one emulator, built on its public methods only."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def routes(self) -> list[tuple[str, str, Handler]]:
        """``(method, path, handler)`` of every control route."""
        return [
            ("GET", "/_emulator/health", self.health),
            ("GET", "/_emulator/stats", self.stats),
            ("POST", "/_emulator/stats/reset", self.reset),
            ("GET", "/_emulator/requests", self.requests),
            ("PUT", "/_emulator/faults", self.faults),
            ("POST", "/_emulator/targets", self.targets),
            ("POST", "/_emulator/clock", self.clock),
            ("POST", "/_emulator/rerun", self.rerun),
            ("POST", "/_emulator/overload", self.overload),
        ]

    async def health(self, request: web.Request) -> web.Response:
        """Whether it serves, and how."""
        emu = self.emulator
        return _ok(
            {"ok": True, "dialect": emu.dialect, "profile": emu.profile, "speed": emu.clock.speed}
        )

    async def stats(self, request: web.Request) -> web.Response:
        """The counters."""
        return _ok(self.emulator.stats.snapshot())

    async def reset(self, request: web.Request) -> web.Response:
        """Forget the counters."""
        self.emulator.stats.reset()
        return _ok({"ok": True})

    async def requests(self, request: web.Request) -> web.Response:
        """The request log."""
        return _ok(self.emulator.stats.dump_records())

    async def faults(self, request: web.Request) -> web.Response:
        """Switch faults for the server or a target."""
        data = orjson.loads(await request.read())
        faults = Faults.from_dict(data["faults"]) if data.get("faults") is not None else None
        self.emulator.set_faults(faults, repo=data.get("repo"), target=data.get("target"))
        return _ok({"ok": True})

    async def targets(self, request: web.Request) -> web.Response:
        """Add targets, as a scenario's tables."""
        data = orjson.loads(await request.read())
        for entry in data if isinstance(data, list) else [data]:
            self.emulator.add_target_from_dict(entry)
        return _ok({"ok": True})

    async def clock(self, request: web.Request) -> web.Response:
        """Set the clock's speed and/or advance it."""
        data = orjson.loads(await request.read())
        clock = self.emulator.clock
        if "speed" in data:
            clock.speed = float(data["speed"])
        if "advance" in data:
            clock.advance(float(data["advance"]))
        return _ok({"now": clock.now(), "speed": clock.speed})

    async def rerun(self, request: web.Request) -> web.Response:
        """Re-run a target's rollout: a new job; answers its ``job_id`` and ``generation``."""
        data = orjson.loads(await request.read())
        unknown = set(data) - {"repo", "target", "lines", "overrides", "rollout"}
        if unknown:
            raise ValueError(f"unknown rerun key(s): {', '.join(sorted(unknown))}")
        view = self.emulator.rerun(
            data["repo"],
            data["target"],
            lines=data.get("lines"),
            overrides=data.get("overrides"),
            rollout=data.get("rollout", "complete"),
        )
        return _ok(
            {
                "job_id": view.job_id,
                "generation": view.generation,
                "status": view.status,
                "lines": view.lines,
            }
        )

    async def overload(self, request: web.Request) -> web.Response:
        """Start a period of true overload (every request 503) now."""
        data = orjson.loads(await request.read())
        self.emulator.overload(
            float(data["seconds"]),
            retry_after=data.get("retry_after", 1.0),
            repo=data.get("repo"),
            target=data.get("target"),
        )
        return _ok({"ok": True})
