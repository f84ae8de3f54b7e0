"""The data model: typed records of what the service answers (each keeps every field it was
sent in ``raw``), the target references every layer shares, and their parsing.

Parsing checks the types of the fields it reads and raises :class:`ProtocolError` (with the
request and the offending value) instead of letting a ``KeyError`` or a wrong type escape.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final, TypedDict, TypeVar

from ._errors import InvalidArgumentError, ProtocolError
from ._validation import check_name

_U = TypeVar("_U")

ProgressCallback = Callable[[_U], Any]
"""A progress callback: ``ProgressCallback[RolloutUpdate]`` for fan-outs,
``ProgressCallback[ExportProgress]`` for exports. Its return value is ignored."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _reduce(obj: Any) -> tuple[Any, ...]:
    """Pickling for the frozen answers below: their read-only mappings go as dicts (a
    ``mappingproxy`` cannot be pickled), so results and the errors holding them cross a
    process boundary (multiprocessing, a Ray task)."""
    state = {f.name: getattr(obj, f.name) for f in fields(obj)}
    proxies = tuple(name for name, value in state.items() if type(value) is MappingProxyType)
    for name in proxies:
        state[name] = dict(state[name])
    return (_rebuild, (type(obj), state, proxies))


def _rebuild(cls: type[Any], state: dict[str, Any], proxies: tuple[str, ...]) -> Any:
    for name in proxies:
        state[name] = MappingProxyType(state[name])
    return cls(**state)


class JobState(enum.StrEnum):
    """The state of a stim or rollout job. Terminal states are ``COMPLETE`` and ``FAILED``,
    and the stops the docs do not list but a service may send: ``cancelled`` (or
    ``canceled``), ``aborted``, ``error``, ``errored``, ``expired``.

    A state is read without regard to case or surrounding whitespace (``"COMPLETE"`` is
    ``COMPLETE``). Any other state the service invents later still parses, as a member that
    is neither terminal nor one of these (a job in it is waited for).
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
        normal = value.strip().lower()
        if normal in cls._value2member_map_:
            return cls(normal)
        member = str.__new__(cls, normal)
        member._name_ = normal.upper()
        member._value_ = normal
        return member

    @property
    def is_terminal(self) -> bool:
        """Whether the job has stopped (complete, failed, or another stop)."""
        return self is JobState.COMPLETE or self.is_stopped

    @property
    def is_stopped(self) -> bool:
        """Whether the job stopped without completing (``failed``, ``cancelled``...)."""
        return self is JobState.FAILED or self._value_ in _STOPPED

    @property
    def ended(self) -> str:
        """How a stopped job ended, for a sentence: ``failed``, ``ended cancelled``..."""
        return "failed" if self is JobState.FAILED else f"ended {self._value_}"


_STOPPED: Final = frozenset({"cancelled", "canceled", "aborted", "error", "errored", "expired"})


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

    __reduce__ = _reduce

    @property
    def is_terminal(self) -> bool:
        """Whether the job has stopped (complete, failed, or another stop)."""
        return self.status.is_terminal

    @property
    def is_complete(self) -> bool:
        """Whether the job finished successfully."""
        return self.status is JobState.COMPLETE

    @property
    def is_failed(self) -> bool:
        """Whether the job stopped without completing (``failed``, or ``cancelled`` and the
        like, see :class:`JobState`)."""
        return self.status.is_stopped

    @property
    def progress(self) -> float | None:
        """Percent done (0-100), from ``progress_percent`` or ``lines``/``total_expected``, if
        known."""
        if self.status is JobState.COMPLETE:
            return 100.0
        if self.progress_percent is not None:
            # Kept as sent in ``progress_percent``; a guide to polling only within 0-100.
            return min(100.0, max(0.0, self.progress_percent))
        if self.lines is not None and self.total_expected:
            return min(100.0, 100.0 * self.lines / self.total_expected)
        return None


@dataclass(frozen=True, slots=True)
class OutputPage:
    """One page of a job's output, and the job's status as the page reported it.

    Attributes:
        job: The job's status when the page was read (``page.status``, ``page.lines``...
            read through to it).
        offset: The offset the page starts at.
        limit: The page size asked for (a page may hold fewer rows: see ``output``).
        has_more: Whether the service says more rows follow.
        output: The rows, each a dict with every field the service sent.
        raw: Every field of the answer, known or not.
    """

    job: JobStatus
    offset: int
    limit: int
    has_more: bool
    output: list[dict[str, Any]]
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)

    __reduce__ = _reduce

    @property
    def status(self) -> JobState:
        """The job's state when the page was read."""
        return self.job.status

    @property
    def lines(self) -> int | None:
        """Lines the job has produced in all (the export's expected row count)."""
        return self.job.lines

    @property
    def config(self) -> Mapping[str, Any]:
        """The job's configuration."""
        return self.job.config

    @property
    def error(self) -> str | None:
        """The service's reason, when ``failed``."""
        return self.job.error

    @property
    def job_id(self) -> int | str | None:
        """The service's job id, when it sends one."""
        return self.job.job_id

    @property
    def progress_percent(self) -> float | None:
        """0-100 while running, when the service sends it."""
        return self.job.progress_percent

    @property
    def total_expected(self) -> int | None:
        """Lines the job will produce, when the service sends it."""
        return self.job.total_expected


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

    __reduce__ = _reduce


