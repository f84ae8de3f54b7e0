"""The emulator's world: a clock, targets, simulated jobs and the config rules of the API."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ._data import Profile, RowShape, target_seed
from ._faults import Faults

JobState = Literal["not_started", "pending", "running", "complete", "failed"]
Preset = Literal["not_started", "running", "complete", "failed"]
Progress = Literal["full", "lines", "final"]
PROGRESS_MODES: tuple[Progress, ...] = ("full", "lines", "final")


class Clock:
    """Emulated time: real time times ``speed``, plus whatever :meth:`advance` added.

    ``speed=0`` freezes time so a test can move it by hand.
    """

    def __init__(self, speed: float = 1.0) -> None:
        if speed < 0:
            raise ValueError(f"clock speed must be >= 0, got {speed!r}")
        self._speed = speed
        self._anchor_real = time.monotonic()
        self._anchor_emulated = 0.0

    @property
    def speed(self) -> float:
        """How many emulated seconds pass per real second."""
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"clock speed must be >= 0, got {value!r}")
        self._anchor_emulated = self.now()
        self._anchor_real = time.monotonic()
        self._speed = value

    def now(self) -> float:
        """Emulated seconds since the emulator started."""
        return self._anchor_emulated + (time.monotonic() - self._anchor_real) * self._speed

    def advance(self, seconds: float) -> None:
        """Jump emulated time forward."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._anchor_emulated += seconds


@dataclass(frozen=True, slots=True)
class TargetPlan:
    """How the emulator simulates one target's jobs (things the real API does not let you set).

    Defaults apply to targets created over HTTP; :meth:`Emulator.add_target` takes its own.
    """

    stimuli: int | None = None
    """Stimuli the stim job produces; ``None`` derives it from the generators (``numq`` or
    ``questions``), or 10 without any."""
    stim_seconds: float = 2.0
    """Emulated seconds a stim job runs."""
    rollout_seconds: float = 10.0
    """Emulated seconds a rollout job runs..."""
    seconds_per_line: float = 0.0
    """...plus this much per line it produces, so bigger jobs take longer."""
    queue_seconds: float = 0.0
    """Emulated seconds a job stays ``pending`` before it runs."""
    fail: Literal["stim", "rollout"] | None = None
    """Which job fails, if any."""
    fail_at: float = 0.5
    """Fraction of the job's run at which it fails."""
    out_of_credit: bool = False
    """Starting a job answers 402."""
    odd_types: bool = False
    """Some rows carry a value of an unexpected type in a documented field."""
    progress: Progress | None = None
    """What a running job's status tells: ``full`` (``lines``, ``progress_percent`` and, in
    the spec dialect, ``total_expected``), ``lines`` (only a growing ``lines``) or ``final``
    (``lines`` stays 0 until the job completes). ``None``: the realistic profile picks one
    per target, deterministically from its names; the simple profile says ``full``."""
    page_lines: bool = True
    """Whether output pages carry ``lines`` (the spec makes it optional there; the status
    always carries it)."""
    final_job_id: bool = True
    """Whether a complete job's status and pages still carry its ``job_id`` (the SDK sends
    one only "if job is queued/running")."""

    def __post_init__(self) -> None:
        if self.stimuli is not None and self.stimuli < 0:
            raise ValueError("TargetPlan.stimuli must be >= 0")
        for name in ("stim_seconds", "rollout_seconds", "queue_seconds", "seconds_per_line"):
            if getattr(self, name) < 0:
                raise ValueError(f"TargetPlan.{name} must be >= 0")
        if not 0 <= self.fail_at <= 1:
            raise ValueError("TargetPlan.fail_at is a fraction within 0..1")
        if self.fail not in (None, "stim", "rollout"):
            raise ValueError("TargetPlan.fail must be None, 'stim' or 'rollout'")
        if self.progress not in (None, *PROGRESS_MODES):
            raise ValueError("TargetPlan.progress must be None, 'full', 'lines' or 'final'")


