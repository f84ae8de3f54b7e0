"""The emulator's state and the pieces every part of it shares.

:class:`EmulatorCore` owns the world (targets, jobs, the clock, counters, the row cache) and
the answers built from it (job bodies, output rows, JSON and error responses in the two
dialects). The HTTP side is cut into mixins over it: fault execution (``_faultexec``), the
API handlers (``_handlers``) and the control API (``_control``); ``_app`` puts them together
as :class:`~breadasync.emulator.Emulator`.
"""

from __future__ import annotations

import contextvars
import email.utils
import math
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

import orjson
from aiohttp import web

from ._data import PROFILES, Dialect, Profile, page_bytes, stimulus_row, target_seed
from ._faults import Faults, RetryAfterFormat
from ._state import (
    DEFAULT_TEMPLATE,
    NOT_STARTED,
    ROLLOUT_KEYS,
    STIM_KEYS,
    Clock,
    Job,
    JobView,
    Preset,
    TargetPlan,
    TargetState,
)
from ._stats import Stats

DEFAULT_MODEL = "Qwen/Qwen3-32B"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON_TYPE = "application/json"
ERROR_CODES = {
    400: "INVALID_INPUT",
    401: "UNAUTHORIZED",
    402: "PAYMENT_REQUIRED",
    403: "FORBIDDEN",
    404: "RESOURCE_NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    409: "RESOURCE_CONFLICT",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


class RequestContext:
    """What the middleware and a handler share about one request."""

    __slots__ = ("faults", "rows")

    def __init__(self, faults: Faults | None) -> None:
        self.faults = faults
        self.rows: int | None = None


# A context variable rather than request storage: each request runs in its own task.
REQUEST: contextvars.ContextVar[RequestContext] = contextvars.ContextVar("bread_emulator_request")


def _number(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:.3f}".rstrip("0")


def retry_after_headers(seconds: float, fmt: RetryAfterFormat) -> dict[str, str]:
    """The headers that ask a client to wait ``seconds``, written as ``fmt`` says."""
    if fmt == "seconds":
        return {"Retry-After": _number(seconds)}
    if fmt == "http-date":
        return {"Retry-After": email.utils.formatdate(time.time() + seconds, usegmt=True)}
    if fmt == "ms":
        return {"retry-after-ms": str(round(seconds * 1000))}
    if fmt == "both":
        return {
            "Retry-After": str(math.ceil(seconds)),
            "retry-after-ms": str(round(seconds * 1000)),
        }
    return {}


class EmulatorCore:
    """State and shared answers of an emulator (see :class:`Emulator` for the arguments)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        dialect: Dialect = "docs",
        profile: Profile = "realistic",
        speed: float = 1.0,
        seed: int = 0,
        faults: Faults | None = None,
        plan: TargetPlan | None = None,
        master_key: bool = True,
        out_of_credit: bool = False,
        cache_bytes: int = 512 * 1024 * 1024,
        huge_body_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        if dialect not in ("docs", "spec"):
            raise ValueError(f"dialect must be 'docs' or 'spec', got {dialect!r}")
        if profile not in PROFILES:
            raise ValueError(f"profile must be 'realistic' or 'simple', got {profile!r}")
        if api_key is not None and (not api_key or not api_key.isascii() or " " in api_key):
            raise ValueError("api_key must be a non-empty ASCII string without spaces")
        self.api_key: str = api_key or f"emu-{secrets.token_urlsafe(18)}"
        """The key clients must present."""
        self.dialect: Dialect = dialect
        self.profile: Profile = profile
        """The data profile of targets that do not name their own: ``realistic`` (default)
        or the friendly ``simple``."""
        self.clock = Clock(speed)
        """Emulated time; ``clock.advance(s)`` jumps it, ``clock.speed`` scales it."""
        self.stats = Stats()
        """What the emulator was asked and what it answered."""
        self.plan = plan or TargetPlan()
        self.master_key = master_key
        self.out_of_credit = out_of_credit
        self.url: str | None = None
        """The base URL while served (set by :class:`EmulatorServer`), else ``None``."""
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._repos: dict[str, dict[str, TargetState]] = {}
        self._uids = 0
        self._job_ids = 1000
        self._faults: Faults | None = None
        self._fault_budget: dict[tuple[str, str] | None, int] = {}
        self._server_tokens: float | None = None  # a fresh bucket starts full
        self._server_stamp = time.monotonic()
        # Per-key buckets: (scope, key) -> (tokens, stamp); a fresh bucket starts full.
        self._key_buckets: dict[tuple[tuple[str, str] | None, str], tuple[float, float]] = {}
        self._idempotent: OrderedDict[tuple[str, str], tuple[int, bytes]] = OrderedDict()
        self._cache: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._cache_size = 0
        self._cache_budget = cache_bytes
        self._huge_body_bytes = huge_body_bytes
        self._app: web.Application | None = None
        self._install_faults(faults, None)

    def _install_faults(self, faults: Faults | None, state: TargetState | None) -> None:
        """Set faults (the caller holds the lock), fixing an overload's start to now."""
        if faults is not None and faults.overload_seconds and faults.overload_start is None:
            faults = replace(faults, overload_start=self.clock.now())
        scope = None if state is None else (state.repo, state.name)
        self._fault_budget.pop(scope, None)
        for key in [k for k in self._key_buckets if k[0] == scope]:
            del self._key_buckets[key]
        if state is None:
            self._faults = faults
            self._server_tokens = None
        else:
            state.faults = faults
            state.rate_tokens = None

    # --- responses ------------------------------------------------------------------------

    def _json(
        self, data: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            body=orjson.dumps(data), status=status, content_type=JSON_TYPE, headers=headers
        )

    def _error(
        self, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        if self.dialect == "docs":
            return self._json({"error": message}, status, headers)
        body = {"message": message, "code": ERROR_CODES.get(status, "ERROR")}
        return self._json(body, status, headers)

    def _invalid(self, issues: list[dict[str, Any]]) -> web.Response:
        return self._json({"detail": issues}, 422)

    # --- state ------------------------------------------------------------------------------

    def _find(self, repo: str, target: str) -> TargetState | None:
        return self._repos.get(repo, {}).get(target)

    def _require(self, repo: str, target: str) -> TargetState:
        state = self._find(repo, target)
        if state is None:
            raise KeyError(f"no target {target!r} in repo {repo!r}")
        return state

    def _template_config(self, repo: str, template: str) -> dict[str, Any] | None:
        if template == "default":
            return dict(DEFAULT_TEMPLATE)
        source = self._find(repo, template)
        return dict(source.config) if source else None

    def _new_job(
        self,
        state: TargetState,
        kind: Literal["stim", "rollout"],
        preset: Preset | Literal["new"],
        generation: int = 0,
    ) -> Job:
        plan = state.plan
        if kind == "stim":
            duration, total = plan.stim_seconds, state.stimuli
        else:
            stim_total = state.stim.total if state.stim else state.stimuli
            total = stim_total * state.num_traj
            duration = plan.rollout_seconds + plan.seconds_per_line * total
        now = self.clock.now()
        if preset == "new":
            started = now  # queued first, if the plan says so
        elif preset == "running":
            started = now - plan.queue_seconds
        else:
            started = now - plan.queue_seconds - duration
        self._job_ids += 1
        fail_at = plan.fail_at if plan.fail == kind else None
        return Job(
            kind, self._job_ids, started, plan.queue_seconds, duration, total, fail_at, generation
        )

    def _view(self, state: TargetState, kind: str) -> JobView:
        job = state.stim if kind == "stim" else state.rollout
        if job is None:
            return NOT_STARTED
        view = job.view(self.clock.now())
        progress = state.progress
        if progress != "full" and view.status in ("pending", "running"):
            # A job that says little: no percent; ``final`` shows no lines (nor rows) yet.
            lines = 0 if progress == "final" else view.lines
            view = replace(view, lines=lines, progress_percent=None)
        faults = REQUEST.get().faults
        if kind == "rollout" and view.status == "complete" and faults and faults.growing_lines:
            state.reads += 1
            view = replace(view, lines=view.lines + faults.growing_lines * state.reads)
        return view

    def _job_body(self, state: TargetState, kind: str, view: JobView) -> dict[str, Any]:
        keys = STIM_KEYS if kind == "stim" else ROLLOUT_KEYS
        config = {k: state.config[k] for k in keys if k in state.config}
        body: dict[str, Any] = {"status": view.status, "lines": view.lines}
        if self.dialect == "docs":
            body["parameters"] = config
        else:
            body["config"] = config
            if kind == "rollout" and view.total and state.progress == "full":
                body["total_expected"] = view.total
        if view.job_id is not None and (view.status != "complete" or state.plan.final_job_id):
            body["job_id"] = view.job_id
        if view.progress_percent is not None:
            body["progress_percent"] = view.progress_percent
        if view.error is not None:
            body["error"] = view.error
        return body

    def _rows(self, kind: str, state: TargetState, offset: int, count: int) -> bytes:
        if count == 0:
            return b"[]"
        job = state.stim if kind == "stim" else state.rollout
        generation = job.generation if job is not None else 0
        key = (kind, state.uid, generation, self.dialect, offset, count)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if kind == "stim":
            rows = [
                stimulus_row(state.repo, state.name, i, state.profile)
                for i in range(offset, offset + count)
            ]
            data = orjson.dumps(rows)
        else:
            seed = target_seed(state.repo, state.name)
            shape = state.row_shape()
            data = page_bytes(seed, offset, offset + count, shape, self.dialect, generation)
        self._cache[key] = data
        self._cache_size += len(data)
        while self._cache_size > self._cache_budget and self._cache:
            _, evicted = self._cache.popitem(last=False)
            self._cache_size -= len(evicted)
        return data
