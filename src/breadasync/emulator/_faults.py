"""Fault switches: what the emulator does wrong, on purpose, when asked.

Each switch is independent and counted in :class:`Stats` under its own fault name:
``"500"``/``"502"``/``"503"``/``"504"``... (``errors``), ``"drop"``, ``"truncate"``, ``"drip"``,
``"rate_limit"`` (the per-key token bucket), ``"429"`` (the older per-scope ``rate_limit``),
``"overload"``, ``"corrupt"`` and ``"redirect"``. How they are carried out is
``_faultexec``'s business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

RetryAfterFormat = Literal["both", "seconds", "http-date", "ms", "none"]
HostileKind = Literal[
    # hostile bodies: a parser must refuse them without crashing or stalling
    "deep",
    "deep-object",
    "deep-row",
    "deep-row-object",
    "deep-field",
    "deep-field-object",
    "huge-string",
    "many-keys",
    "nan",
    "lone-surrogate",
    "duplicate-keys",
    "big-int",
]
"""The corrupt kinds that attack a JSON parser (issue 17's hostile bodies)."""
CorruptKind = Literal[
    "html",
    "truncated",
    "huge",
    "wrong-types",
    "has-more-lies",
    "overlong",
    "empty",
    "echo",
    HostileKind,
]
"""Every kind of broken body the ``corrupt`` fault sends."""
HOSTILE_KINDS: tuple[HostileKind, ...] = get_args(HostileKind)
"""The corrupt kinds that attack a JSON parser, as a tuple (from :data:`HostileKind`)."""

ROUTES = frozenset(
    {
        "list_targets",
        "create_target",
        "get_target",
        "run_stim",
        "get_stim",
        "get_stim_output",
        "run_rollout",
        "get_rollout",
        "get_rollout_output",
    }
)
"""The names of the API routes, as used by fault filters and request counters."""


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault switches, all off by default.

    Set them for the whole server or for one target with :meth:`Emulator.set_faults`; a
    target's faults replace the server's for requests to that target. Fractions are drawn
    per request from the emulator's seeded random generator.
    """

    latency: float = 0.0
    """Seconds added before every response."""
    jitter: float = 0.0
    """Up to this many more seconds, uniformly at random."""
    errors: Mapping[int, float] = field(default_factory=dict)
    """Status code -> fraction of requests answered with it (502 gets an HTML body, 429 and
    503 a ``Retry-After``)."""
    retry_after: float = 1.0
    """Seconds a 503 (or an injected 429) asks the client to wait."""
    retry_after_format: RetryAfterFormat = "both"
    """How the wait is written: ``Retry-After`` seconds, an HTTP date, ``retry-after-ms``,
    ``both`` (integer seconds and exact milliseconds) or ``none``."""
    should_retry: bool | None = None
    """If set, injected errors carry ``x-should-retry: true|false``."""
    rate_limit: float | None = None
    """Requests per second allowed (token bucket, burst ``rate_burst``); the excess is 429."""
    rate_burst: int = 1
    key_rate_limit: float | None = None
    """Requests per second allowed per API key: one token bucket (wall clock, burst
    ``key_rate_burst``) shared by every request of a key, as a real gateway keeps it, taken
    when the request arrives (before the ``latency`` of the backend behind it). The excess
    is 429 with ``Retry-After`` rounded up to whole seconds, as delta-seconds or as an
    HTTP-date of 1 s resolution (half each), or with no header at all
    (``key_rate_no_header`` of them)."""
    key_rate_burst: int = 1
    key_rate_no_header: float = 0.2
    overload_seconds: float = 0.0
    """True overload: for this many seconds on the emulator clock (real seconds at speed 1;
    frozen at speed 0 until ``clock.advance``), from ``overload_start`` (emulated time;
    ``None``: when these faults are set), every request is 503."""
    overload_start: float | None = None
    overload_retry_after: float | None = 1.0
    """The overload's ``Retry-After`` in seconds (rounded up), or ``None`` for no header."""
    drop: float = 0.0
    """Fraction of responses whose connection is closed halfway through the body."""
    truncate: float = 0.0
    """Fraction of responses whose JSON body is cut short (a complete HTTP response)."""
    drip: float = 0.0
    """Fraction of responses drip-fed at ``drip_rate`` bytes per second."""
    drip_rate: float = 64_000.0
    slow_body: float | None = None
    """Bytes per second at which every body is written (a drip-feed of all of them)."""
    page_cap: int | None = None
    """Most rows an output page returns, whatever ``limit`` asked for."""
    growing_lines: int = 0
    """A complete job's ``lines`` grows by this much on every read (a server that lies)."""
    corrupt: float = 0.0
    """Fraction of successful responses replaced by a broken body of ``corrupt_kind``."""
    corrupt_kind: CorruptKind = "html"
    """``html`` (not JSON), ``truncated`` JSON, ``deep`` nesting, a ``huge`` body, fields of
    ``wrong-types``, a ``has_more`` that lies, an ``overlong`` page (one row more than
    asked), an ``empty`` page (no rows although ``lines`` says there are), or an ``echo``
    of the request's headers as plain text (as a debugging proxy might); and the hostile
    kinds (:data:`HOSTILE_KINDS`): ``deep`` arrays / ``deep-object`` objects at the top
    level, ``deep-row``/``deep-row-object`` as one row of a page, ``deep-field``/
    ``deep-field-object`` inside a row (``hostile_depth`` levels); ``huge-string``: a row
    whose string is the emulator's ``huge_body_bytes`` long, sent in chunks; ``many-keys``
    (``hostile_keys`` keys in one row); ``nan`` (``NaN``/``Infinity`` tokens);
    ``lone-surrogate`` (``\\ud83d`` alone in an escape); ``duplicate-keys``; ``big-int``
    (integers beyond 64 bits). A body without rows (a job status) carries the value in a
    top-level field."""
    echo_request: bool = False
    """Injected errors echo the request's headers in their message, as a debugging proxy
    might (a client must not repeat the key it finds there)."""
    redirect_to: str | None = None
    """Answer every request with a 307 to this origin (the key must not follow it)."""
    routes: frozenset[str] | None = None
    """Route names the faults apply to (default: every API route)."""
    max_faults: int | None = None
    """Stop injecting after this many faults (``None``: never stop)."""
    hostile_depth: int = 100_000
    """Nesting depth of the ``deep*`` corrupt kinds."""
    hostile_keys: int = 1_000_000
    """Keys of the object the ``many-keys`` corrupt kind sends."""

    def __post_init__(self) -> None:
        for name in (
            "latency",
            "jitter",
            "drop",
            "truncate",
            "drip",
            "corrupt",
            "retry_after",
            "overload_seconds",
            "key_rate_no_header",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"Faults.{name} must be >= 0, got {getattr(self, name)!r}")
        for status, rate in self.errors.items():
            if not 400 <= int(status) <= 599:
                raise ValueError(f"Faults.errors: {status!r} is not an HTTP error status")
            if not 0 <= rate <= 1:
                raise ValueError(f"Faults.errors[{status}] must be within 0..1, got {rate!r}")
        if sum(self.errors.values()) > 1:
            raise ValueError("Faults.errors: the fractions add up to more than 1")
        for name in ("drop", "truncate", "drip", "corrupt", "key_rate_no_header"):
            if getattr(self, name) > 1:
                raise ValueError(f"Faults.{name} is a fraction within 0..1")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("Faults.rate_limit must be > 0 requests per second")
        if self.key_rate_limit is not None and self.key_rate_limit <= 0:
            raise ValueError("Faults.key_rate_limit must be > 0 requests per second")
        if self.drip_rate <= 0:
            raise ValueError("Faults.drip_rate must be > 0 bytes per second")
        if self.hostile_depth < 1 or self.hostile_keys < 1:
            raise ValueError("Faults.hostile_depth and Faults.hostile_keys must be >= 1")
        if self.slow_body is not None and self.slow_body <= 0:
            raise ValueError("Faults.slow_body must be > 0 bytes per second")
        if self.page_cap is not None and self.page_cap < 1:
            raise ValueError("Faults.page_cap must be >= 1")
        if self.routes is not None and not self.routes <= ROUTES:
            unknown = ", ".join(sorted(self.routes - ROUTES))
            raise ValueError(f"Faults.routes: unknown route(s) {unknown}; known: {sorted(ROUTES)}")

    def applies_to(self, route: str) -> bool:
        """Whether these faults touch requests to ``route``."""
        return self.routes is None or route in self.routes

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from JSON-like data (a scenario file or the control API); unknown keys fail."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault switch(es): {', '.join(sorted(unknown))}")
        kwargs = dict(data)
        if "errors" in kwargs:
            kwargs["errors"] = {int(k): float(v) for k, v in dict(kwargs["errors"]).items()}
        if kwargs.get("routes") is not None:
            kwargs["routes"] = frozenset(kwargs["routes"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        out["errors"] = {str(k): v for k, v in self.errors.items()}
        out["routes"] = sorted(self.routes) if self.routes is not None else None
        return out