@dataclass(frozen=True, slots=True)
class JobView:
    """What a job looks like at one instant."""

    status: JobState
    lines: int
    total: int
    progress_percent: float | None
    error: str | None
    job_id: int | None
    generation: int = 0
    """0 for the target's first job of its kind, n for its n-th re-run."""


@dataclass(slots=True)
class Job:
    """A simulated job: its state at any instant is a function of the clock."""

    kind: Literal["stim", "rollout"]
    job_id: int
    started: float
    queue: float
    duration: float
    total: int
    fail_at: float | None
    generation: int = 0
    """0 for a target's first job of this kind, n for its n-th re-run: its rows differ."""

    def view(self, now: float) -> JobView:
        """The job's state at emulated time ``now``."""
        if now < self.started + self.queue:
            return JobView("pending", 0, self.total, 0.0, None, self.job_id, self.generation)
        ran = now - self.started - self.queue
        progress = 1.0 if self.duration <= 0 else min(1.0, ran / self.duration)
        if self.fail_at is not None and progress >= self.fail_at:
            lines = math.floor(self.total * self.fail_at)
            message = (
                f"{self.kind.capitalize()} worker crashed after {lines} of {self.total} lines "
                "(simulated failure)"
            )
            return JobView("failed", lines, self.total, None, message, self.job_id, self.generation)
        if progress >= 1.0:
            return JobView(
                "complete", self.total, self.total, None, None, self.job_id, self.generation
            )
        lines = math.floor(self.total * progress)
        percent = round(progress * 100, 1)
        return JobView("running", lines, self.total, percent, None, self.job_id, self.generation)


NOT_STARTED = JobView("not_started", 0, 0, None, None, None)

DEFAULT_TEMPLATE: dict[str, Any] = {
    "num_traj_per_stimulus": 1,
    "temperature": 1.0,
    "max_tokens": 1024,
    "max_concurrency": 50,
}
"""The config of the ``default`` template: everything but ``model_name``, which a rollout
needs and the caller must set."""

STIM_KEYS = ("teacher_prompt", "student_prompt", "generators")
ROLLOUT_KEYS = (
    "model_name",
    "num_traj_per_stimulus",
    "temperature",
    "max_tokens",
    "max_concurrency",
    "extra_kwargs",
)


@dataclass(slots=True)
class TargetState:
    """One target: its config, its plan, its jobs and its own faults."""

    uid: int
    repo: str
    name: str
    config: dict[str, Any]
    plan: TargetPlan
    stim: Job | None = None
    rollout: Job | None = None
    faults: Faults | None = None
    profile: Profile = "realistic"
    reads: int = 0
    """Reads of a complete rollout, for the ``growing_lines`` fault."""
    rate_tokens: float | None = None
    rate_stamp: float = field(default_factory=time.monotonic)

    @property
    def stimuli(self) -> int:
        """How many stimuli this target's stim job produces."""
        if self.plan.stimuli is not None:
            return self.plan.stimuli
        generators = self.config.get("generators") or []
        count = 0
        for gen in generators:
            if gen.get("numq"):
                count += int(gen["numq"])
            elif gen.get("questions"):
                count += len(gen["questions"])
        return count or 10

    @property
    def num_traj(self) -> int:
        """Trajectories per stimulus."""
        value = self.config.get("num_traj_per_stimulus")
        return int(value) if value else 1

    def row_shape(self) -> RowShape:
        """The config values that shape this target's rows."""
        temperature = self.config.get("temperature")
        return RowShape(
            model=self.config.get("model_name"),
            temperature=1.0 if temperature is None else float(temperature),
            num_traj_per_stimulus=self.num_traj,
            max_tokens=int(self.config.get("max_tokens") or 1024),
            odd_types=self.plan.odd_types,
            profile=self.profile,
        )

    @property
    def progress(self) -> Progress:
        """What this target's running jobs tell (see :attr:`TargetPlan.progress`)."""
        if self.plan.progress is not None:
            return self.plan.progress
        if self.profile == "simple":
            return "full"
        return PROGRESS_MODES[target_seed(self.repo, self.name) % 3]