@dataclass(frozen=True, slots=True)
class TargetList:
    """The targets of a repo.

    Attributes:
        targets: Their names.
        raw: Every field of the answer, known or not.
    """

    targets: list[str]
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False)

    __reduce__ = _reduce

    def __iter__(self) -> Iterator[str]:
        """The names, as the official SDK's list results iterate."""
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __contains__(self, name: object) -> bool:
        return name in self.targets


@dataclass(frozen=True, slots=True, order=True)
class TargetRef:
    """One target of one repo."""

    repo_name: str
    target_name: str

    def __str__(self) -> str:
        return f"{self.repo_name}/{self.target_name}"

    @classmethod
    def of(cls, target_name: Any, repo_name: Any) -> TargetRef:
        """A checked reference (an :class:`InvalidArgumentError` for a bad name)."""
        return cls(check_name(repo_name, "repo_name"), check_name(target_name, "target_name"))


TargetLike = str | tuple[str, str] | TargetRef
"""A target name (with ``repo_name=``), a ``(repo, target)`` pair, or a :class:`TargetRef`."""


def normalise_targets(targets: Iterable[TargetLike], repo_name: str | None) -> list[TargetRef]:
    """The targets as :class:`TargetRef`, checked; nothing is sent if one is invalid."""
    if isinstance(targets, str | TargetRef):
        raise InvalidArgumentError("targets must be an iterable of targets, not a single one")
    if repo_name is not None:
        check_name(repo_name, "repo_name")
    refs = []
    for item in targets:
        if isinstance(item, TargetRef):
            ref = TargetRef.of(item.target_name, item.repo_name)
        elif isinstance(item, str):
            if repo_name is None:
                raise InvalidArgumentError(
                    f"target {item!r} has no repo: pass repo_name=..., or (repo, target) pairs"
                )
            ref = TargetRef.of(item, repo_name)
        elif isinstance(item, tuple) and len(item) == 2:
            ref = TargetRef.of(item[1], item[0])
        else:
            raise InvalidArgumentError(
                f"{item!r} is not a target: give a name, a (repo, target) pair or a TargetRef"
            )
        refs.append(ref)
    return refs


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
    if value < 0:
        # Every integer field is a count or a position: a negative one would turn into an
        # export of no rows, or a wait that never ends.
        raise origin.fail(f"field '{key}' should not be negative", value)
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
        job=JobStatus(**_job_fields(obj, origin)),
        offset=offset,
        limit=limit,
        has_more=has_more,
        output=output,
        raw=MappingProxyType(obj),
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
