"""The emulated Bread API as an aiohttp.web application.

Implements the rollout endpoints of the API (see the project's API notes) in two dialects:
``docs`` (the shapes the rollout docs page shows: ``parameters``, ``{"error": ...}`` bodies,
rows with ``stimulus``/``response``/``model``) and ``spec`` (the published OpenAPI spec:
``config``, ``total_expected``, ``{"message", "code"}`` bodies, rows with
``stimulus_id``/``trajectory_id``). Validation failures answer 422 with FastAPI's
``{"detail": [...]}`` in both.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import hmac
import math
import random
import secrets
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web

from ._data import Dialect, make_trajectory, stimulus_row, target_seed, trajectory_row
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
    merged_config,
    name_problem,
    validate_overrides,
)
from ._stats import RequestRecord, Stats

DEFAULT_MODEL = "Qwen/Qwen3-32B"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_JSON = "application/json"
_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_HTML_504 = _HTML_502.replace(b"502 Bad Gateway", b"504 Gateway Time-out")
_ERROR_CODES = {
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


class _Context:
    """What the middleware and a handler share about one request."""

    __slots__ = ("faults", "rows")

    def __init__(self, faults: Faults | None) -> None:
        self.faults = faults
        self.rows: int | None = None


# A context variable rather than request storage: each request runs in its own task.
_REQUEST: contextvars.ContextVar[_Context] = contextvars.ContextVar("bread_emulator_request")

_JOB_ROUTES = {
    "get_stim": "stim",
    "get_stim_output": "stim",
    "get_rollout": "rollout",
    "get_rollout_output": "rollout",
}


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


class Emulator:
    """An emulated Bread API: targets, simulated jobs, deterministic data and faults.

    Serve it with :class:`EmulatorServer` (on the running event loop), :class:`EmulatorThread`
    (in a background thread, usable from sync code), the ``bread_emulator`` pytest fixture,
    or ``breadasync emulator`` on the command line. Every public method is thread-safe.

    Args:
        api_key: The key clients must send as ``Authorization: Bearer <key>``; a random one
            by default (see :attr:`api_key`).
        dialect: ``"docs"`` (default) or ``"spec"``: which documented shapes to answer in.
        speed: Emulated seconds per real second (``0`` freezes time; see :attr:`clock`).
        seed: Seeds the random draws of fault injection.
        faults: Server-wide fault switches (off by default).
        plan: How targets created over HTTP simulate their jobs.
        master_key: Whether the key may act for another user (``X-User-Id``/``user_id``);
            if not, such requests answer 403.
        out_of_credit: Starting any job answers 402.
        cache_bytes: Budget of the cache of serialised output rows.
        huge_body_bytes: Size of the body the ``corrupt_kind="huge"`` fault streams.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        dialect: Dialect = "docs",
        speed: float = 1.0,
        seed: int = 0,
        faults: Faults | None = None,
        plan: TargetPlan | None = None,
        master_key: bool = True,
        out_of_credit: bool = False,
        cache_bytes: int = 512 * 1024 * 1024,
        huge_body_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if dialect not in ("docs", "spec"):
            raise ValueError(f"dialect must be 'docs' or 'spec', got {dialect!r}")
        if api_key is not None and (not api_key or not api_key.isascii() or " " in api_key):
            raise ValueError("api_key must be a non-empty ASCII string without spaces")
        self.api_key: str = api_key or f"emu-{secrets.token_urlsafe(18)}"
        """The key clients must present."""
        self.dialect: Dialect = dialect
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
        self._faults: Faults | None = faults
        self._fault_budget: dict[tuple[str, str] | None, int] = {}
        self._server_tokens: float | None = None  # a fresh bucket starts full
        self._server_stamp = time.monotonic()
        self._idempotent: OrderedDict[tuple[str, str], tuple[int, bytes]] = OrderedDict()
        self._cache: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._cache_size = 0
        self._cache_budget = cache_bytes
        self._huge_body_bytes = huge_body_bytes
        self._app: web.Application | None = None

    # --- construction from a scenario --------------------------------------------------

    @classmethod
    def from_scenario(cls, scenario: Mapping[str, Any] | str | Path, **overrides: Any) -> Emulator:
        """An emulator set up from a scenario (a mapping, or a ``.json``/``.toml`` file).

        Keys: ``api_key``, ``dialect``, ``speed``, ``seed``, ``master_key``,
        ``out_of_credit``, ``plan`` (a :class:`TargetPlan` as a table), ``faults`` (a
        :class:`Faults` as a table), and ``targets``: a list of tables with ``repo``,
        ``target`` and optionally ``overrides``, ``template``, ``plan``, ``stim``,
        ``rollout``, ``rows`` and ``faults`` (see :meth:`add_target`). Keyword arguments
        override the scenario's top-level keys.
        """
        data = _load_scenario(scenario) if isinstance(scenario, str | Path) else dict(scenario)
        known = {
            "api_key",
            "dialect",
            "speed",
            "seed",
            "master_key",
            "out_of_credit",
            "plan",
            "faults",
            "targets",
            "cache_bytes",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown scenario key(s): {', '.join(sorted(unknown))}")
        targets = data.pop("targets", [])
        if "plan" in data:
            data["plan"] = TargetPlan(**data["plan"])
        if data.get("faults") is not None:
            data["faults"] = Faults.from_dict(data["faults"])
        data.update(overrides)
        emulator = cls(**data)
        for entry in targets:
            emulator.add_target_from_dict(entry)
        return emulator

    def add_target_from_dict(self, entry: Mapping[str, Any]) -> None:
        """:meth:`add_target` from JSON-like data (scenario files and the control API)."""
        entry = dict(entry)
        allowed = {
            "repo",
            "target",
            "overrides",
            "template",
            "plan",
            "stim",
            "rollout",
            "rows",
            "faults",
        }
        unknown = set(entry) - allowed
        if unknown:
            raise ValueError(f"unknown target key(s): {', '.join(sorted(unknown))}")
        if not isinstance(entry.get("repo"), str) or not isinstance(entry.get("target"), str):
            raise ValueError("a target entry needs 'repo' and 'target' strings")
        plan = TargetPlan(**entry["plan"]) if entry.get("plan") is not None else None
        faults = Faults.from_dict(entry["faults"]) if entry.get("faults") is not None else None
        self.add_target(
            entry["repo"],
            entry["target"],
            overrides=entry.get("overrides"),
            template=entry.get("template", "default"),
            plan=plan,
            stim=entry.get("stim", "complete"),
            rollout=entry.get("rollout", "not_started"),
            rows=entry.get("rows"),
            faults=faults,
        )

    # --- helpers for tests and demos ----------------------------------------------------

    def add_target(
        self,
        repo: str,
        target: str,
        *,
        overrides: Mapping[str, Any] | None = None,
        template: str = "default",
        plan: TargetPlan | None = None,
        stim: Preset = "complete",
        rollout: Preset = "not_started",
        rows: int | None = None,
        faults: Faults | None = None,
    ) -> None:
        """Create (or replace) a target directly, with its jobs already in a given state.

        Args:
            overrides: The target's config overrides; ``None`` means
                ``{"model_name": "Qwen/Qwen3-32B"}``. Give ``{"model_name": None}`` for a
                target a rollout must refuse.
            plan: How its jobs are simulated (default: the emulator's :attr:`plan`).
            stim, rollout: ``"not_started"``, ``"running"`` (just started),
                ``"complete"`` or ``"failed"``.
            rows: Make the rollout produce exactly this many lines (sets ``plan.stimuli``).
            faults: Faults for requests to this target only.
        """
        for label, name in (("repo", repo), ("target", target)):
            problem = name_problem(name)
            if problem:
                raise ValueError(f"invalid {label} name {name!r}: {problem}")
        if overrides is None:
            overrides = {"model_name": DEFAULT_MODEL}
        issues = validate_overrides(dict(overrides), strict=self.dialect == "spec")
        if issues:
            raise ValueError(f"invalid overrides: {issues}")
        with self._lock:
            base = self._template_config(repo, template)
            if base is None:
                raise ValueError(
                    f"template {template!r} is neither 'default' nor a target of {repo!r}"
                )
            config = merged_config(base, dict(overrides))
            plan = plan or self.plan
            if rollout == "failed":
                plan = replace(plan, fail="rollout")
            elif stim == "failed":
                plan = replace(plan, fail="stim")
            self._uids += 1
            state = TargetState(self._uids, repo, target, config, plan, faults=faults)
            if rows is not None:
                per = state.num_traj
                if rows < 0 or rows % per:
                    raise ValueError(
                        f"rows={rows} is not a multiple of num_traj_per_stimulus={per}"
                    )
                state.plan = replace(state.plan, stimuli=rows // per)
            if rollout != "not_started" and stim != "complete":
                raise ValueError("a rollout can only have started after a complete stim job")
            if stim != "not_started":
                state.stim = self._new_job(state, "stim", stim)
            if rollout != "not_started":
                state.rollout = self._new_job(state, "rollout", rollout)
            # A replaced target gets a new uid, so its old rows simply age out of the cache.
            self._repos.setdefault(repo, {})[target] = state

    def set_faults(
        self, faults: Faults | None, *, repo: str | None = None, target: str | None = None
    ) -> None:
        """Switch faults on (or off, with ``None``) for the server or for one target."""
        with self._lock:
            if target is None:
                self._faults = faults
                self._fault_budget.pop(None, None)
                self._server_tokens = None
                return
            state = self._find(repo or "", target)
            if state is None:
                raise KeyError(f"no target {target!r} in repo {repo!r}")
            state.faults = faults
            state.rate_tokens = None
            self._fault_budget.pop((state.repo, state.name), None)

    def set_out_of_credit(self, value: bool = True) -> None:
        """Make starting any job answer 402 (or stop doing so)."""
        self.out_of_credit = value

    def targets(self, repo: str | None = None) -> list[str]:
        """The names of the targets of ``repo``; without one, every ``repo/target``."""
        with self._lock:
            if repo is not None:
                return sorted(self._repos.get(repo, {}))
            return sorted(f"{r}/{t}" for r, targets in self._repos.items() for t in targets)

    def job(self, repo: str, target: str, kind: Literal["stim", "rollout"] = "rollout") -> JobView:
        """A target's job as it is now (``not_started`` if none)."""
        with self._lock:
            state = self._require(repo, target)
            job = state.stim if kind == "stim" else state.rollout
            return job.view(self.clock.now()) if job else NOT_STARTED

    def trajectory(self, repo: str, target: str, index: int) -> dict[str, Any]:
        """Trajectory ``index`` of a target, exactly as the emulator serves it."""
        with self._lock:
            state = self._require(repo, target)
            shape = state.row_shape()
        return trajectory_row(repo, target, index, shape, self.dialect)

    def trajectories(
        self, repo: str, target: str, start: int = 0, stop: int | None = None
    ) -> list[dict[str, Any]]:
        """Trajectories ``start..stop-1`` of a target (``stop`` defaults to its total)."""
        with self._lock:
            state = self._require(repo, target)
            shape = state.row_shape()
            if stop is None:
                stop = state.rollout.total if state.rollout else 0
        seed = target_seed(repo, target)
        return [make_trajectory(seed, i, shape, self.dialect) for i in range(start, stop)]

    # --- the aiohttp application ----------------------------------------------------------

    @property
    def app(self) -> web.Application:
        """The aiohttp application (built once)."""
        if self._app is None:
            self._app = self._build_app()
        return self._app

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024 * 1024)
        # Any character but '/' (aiohttp's default also refuses braces): names travel
        # percent-encoded, and the emulator must take every name a client may send.
        base = "/v1/repo/{repo:[^/]+}/targets"
        one = base + "/{target:[^/]+}"
        api: list[tuple[str, str, _Handler, str]] = [
            ("GET", base, self._list_targets, "list_targets"),
            ("POST", base, self._create_target, "create_target"),
            ("GET", one, self._get_target, "get_target"),
            ("POST", one + "/stim", self._run_stim, "run_stim"),
            ("GET", one + "/stim", self._get_job, "get_stim"),
            ("GET", one + "/stim/output", self._get_output, "get_stim_output"),
            ("POST", one + "/rollout", self._run_rollout, "run_rollout"),
            ("GET", one + "/rollout", self._get_job, "get_rollout"),
            ("GET", one + "/rollout/output", self._get_output, "get_rollout_output"),
        ]
        for method, path, handler, name in api:
            app.router.add_route(method, path, handler, name=name)
        control: list[tuple[str, str, _Handler]] = [
            ("GET", "/_emulator/health", self._control_health),
            ("GET", "/_emulator/stats", self._control_stats),
            ("POST", "/_emulator/stats/reset", self._control_reset),
            ("GET", "/_emulator/requests", self._control_requests),
            ("PUT", "/_emulator/faults", self._control_faults),
            ("POST", "/_emulator/targets", self._control_targets),
            ("POST", "/_emulator/clock", self._control_clock),
        ]
        for method, path, handler in control:
            app.router.add_route(method, path, handler, name="control:" + path.rsplit("/", 1)[1])
        return app

    # --- responses ------------------------------------------------------------------------

    def _json(
        self, data: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            body=orjson.dumps(data), status=status, content_type=_JSON, headers=headers
        )

    def _error(
        self, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        if self.dialect == "docs":
            return self._json({"error": message}, status, headers)
        body = {"message": message, "code": _ERROR_CODES.get(status, "ERROR")}
        return self._json(body, status, headers)

    def _invalid(self, issues: list[dict[str, Any]]) -> web.Response:
        return self._json({"detail": issues}, 422)

    # --- middleware: observation, faults, auth --------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        name = request.match_info.route.name
        if name is not None and name.startswith("control:"):
            return await self._guard(handler, request, control=True)
        route = name or "unmatched"
        info = request.match_info
        repo, target = info.get("repo"), info.get("target")
        started = time.monotonic()
        self.stats.enter()
        status, fault, rows = 499, None, None
        try:
            if name is None:
                # An unknown path gets a JSON 404/405 before any auth, as the service does.
                response: web.StreamResponse = await self._guard(handler, request)
                status = response.status
                return response
            faults, scope = self._faults_for(route, repo, target)
            context = _Context(faults)
            _REQUEST.set(context)
            response, fault = await self._serve(request, handler, faults, scope)
            status = response.status
            rows = context.rows
            return response
        finally:
            query = request.rel_url.query
            self.stats.leave(
                RequestRecord(
                    method=request.method,
                    route=route,
                    repo=repo,
                    target=target,
                    status=status,
                    fault=fault,
                    user_id=request.headers.get("X-User-Id") or query.get("user_id"),
                    idempotency_key=request.headers.get("Idempotency-Key"),
                    offset=_int_or_none(query.get("offset")),
                    limit=_int_or_none(query.get("limit")),
                    rows=rows,
                    peer=_peer(request),
                    started=started,
                    elapsed=time.monotonic() - started,
                )
            )

    async def _guard(
        self, handler: _Handler, request: web.Request, *, control: bool = False
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return self._error(exc.status, exc.reason)
        except (ValueError, KeyError, TypeError) as exc:
            if not control:
                raise
            return self._error(400, f"bad control request: {exc}")

    async def _serve(
        self,
        request: web.Request,
        handler: _Handler,
        faults: Faults | None,
        scope: tuple[str, str] | None,
    ) -> tuple[web.StreamResponse, str | None]:
        if faults is not None:
            delay = faults.latency + (self._rng.random() * faults.jitter if faults.jitter else 0)
            if delay > 0:
                await asyncio.sleep(delay)
            early = self._early_fault(faults, scope, request)
            if early is not None:
                return early
        denied = self._authenticate(request)
        if denied is not None:
            return denied, None
        response = await self._guard(handler, request)
        if faults is None or response.status >= 300 or not isinstance(response, web.Response):
            return response, None
        return await self._late_fault(request, response, faults, scope)

    def _faults_for(
        self, route: str, repo: str | None, target: str | None
    ) -> tuple[Faults | None, tuple[str, str] | None]:
        with self._lock:
            if repo is not None and target is not None:
                state = self._find(repo, target)
                if state is not None and state.faults is not None:
                    if state.faults.applies_to(route):
                        return state.faults, (repo, target)
                    return None, None
            if self._faults is not None and self._faults.applies_to(route):
                return self._faults, None
            return None, None

    def _take_fault(self, faults: Faults, scope: tuple[str, str] | None) -> bool:
        """Spend one fault of the scope's budget; False when it is used up."""
        if faults.max_faults is None:
            return True
        used = self._fault_budget.get(scope, 0)
        if used >= faults.max_faults:
            return False
        self._fault_budget[scope] = used + 1
        return True

    def _early_fault(
        self, faults: Faults, scope: tuple[str, str] | None, request: web.Request
    ) -> tuple[web.Response, str] | None:
        with self._lock:
            if faults.redirect_to and self._take_fault(faults, scope):
                location = faults.redirect_to.rstrip("/") + "/v1/elsewhere"
                return web.Response(status=307, headers={"Location": location}), "redirect"
            if faults.rate_limit is not None:
                wait = self._take_token(faults, scope)
                if wait > 0 and self._take_fault(faults, scope):
                    headers = retry_after_headers(wait, faults.retry_after_format)
                    headers.update(self._should_retry(faults))
                    return self._error(429, "Rate limit exceeded", headers), "429"
            if faults.errors:
                draw = self._rng.random()
                for status, rate in faults.errors.items():
                    if draw < rate:
                        if self._take_fault(faults, scope):
                            error = self._injected_error(status, faults, request)
                            return error, str(status)
                        break
                    draw -= rate
        return None

    def _take_token(self, faults: Faults, scope: tuple[str, str] | None) -> float:
        """Take a rate-limit token; 0 if one was free, else seconds until the next one."""
        assert faults.rate_limit is not None
        now = time.monotonic()
        state = None if scope is None else self._find(*scope)
        tokens, stamp = (
            (self._server_tokens, self._server_stamp)
            if state is None
            else (state.rate_tokens, state.rate_stamp)
        )
        burst = max(1, faults.rate_burst)
        tokens = burst if tokens is None else min(burst, tokens + (now - stamp) * faults.rate_limit)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / faults.rate_limit
        if state is None:
            self._server_tokens, self._server_stamp = tokens, now
        else:
            state.rate_tokens, state.rate_stamp = tokens, now
        return wait

    @staticmethod
    def _should_retry(faults: Faults) -> dict[str, str]:
        if faults.should_retry is None:
            return {}
        return {"x-should-retry": "true" if faults.should_retry else "false"}

    def _injected_error(self, status: int, faults: Faults, request: web.Request) -> web.Response:
        headers = self._should_retry(faults)
        if faults.echo_request:
            echoed = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
            return self._error(
                status, f"Upstream failed for request with headers {echoed}", headers
            )
        if status in (502, 504):
            body = _HTML_502 if status == 502 else _HTML_504
            return web.Response(body=body, status=status, content_type="text/html", headers=headers)
        if status in (429, 503):
            headers.update(retry_after_headers(faults.retry_after, faults.retry_after_format))
        messages = {
            500: "Internal server error",
            503: "Service temporarily unavailable",
            429: "Rate limit exceeded",
            408: "Request timeout",
        }
        return self._error(status, messages.get(status, f"Injected error {status}"), headers)

    async def _late_fault(
        self,
        request: web.Request,
        response: web.Response,
        faults: Faults,
        scope: tuple[str, str] | None,
    ) -> tuple[web.StreamResponse, str | None]:
        body = response.body
        assert isinstance(body, bytes)
        with self._lock:
            corrupt = (
                faults.corrupt > 0
                and self._rng.random() < faults.corrupt
                and self._take_fault(faults, scope)
            )
            drop = (
                not corrupt
                and faults.drop > 0
                and self._rng.random() < faults.drop
                and self._take_fault(faults, scope)
            )
        if corrupt:
            if faults.corrupt_kind == "huge":
                return await self._write_huge(request), "corrupt"
            response = self._corrupted(body, faults, request)
            body = response.body
            assert isinstance(body, bytes)
        if drop:
            return await self._write_stream(request, response, body, half=True, rate=None), "drop"
        if faults.slow_body is not None:
            streamed = await self._write_stream(
                request, response, body, half=False, rate=faults.slow_body
            )
            return streamed, ("corrupt" if corrupt else None)
        return response, ("corrupt" if corrupt else None)

    def _corrupted(self, body: bytes, faults: Faults, request: web.Request) -> web.Response:
        kind = faults.corrupt_kind
        if kind == "echo":
            echoed = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
            return web.Response(text=f"debug proxy saw:\n{echoed}", content_type="text/plain")
        if kind == "html":
            return web.Response(
                body=b"<html><body><h1>Maintenance</h1></body></html>", content_type="text/html"
            )
        if kind == "truncated":
            return web.Response(body=body[: max(1, len(body) // 2)], content_type=_JSON)
        if kind == "deep":
            depth = 100_000
            return web.Response(body=b"[" * depth + b"]" * depth, content_type=_JSON)
        data = orjson.loads(body)
        if kind == "wrong-types":
            if "lines" in data:
                data["lines"] = f"{data['lines']} lines"
            if "output" in data:
                data["output"] = {"rows": data["output"]}
        elif kind == "has-more-lies" and "has_more" in data:
            data["has_more"] = not data["has_more"]
        elif kind == "overlong" and isinstance(data.get("output"), list) and data["output"]:
            data["output"].append(data["output"][-1])
        elif kind == "empty" and isinstance(data.get("output"), list):
            data["output"] = []
        return web.Response(body=orjson.dumps(data), content_type=_JSON)

    async def _write_stream(
        self,
        request: web.Request,
        response: web.Response,
        body: bytes,
        *,
        half: bool,
        rate: float | None,
    ) -> web.StreamResponse:
        stream = web.StreamResponse(status=response.status, headers=response.headers)
        stream.content_length = len(body)
        await stream.prepare(request)
        data = body[: len(body) // 2] if half else body
        if rate is None:
            await stream.write(data)
        else:
            # Drip-feed: each chunk resets a per-read timeout, so only a total deadline helps.
            chunk = max(1, int(rate / 20))
            for start in range(0, len(data), chunk):
                piece = data[start : start + chunk]
                await asyncio.sleep(len(piece) / rate)
                await stream.write(piece)
        if half:
            if request.transport is not None:
                request.transport.close()
            return stream
        await stream.write_eof()
        return stream

    async def _write_huge(self, request: web.Request) -> web.StreamResponse:
        # Chunked, without a Content-Length, so only a client-side size limit stops it.
        stream = web.StreamResponse(status=200)
        stream.content_type = _JSON
        stream.enable_chunked_encoding()
        await stream.prepare(request)
        await stream.write(b'{"output":["')
        chunk = b"x" * (1024 * 1024)
        for _ in range(self._huge_body_bytes // len(chunk)):
            await stream.write(chunk)
        await stream.write(b'"]}')
        await stream.write_eof()
        return stream

    def _authenticate(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization")
        if not header:
            return self._error(
                401,
                "Missing API key: send 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8", "replace"), self.api_key.encode()
        ):
            return self._error(401, "Invalid API key", {"WWW-Authenticate": "Bearer"})
        override = request.headers.get("X-User-Id") or request.rel_url.query.get("user_id")
        if override and not self.master_key:
            return self._error(403, "User override (X-User-Id) requires a master API key")
        return None

    # --- API handlers -----------------------------------------------------------------------

    async def _list_targets(self, request: web.Request) -> web.Response:
        repo = request.match_info["repo"]
        with self._lock:
            if repo not in self._repos:
                return self._error(404, "Repository not found")
            return self._json({"targets": sorted(self._repos[repo])})

    async def _create_target(self, request: web.Request) -> web.Response:
        repo = request.match_info["repo"]
        key = request.headers.get("Idempotency-Key")
        with self._lock:
            if key and (repo, key) in self._idempotent:
                status, body = self._idempotent[(repo, key)]
                return web.Response(body=body, status=status, content_type=_JSON)
        raw = await request.read()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self._invalid(
                [
                    {
                        "type": "json_invalid",
                        "loc": ["body", exc.pos],
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": exc.msg},
                    }
                ]
            )
        if not isinstance(data, dict):
            return self._invalid(
                [
                    {
                        "type": "model_attributes_type",
                        "loc": ["body"],
                        "msg": "Input should be a valid dictionary or object",
                        "input": data,
                    }
                ]
            )
        issues: list[dict[str, Any]] = []
        for field in ("target_name", "template"):
            if field not in data:
                issues.append(
                    {
                        "type": "missing",
                        "loc": ["body", field],
                        "msg": "Field required",
                        "input": data,
                    }
                )
            elif not isinstance(data[field], str):
                issues.append(
                    {
                        "type": "string_type",
                        "loc": ["body", field],
                        "msg": "Input should be a valid string",
                        "input": data[field],
                    }
                )
        issues.extend(validate_overrides(data.get("overrides"), strict=self.dialect == "spec"))
        if self.dialect == "spec":
            issues.extend(
                {
                    "type": "extra_forbidden",
                    "loc": ["body", k],
                    "msg": "Extra inputs are not permitted",
                    "input": data[k],
                }
                for k in data
                if k not in ("target_name", "template", "overrides")
            )
        if issues:
            return self._invalid(issues)
        name: str = data["target_name"]
        for label, value in (("repo", repo), ("target", name)):
            problem = name_problem(value)
            if problem:
                return self._error(400, f"Invalid {label} name {value!r}: {problem}")
        with self._lock:
            base = self._template_config(repo, data["template"])
            if base is None:
                return self._error(
                    400,
                    f"Template {data['template']!r} not found: use 'default' or an "
                    f"existing target of repo {repo!r}",
                )
            config = merged_config(base, data.get("overrides"))
            existing = self._find(repo, name)
            if existing is not None:
                if existing.config != config:
                    return self._error(
                        409,
                        f"Target {name!r} already exists with different configuration. "
                        "Targets are immutable and cannot be changed.",
                    )
                response = self._json({"target_name": name, "config": existing.config}, 200)
            else:
                self._uids += 1
                state = TargetState(self._uids, repo, name, config, self.plan)
                self._repos.setdefault(repo, {})[name] = state
                response = self._json({"target_name": name, "config": config}, 201)
            if key:
                assert isinstance(response.body, bytes)
                self._idempotent[(repo, key)] = (response.status, response.body)
                while len(self._idempotent) > 10_000:
                    self._idempotent.popitem(last=False)
            return response

    async def _get_target(self, request: web.Request) -> web.Response:
        with self._lock:
            state = self._find(request.match_info["repo"], request.match_info["target"])
            if state is None:
                return self._error(404, "Target not found")
            return self._json({"target_name": state.name, "config": state.config})

    async def _run_stim(self, request: web.Request) -> web.Response:
        with self._lock:
            state = self._find(request.match_info["repo"], request.match_info["target"])
            if state is None:
                return self._error(404, "Target not found")
            if state.stim is None:
                if self.out_of_credit or state.plan.out_of_credit:
                    return self._error(402, "Insufficient credits. Please add funds to continue.")
                state.stim = self._new_job(state, "stim", "new")
                self.stats.job_started(state.repo, state.name, "stim")
            return self._json(self._job_body(state, "stim", state.stim.view(self.clock.now())))

    async def _run_rollout(self, request: web.Request) -> web.Response:
        with self._lock:
            state = self._find(request.match_info["repo"], request.match_info["target"])
            if state is None:
                return self._error(404, "Target not found")
            if state.rollout is None:
                stim = state.stim.view(self.clock.now()) if state.stim else NOT_STARTED
                if stim.status != "complete":
                    return self._error(400, "Stim job must complete before running rollout")
                if not state.config.get("model_name"):
                    return self._error(400, "model_name must be configured in target")
                if self.out_of_credit or state.plan.out_of_credit:
                    return self._error(402, "Insufficient credits. Please add funds to continue.")
                state.rollout = self._new_job(state, "rollout", "new")
                self.stats.job_started(state.repo, state.name, "rollout")
            view = state.rollout.view(self.clock.now())
            return self._json(self._job_body(state, "rollout", view))

    async def _get_job(self, request: web.Request) -> web.Response:
        kind = _JOB_ROUTES[request.match_info.route.name or ""]
        with self._lock:
            state = self._find(request.match_info["repo"], request.match_info["target"])
            if state is None:
                return self._error(404, "Target not found")
            view = self._view(state, kind)
            return self._json(self._job_body(state, kind, view))

    async def _get_output(self, request: web.Request) -> web.Response:
        kind = _JOB_ROUTES[request.match_info.route.name or ""]
        query = request.rel_url.query
        issues: list[dict[str, Any]] = []
        limit = _query_int(query, "limit", 100, 1, 1000, issues)
        offset = _query_int(query, "offset", 0, 0, 2**63 - 1, issues)
        if issues:
            return self._invalid(issues)
        context = _REQUEST.get()
        faults = context.faults
        with self._lock:
            state = self._find(request.match_info["repo"], request.match_info["target"])
            if state is None:
                return self._error(404, "Target not found")
            view = self._view(state, kind)
            count = max(0, min(limit, view.lines - offset))
            if faults is not None and faults.page_cap is not None:
                count = min(count, faults.page_cap)
            rows = self._rows(kind, state, offset, count)
            envelope = self._job_body(state, kind, view)
            envelope.update(offset=offset, limit=limit, has_more=offset + count < view.lines)
            if self.dialect == "docs":
                # The docs page lists ``parameters`` last, after ``output``.
                parameters = envelope.pop("parameters")
                body = (
                    orjson.dumps(envelope)[:-1]
                    + b',"output":'
                    + rows
                    + b',"parameters":'
                    + orjson.dumps(parameters)
                    + b"}"
                )
            else:
                body = orjson.dumps(envelope)[:-1] + b',"output":' + rows + b"}"
        context.rows = count
        return web.Response(body=body, content_type=_JSON)

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
        self, state: TargetState, kind: Literal["stim", "rollout"], preset: Preset | Literal["new"]
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
        return Job(kind, self._job_ids, started, plan.queue_seconds, duration, total, fail_at)

    def _view(self, state: TargetState, kind: str) -> JobView:
        job = state.stim if kind == "stim" else state.rollout
        if job is None:
            return NOT_STARTED
        view = job.view(self.clock.now())
        faults = _REQUEST.get().faults
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
            if kind == "rollout" and view.total:
                body["total_expected"] = view.total
        if view.job_id is not None:
            body["job_id"] = view.job_id
        if view.progress_percent is not None:
            body["progress_percent"] = view.progress_percent
        if view.error is not None:
            body["error"] = view.error
        return body

    def _rows(self, kind: str, state: TargetState, offset: int, count: int) -> bytes:
        if count == 0:
            return b"[]"
        key = (kind, state.uid, self.dialect, offset, count)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        seed = target_seed(state.repo, state.name)
        if kind == "stim":
            rows = [stimulus_row(state.repo, state.name, i) for i in range(offset, offset + count)]
        else:
            shape = state.row_shape()
            dialect = self.dialect
            rows = [make_trajectory(seed, i, shape, dialect) for i in range(offset, offset + count)]
        data = orjson.dumps(rows)
        self._cache[key] = data
        self._cache_size += len(data)
        while self._cache_size > self._cache_budget and self._cache:
            _, evicted = self._cache.popitem(last=False)
            self._cache_size -= len(evicted)
        return data

    # --- control API (for out-of-process use: benchmarks, the CLI, other languages) ---------

    async def _control_health(self, request: web.Request) -> web.Response:
        return self._json({"ok": True, "dialect": self.dialect, "speed": self.clock.speed})

    async def _control_stats(self, request: web.Request) -> web.Response:
        return self._json(self.stats.snapshot())

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return self._json({"ok": True})

    async def _control_requests(self, request: web.Request) -> web.Response:
        return self._json(self.stats.dump_records())

    async def _control_faults(self, request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())
        faults = Faults.from_dict(data["faults"]) if data.get("faults") is not None else None
        self.set_faults(faults, repo=data.get("repo"), target=data.get("target"))
        return self._json({"ok": True})

    async def _control_targets(self, request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())
        for entry in data if isinstance(data, list) else [data]:
            self.add_target_from_dict(entry)
        return self._json({"ok": True})

    async def _control_clock(self, request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())
        if "speed" in data:
            self.clock.speed = float(data["speed"])
        if "advance" in data:
            self.clock.advance(float(data["advance"]))
        return self._json({"now": self.clock.now(), "speed": self.clock.speed})


def _peer(request: web.Request) -> str | None:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if peer else None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _query_int(
    query: Mapping[str, str],
    name: str,
    default: int,
    low: int,
    high: int | None,
    issues: list[dict[str, Any]],
) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    loc = ["query", name]
    try:
        value = int(raw)
    except ValueError:
        issues.append(
            {
                "type": "int_parsing",
                "loc": loc,
                "input": raw,
                "msg": "Input should be a valid integer, unable to parse string as an integer",
            }
        )
        return default
    if value < low:
        issues.append(
            {
                "type": "greater_than_equal",
                "loc": loc,
                "input": raw,
                "msg": f"Input should be greater than or equal to {low}",
                "ctx": {"ge": low},
            }
        )
    elif high is not None and value > high:
        issues.append(
            {
                "type": "less_than_equal",
                "loc": loc,
                "input": raw,
                "msg": f"Input should be less than or equal to {high}",
                "ctx": {"le": high},
            }
        )
    return value


def _load_scenario(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read scenario file {str(path)!r}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else orjson.loads(raw)
    except (tomllib.TOMLDecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"scenario file {str(path)!r} is not valid "
            f"{'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(f"scenario file {str(path)!r} must hold an object at the top")
    return data