# --- validation of request bodies, in the style of the service (FastAPI + pydantic) ---

_INT_FIELDS = ("num_traj_per_stimulus", "max_concurrency", "max_tokens")
_STR_FIELDS = ("teacher_prompt", "student_prompt", "u", "v", "model_name")
KNOWN_OVERRIDES = frozenset(
    {*_INT_FIELDS, *_STR_FIELDS, "temperature", "generators", "extra_kwargs"}
)


def _issue(loc: list[str | int], msg: str, kind: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg, "input": value}


def validate_overrides(overrides: Any, *, strict: bool) -> list[dict[str, Any]]:
    """Problems with a create body's ``overrides``, as FastAPI ``detail`` items.

    ``strict`` (the spec dialect) forbids keys the spec does not name, as the spec's
    ``additionalProperties: false`` does; the docs dialect passes them through.
    """
    if overrides is None:
        return []
    base: list[str | int] = ["body", "overrides"]
    if not isinstance(overrides, dict):
        return [_issue(base, "Input should be a valid dictionary", "dict_type", overrides)]
    issues: list[dict[str, Any]] = []
    for key, value in overrides.items():
        loc = [*base, key]
        if value is None:
            continue
        if key in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                issues.append(_issue(loc, "Input should be a valid integer", "int_type", value))
            elif value < 1:
                issues.append(
                    _issue(
                        loc,
                        "Input should be greater than or equal to 1",
                        "greater_than_equal",
                        value,
                    )
                )
        elif key in _STR_FIELDS:
            if not isinstance(value, str):
                issues.append(_issue(loc, "Input should be a valid string", "string_type", value))
        elif key == "temperature":
            if isinstance(value, bool) or not isinstance(value, int | float):
                issues.append(_issue(loc, "Input should be a valid number", "float_type", value))
            elif not 0.0 <= value <= 2.0:
                issues.append(
                    _issue(loc, "Input should be between 0.0 and 2.0", "value_error", value)
                )
        elif key == "generators":
            issues.extend(_validate_generators(loc, value))
        elif key == "extra_kwargs":
            if not isinstance(value, dict):
                issues.append(_issue(loc, "Input should be a valid dictionary", "dict_type", value))
        elif strict:
            issues.append(_issue(loc, "Extra inputs are not permitted", "extra_forbidden", value))
    return issues


def _validate_generators(loc: list[str | int], value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return [_issue(loc, "Input should be a valid list", "list_type", value)]
    issues: list[dict[str, Any]] = []
    for i, gen in enumerate(value):
        where = [*loc, i]
        if not isinstance(gen, dict):
            issues.append(_issue(where, "Input should be a valid dictionary", "dict_type", gen))
        elif not isinstance(gen.get("type"), str):
            issues.append(_issue([*where, "type"], "Field required", "missing", gen))
        elif gen.get("numq") is not None and (
            isinstance(gen["numq"], bool) or not isinstance(gen["numq"], int) or gen["numq"] < 1
        ):
            issues.append(
                _issue([*where, "numq"], "Input should be an integer >= 1", "int_type", gen["numq"])
            )
        elif gen.get("questions") is not None and not (
            isinstance(gen["questions"], list) and all(isinstance(q, str) for q in gen["questions"])
        ):
            issues.append(
                _issue(
                    [*where, "questions"],
                    "Input should be a list of strings",
                    "list_type",
                    gen["questions"],
                )
            )
    return issues


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a repo or target, or ``None`` if it can.

    ``/``, ``?``, ``#`` and ``%`` are allowed: clients send names percent-encoded as one
    path segment, and the emulator must show whether they do.
    """
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return f"must not be {name!r}"
    if len(name) > 256:
        return "must be at most 256 characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "must not contain control characters"
    return None


def merged_config(template: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A target's config: the template's, then the overrides (``u``/``v`` renamed)."""
    config = dict(template)
    for key, value in (overrides or {}).items():
        if key == "u":
            key = "teacher_prompt"
        elif key == "v":
            key = "student_prompt"
        config[key] = value
    return {k: v for k, v in config.items() if v is not None}
