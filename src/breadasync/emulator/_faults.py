"""Fault switches: what the emulator does wrong, on purpose, when asked."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RetryAfterFormat = Literal["both", "seconds", "http-date", "ms", "none"]
CorruptKind = Literal[
    "html",
    "truncated",
    "deep",
    "huge",
    "wrong-types",
    "has-more-lies",
    "overlong",
    "empty",
    "echo",
]

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
    drop: float = 0.0
    """Fraction of responses whose connection is closed halfway through the body."""
    slow_body: float | None = None
    """Bytes per second at which bodies are written (a drip-feed)."""
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
    of the request's headers as plain text (as a debugging proxy might)."""
    echo_request: bool = False
    """Injected errors echo the request's headers in their message, as a debugging proxy
    might (a client must not repeat the key it finds there)."""
    redirect_to: str | None = None
    """Answer every request with a 307 to this origin (the key must not follow it)."""
    routes: frozenset[str] | None = None
    """Route names the faults apply to (default: every API route)."""
    max_faults: int | None = None
    """Stop injecting after this many faults (``None``: never stop)."""

    def __post_init__(self) -> None:
        for name in ("latency", "jitter", "drop", "corrupt", "retry_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"Faults.{name} must be >= 0, got {getattr(self, name)!r}")
        for status, rate in self.errors.items():
            if not 400 <= int(status) <= 599:
                raise ValueError(f"Faults.errors: {status!r} is not an HTTP error status")
            if not 0 <= rate <= 1:
                raise ValueError(f"Faults.errors[{status}] must be within 0..1, got {rate!r}")
        if sum(self.errors.values()) > 1:
            raise ValueError("Faults.errors: the fractions add up to more than 1")
        for name in ("drop", "corrupt"):
            if getattr(self, name) > 1:
                raise ValueError(f"Faults.{name} is a fraction within 0..1")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("Faults.rate_limit must be > 0 requests per second")
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
