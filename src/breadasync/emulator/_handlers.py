"""The API handlers: the rollout endpoints of the Bread API, in both dialects.

Each handler reads and changes the world of :class:`EmulatorCore` under its lock and answers
as the docs (``docs``) or the OpenAPI spec (``spec``) show; validation failures answer 422
with FastAPI's ``{"detail": [...]}``. Faults happen around them, in ``_faultexec``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from ._core import JSON_TYPE, REQUEST, EmulatorCore
from ._state import NOT_STARTED, TargetState, merged_config, name_problem, validate_overrides

JOB_ROUTES = {
    "get_stim": "stim",
    "get_stim_output": "stim",
    "get_rollout": "rollout",
    "get_rollout_output": "rollout",
}


class ApiHandlers(EmulatorCore):
    """The handlers of the API routes (see :data:`breadasync.emulator.ROUTES`)."""

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
                return web.Response(body=body, status=status, content_type=JSON_TYPE)
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
        kind = JOB_ROUTES[request.match_info.route.name or ""]
        with self._lock:
            state = self._find(request.match_info["repo"], request.match_info["target"])
            if state is None:
                return self._error(404, "Target not found")
            view = self._view(state, kind)
            return self._json(self._job_body(state, kind, view))

    async def _get_output(self, request: web.Request) -> web.Response:
        kind = JOB_ROUTES[request.match_info.route.name or ""]
        query = request.rel_url.query
        issues: list[dict[str, Any]] = []
        limit = _query_int(query, "limit", 100, 1, 1000, issues)
        offset = _query_int(query, "offset", 0, 0, 2**63 - 1, issues)
        if issues:
            return self._invalid(issues)
        context = REQUEST.get()
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
            if not state.plan.page_lines:
                del envelope["lines"]
            if self.dialect == "docs":
                # The docs page lists ``parameters`` last, after ``output``.
                parameters = envelope.pop("parameters")
                # One join, not a chain of ``+``: each ``+`` would copy the whole page.
                body = b"".join(
                    (
                        orjson.dumps(envelope)[:-1],
                        b',"output":',
                        rows,
                        b',"parameters":',
                        orjson.dumps(parameters),
                        b"}",
                    )
                )
            else:
                body = b"".join((orjson.dumps(envelope)[:-1], b',"output":', rows, b"}"))
        context.rows = count
        return web.Response(body=body, content_type=JSON_TYPE)


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
