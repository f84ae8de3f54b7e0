"""Typed records of what the service answers. Each keeps every field it was sent in ``raw``.

Parsing checks the types of the fields it reads and raises :class:`ProtocolError` (with the
request and the offending value) instead of letting a ``KeyError`` or a wrong type escape.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypedDict

from ._errors import ProtocolError

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class JobState(enum.StrEnum):
    """The state of a stim or rollout job. Terminal states are ``COMPLETE`` and ``FAILED``.

    A state the service invents later (say ``"cancelled"``) still parses, as a member that
    is neither terminal nor one of these.
    """

    NOT_STARTED = "not_started"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"

    @classmethod
    def _missing_(cls, value: object) -> JobState | None:
        if not isinstance(value, str):
            return None
        member = str.__new__(cls, value)
        member._name_ = value.upper()
        member._value_ = value
        return member

    @property
    def is_terminal(self) -> bool:
        """Whether the job has stopped (``complete`` or ``failed``)."""
        return self in (JobState.COMPLETE, JobState.FAILED)


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A stim or rollout job as the service reported it.

    Attributes:
        status: The job's state.
        lines: Lines (stimuli or trajectories) produced so far.
        config: The job's configuration (``parameters`` in the docs, ``config`` in the spec).
        error: The service's reason, when ``failed``.
        job_id: The service's job id, when it sends one.
        progress_percent: 0-100 while running, when it sends it.
        total_expected: Lines the job will produce, when it sends it.
        raw: Every field of the answer, known or not.
    """

    status: JobState
    lines: int | None = None
    config: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    error: str | None = None
    job_id: int | str | None = None
    progress_percent: float | None = None
    total_expected: int | None = None
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)

    @property
    def is_terminal(self) -> bool:
        """Whether the job has stopped (``complete`` or ``failed``)."""
        return self.status.is_terminal

    @property
    def is_complete(self) -> bool:
        """Whether the job finished successfully."""
        return self.status is JobState.COMPLETE

    @property
    def is_failed(self) -> bool:
        """Whether the job failed."""
        return self.status is JobState.FAILED

    @property
    def progress(self) -> float | None:
        """Percent done, from ``progress_percent`` or ``lines``/``total_expected``, if known."""
        if self.status is JobState.COMPLETE:
            return 100.0
        if self.progress_percent is not None:
            return self.progress_percent
        if self.lines is not None and self.total_expected:
            return min(100.0, 100.0 * self.lines / self.total_expected)
        return None


@dataclass(frozen=True, slots=True)
class OutputPage:
    """One page of a job's output.

    Attributes:
        status: The job's state when the page was read.
        lines: Lines the job has produced in all (the export's expected row count).
        offset: The offset the page starts at.
        limit: The page size asked for (a page may hold fewer rows: see ``output``).
        has_more: Whether the service says more rows follow.
        output: The rows, each a dict with every field the service sent.
        config, error, job_id, progress_percent, total_expected: As in :class:`JobStatus`.
        raw: Every field of the answer, known or not.
    """

    status: JobState
    lines: int | None
    offset: int
    limit: int
    has_more: bool
    output: list[dict[str, Any]]
    config: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    error: str | None = None
    job_id: int | str | None = None
    progress_percent: float | None = None
    total_expected: int | None = None
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)

    @property
    def job(self) -> JobStatus:
        """The job status this page carries."""
        return JobStatus(
            self.status,
            self.lines,
            self.config,
            self.error,
            self.job_id,
            self.progress_percent,
            self.total_expected,
            self.raw,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """A target and its configuration.

    Attributes:
        target_name: Its name.
        config: Its configuration (``model_name``, ``num_traj_per_stimulus``...).
        raw: Every field of the answer, known or not.
    """

    target_name: str
    config: Mapping[str, Any]
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)


@dataclass(frozen=True, slots=True)
class TargetList:
    """The targets of a repo.

    Attributes:
        targets: Their names.
        raw: Every field of the answer, known or not.
    """

    targets: list[str]
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)


