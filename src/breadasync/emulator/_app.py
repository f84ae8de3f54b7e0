"""The emulated Bread API: :class:`Emulator`, its public helpers and its aiohttp app.

Implements the rollout endpoints of the API (see the project's API notes) in two dialects:
``docs`` (the shapes the rollout docs page shows: ``parameters``, ``{"error": ...}`` bodies,
rows with ``stimulus``/``response``/``model``) and ``spec`` (the published OpenAPI spec:
``config``, ``total_expected``, ``{"message", "code"}`` bodies, rows with
``stimulus_id``/``trajectory_id``). Both carry a ``job_id`` in job bodies. This module owns
the public surface (targets, faults, overload, re-runs, rows) and the routing; the state is
``_core``'s, the middleware ``_faultexec``'s, the handlers ``_handlers``'s, the control API
``_control``'s and scenario parsing ``_scenario``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web

from ._control import ControlApi
from ._core import DEFAULT_MODEL, Handler, retry_after_headers
from ._data import PROFILES, Profile, page_bytes, target_seed
from ._faultexec import FaultExecution
from ._faults import Faults
from ._handlers import ApiHandlers
from ._scenario import emulator_kwargs, target_kwargs
from ._state import (
    NOT_STARTED,
    JobView,
    Preset,
    Progress,
    TargetPlan,
    TargetState,
    merged_config,
    name_problem,
    validate_overrides,
)

__all__ = ["DEFAULT_MODEL", "Emulator", "retry_after_headers"]


class Emulator(FaultExecution, ApiHandlers):
    """An emulated Bread API: targets, simulated jobs, deterministic data and faults.

    Serve it with :class:`EmulatorServer` (on the running event loop), :class:`EmulatorThread`
    (in a background thread, usable from sync code), the ``bread_emulator`` pytest fixture,
    or ``breadasync emulator`` on the command line. Every public method is thread-safe.

    Args:
        api_key: The key clients must send as ``Authorization: Bearer <key>``; a random one
            by default (see :attr:`api_key`).
        dialect: ``"docs"`` (default) or ``"spec"``: which documented shapes to answer in.
        profile: ``"realistic"`` (default: rows and jobs as the world has them) or
            ``"simple"`` (the friendly rows and fully-reporting jobs of earlier versions).
        speed: Emulated seconds per real second (``0`` freezes time; see :attr:`clock`).
        seed: Seeds the random draws of fault injection.
        faults: Server-wide fault switches (off by default).
        plan: How targets created over HTTP simulate their jobs.
        master_key: Whether the key may act for another user (``X-User-Id``/``user_id``);
            if not, such requests answer 403.
        out_of_credit: Starting any job answers 402.
        cache_bytes: Budget of the cache of serialised output rows.
        huge_body_bytes: Size of the body the ``huge``/``huge-string`` faults stream.
    """

    # --- construction from a scenario --------------------------------------------------

    @classmethod
    def from_scenario(cls, scenario: Mapping[str, Any] | str | Path, **overrides: Any) -> Emulator:
        """An emulator set up from a scenario (a mapping, or a ``.json``/``.toml`` file).

        Keys: see :mod:`breadasync.emulator._scenario` and the README. Keyword arguments
        override the scenario's top-level keys.
        """
        kwargs, targets = emulator_kwargs(scenario)
        kwargs.update(overrides)
        emulator = cls(**kwargs)
        for entry in targets:
            emulator.add_target_from_dict(entry)
        return emulator

    def add_target_from_dict(self, entry: Mapping[str, Any]) -> None:
        """:meth:`add_target` from JSON-like data (scenario files and the control API)."""
        kwargs = target_kwargs(entry)
        self.add_target(kwargs.pop("repo"), kwargs.pop("target"), **kwargs)

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
        profile: Profile | None = None,
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
            profile: The target's data profile (default: the emulator's :attr:`profile`).
        """
        if profile is not None and profile not in PROFILES:
            raise ValueError(f"profile must be 'realistic' or 'simple', got {profile!r}")
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
            state = TargetState(
                self._uids, repo, target, config, plan, profile=profile or self.profile
            )
            self._install_faults(faults, state)
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
                self._install_faults(faults, None)
                return
            state = self._find(repo or "", target)
            if state is None:
                raise KeyError(f"no target {target!r} in repo {repo!r}")
            self._install_faults(faults, state)

    def overload(
        self,
        seconds: float,
        *,
        retry_after: float | None = 1.0,
        repo: str | None = None,
        target: str | None = None,
    ) -> None:
        """True overload from now, for ``seconds`` of the emulator clock: every request (of
        the server, or of one target) answers 503, with ``Retry-After`` or without
        (``retry_after=None``). Other fault switches in force stay; counted as ``overload``.
        """
        if seconds < 0:
            raise ValueError("overload seconds must be >= 0")
        with self._lock:
            state = None if target is None else self._require(repo or "", target)
            current = self._faults if state is None else state.faults
            faults = replace(
                current or Faults(),
                overload_seconds=seconds,
                overload_start=self.clock.now(),
                overload_retry_after=retry_after,
            )
        self.set_faults(faults, repo=repo, target=target)

    def rerun(
        self,
        repo: str,
        target: str,
        *,
        lines: int | None = None,
        overrides: Mapping[str, Any] | None = None,
        rollout: Preset = "complete",
    ) -> JobView:
        """Re-run a target's rollout, as someone else might while you read it: a new job
        (a new ``job_id``) of the next generation, whose rows differ from the old job's at
        every offset even when ``lines`` is the same.

        Args:
            lines: The new job's size (default: the same as the target's plan gives).
            overrides: Config changes for the new job (a different ``model_name``, say).
            rollout: The new job's state: ``"complete"`` (default: done at once, even at
                ``speed=0``), ``"running"`` (just started) or ``"failed"``.

        Returns:
            The new job as it is now.
        """
        if rollout == "not_started":
            raise ValueError("a re-run starts a job: rollout must not be 'not_started'")
        with self._lock:
            state = self._require(repo, target)
            if overrides:
                issues = validate_overrides(dict(overrides), strict=self.dialect == "spec")
                if issues:
                    raise ValueError(f"invalid overrides: {issues}")
                state.config = merged_config(state.config, dict(overrides))
            if lines is not None:
                per = state.num_traj
                if lines < 0 or lines % per:
                    raise ValueError(
                        f"lines={lines} is not a multiple of num_traj_per_stimulus={per}"
                    )
                state.plan = replace(state.plan, stimuli=lines // per)
                if state.stim is not None:
                    state.stim.total = lines // per
            plan = state.plan
            state.plan = replace(plan, fail="rollout" if rollout == "failed" else None)
            generation = state.rollout.generation + 1 if state.rollout else 0
            state.rollout = self._new_job(state, "rollout", rollout, generation)
            state.plan = plan
            state.reads = 0
            self.stats.job_started(state.repo, state.name, "rollout")
            return state.rollout.view(self.clock.now())

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

    def progress_mode(self, repo: str, target: str) -> Progress:
        """What the target's running jobs tell: ``full``, ``lines`` or ``final`` (see
        :attr:`TargetPlan.progress`)."""
        with self._lock:
            return self._require(repo, target).progress

    def trajectory(
        self, repo: str, target: str, index: int, *, generation: int | None = None
    ) -> dict[str, Any]:
        """Trajectory ``index`` of a target, exactly as the emulator serves it (for its
        current rollout, or the job of ``generation``)."""
        return self.trajectories(repo, target, index, index + 1, generation=generation)[0]

    def trajectories(
        self,
        repo: str,
        target: str,
        start: int = 0,
        stop: int | None = None,
        *,
        generation: int | None = None,
    ) -> list[dict[str, Any]]:
        """Trajectories ``start..stop-1`` of a target (``stop`` defaults to its total), of its
        current rollout or of the job of ``generation``."""
        with self._lock:
            state = self._require(repo, target)
            shape = state.row_shape()
            if stop is None:
                stop = state.rollout.total if state.rollout else 0
            if generation is None:
                generation = state.rollout.generation if state.rollout else 0
        seed = target_seed(repo, target)
        return orjson.loads(page_bytes(seed, start, stop, shape, self.dialect, generation))  # type: ignore[no-any-return]

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
        api: list[tuple[str, str, Handler, str]] = [
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
        for method, path, handler in ControlApi(self).routes():
            app.router.add_route(method, path, handler, name="control:" + path.rsplit("/", 1)[1])
        return app