# --- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """Which request an answer came from, for error messages."""

    method: str
    path: str
    status: int

    def fail(self, problem: str, value: Any = None) -> ProtocolError:
        """A :class:`ProtocolError` saying what is wrong with the answer."""
        shown = "" if value is None else f" (got {_show(value)})"
        return ProtocolError(
            f"{self.method} {self.path} -> {self.status}: the answer is not a valid API "
            f"response: {problem}{shown}",
            method=self.method,
            path=self.path,
            status=self.status,
            excerpt=_show(value),
        )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _object(data: Any, origin: Origin) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise origin.fail(f"expected a JSON object, got {type(data).__name__}", data)
    return data


def _int(
    data: Mapping[str, Any], key: str, origin: Origin, *, required: bool = False
) -> int | None:
    value = data.get(key)
    if value is None:
        if required:
            raise origin.fail(f"field '{key}' is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise origin.fail(f"field '{key}' should be an integer", value)
    return value


def _number(data: Mapping[str, Any], key: str, origin: Origin) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise origin.fail(f"field '{key}' should be a number", value)
    return float(value)


def _str(data: Mapping[str, Any], key: str, origin: Origin) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise origin.fail(f"field '{key}' should be a string", value)


def _mapping(data: Mapping[str, Any], origin: Origin) -> Mapping[str, Any]:
    for key in ("config", "parameters"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise origin.fail(f"field '{key}' should be an object", value)
        return MappingProxyType(value)
    return _EMPTY


def _state(data: Mapping[str, Any], origin: Origin) -> JobState:
    value = data.get("status")
    if not isinstance(value, str) or not value:
        raise origin.fail("field 'status' should be a non-empty string", value)
    return JobState(value)


def _job_id(data: Mapping[str, Any], origin: Origin) -> int | str | None:
    value = data.get("job_id")
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise origin.fail("field 'job_id' should be an integer or a string", value)


class _JobFields(TypedDict):
    status: JobState
    lines: int | None
    config: Mapping[str, Any]
    error: str | None
    job_id: int | str | None
    progress_percent: float | None
    total_expected: int | None
    raw: Mapping[str, Any]


def _job_fields(obj: dict[str, Any], origin: Origin) -> _JobFields:
    """The fields a job status and an output page share."""
    return {
        "status": _state(obj, origin),
        "lines": _int(obj, "lines", origin),
        "config": _mapping(obj, origin),
        "error": _str(obj, "error", origin),
        "job_id": _job_id(obj, origin),
        "progress_percent": _number(obj, "progress_percent", origin),
        "total_expected": _int(obj, "total_expected", origin),
        "raw": MappingProxyType(obj),
    }


def parse_job(data: Any, origin: Origin) -> JobStatus:
    """A :class:`JobStatus` from a decoded answer."""
    return JobStatus(**_job_fields(_object(data, origin), origin))


def parse_page(data: Any, origin: Origin) -> OutputPage:
    """An :class:`OutputPage` from a decoded answer."""
    obj = _object(data, origin)
    output = obj.get("output")
    if not isinstance(output, list):
        raise origin.fail("field 'output' should be a list of rows", output)
    for i, row in enumerate(output):
        if not isinstance(row, dict):
            raise origin.fail(f"row {i} of 'output' should be an object", row)
    has_more = obj.get("has_more")
    if not isinstance(has_more, bool):
        raise origin.fail("field 'has_more' should be true or false", has_more)
    offset = _int(obj, "offset", origin, required=True)
    limit = _int(obj, "limit", origin, required=True)
    assert offset is not None
    assert limit is not None
    return OutputPage(
        offset=offset, limit=limit, has_more=has_more, output=output, **_job_fields(obj, origin)
    )


def parse_target(data: Any, origin: Origin) -> Target:
    """A :class:`Target` from a decoded answer."""
    obj = _object(data, origin)
    name = _str(obj, "target_name", origin)
    if name is None:
        raise origin.fail("field 'target_name' is missing")
    return Target(target_name=name, config=_mapping(obj, origin), raw=MappingProxyType(obj))


def parse_target_list(data: Any, origin: Origin) -> TargetList:
    """A :class:`TargetList` from a decoded answer."""
    obj = _object(data, origin)
    targets = obj.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise origin.fail("field 'targets' should be a list of names", targets)
    return TargetList(targets=targets, raw=MappingProxyType(obj))
