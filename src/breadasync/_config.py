"""Configuration as frozen values, and the one place environment variables are read."""

from __future__ import annotations

import enum
import ipaddress
import os
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from yarl import URL

from ._errors import ConfigError
from ._validation import check_int, check_seconds

DEFAULT_BASE_URL: Final = "https://bapi.bread.com.ai"
ENV_API_KEY: Final = "BREAD_API_KEY"
ENV_BASE_URL: Final = "BREAD_BASE_URL"
DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024 * 1024


class _NotGiven(enum.Enum):
    NOT_GIVEN = enum.auto()

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> Literal[False]:
        return False


NOT_GIVEN: Final = _NotGiven.NOT_GIVEN
"""Sentinel for "use the client's default", distinct from ``None`` (which may mean "none")."""
NotGiven = Literal[_NotGiven.NOT_GIVEN]


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    check_seconds(value, name, allow_none=allow_none, error=ConfigError)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long a request may take.

    Attributes:
        connect: Seconds to open a connection (default 5).
        read: Seconds to wait for the next bytes of an answer (default 60).
        request: Seconds for one whole attempt, headers and body (default 120): a drip-fed
            body resets ``read`` forever, so only this bounds it.
        total: Seconds for a call across all its retries (default 600): no attempt outlives
            it, and no retry starts that would.

    ``None`` in any of them: no bound.
    """

    connect: float | None = 5.0
    read: float | None = 60.0
    request: float | None = 120.0
    total: float | None = 600.0

    def __post_init__(self) -> None:
        _positive("Timeouts.connect", self.connect, allow_none=True)
        _positive("Timeouts.read", self.read, allow_none=True)
        _positive("Timeouts.request", self.request, allow_none=True)
        _positive("Timeouts.total", self.total, allow_none=True)

    @classmethod
    def of(cls, value: float | Timeouts | TimeoutLike | None) -> Timeouts:
        """A :class:`Timeouts` from a number of seconds (one attempt), ``None`` (no bound at
        all, as the SDK's ``timeout=None``), an ``httpx.Timeout`` (its ``connect`` and
        ``read``; as there, nothing bounds one attempt, but the call keeps its ``total``) or
        a :class:`Timeouts`."""
        if isinstance(value, Timeouts):
            return value
        if value is None:
            return cls(connect=None, read=None, request=None, total=None)
        if isinstance(value, int | float):
            _positive("timeout", value)
            return cls(connect=min(5.0, value), read=value, request=value, total=max(600.0, value))
        if not hasattr(value, "read"):
            raise ConfigError(
                "timeout must be a positive number of seconds, None (no bound), a Timeouts "
                f"or an httpx.Timeout, not {type(value).__name__}"
            )
        return cls(connect=value.connect, read=value.read, request=None)


class TimeoutLike(Protocol):
    """What the SDK's ``timeout=`` also takes (``httpx.Timeout``): seconds to connect and
    between bytes, each ``None`` for no bound."""

    @property
    def connect(self) -> float | None:
        """Seconds to open a connection."""

    @property
    def read(self) -> float | None:
        """Seconds to wait for the next bytes of an answer."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before trying a request again.

    Connection errors, timeouts, 408, 429 and 5xx are retried; 400, 401, 402, 403, 404, 409
    and 422 never are. The wait before retry ``n`` (from 0) is
    ``min(max_backoff, initial_backoff * 2**n)``, less up to ``jitter`` of it at random, and
    never less than the ``Retry-After`` the service sent.

    Attributes:
        max_retries: Retries after the first attempt (default 5).
        initial_backoff: Seconds before the first retry (default 0.5).
        max_backoff: Cap of the exponential part (default 8).
        jitter: Fraction of the backoff taken off at random, 0..1 (default 0.25).
        max_retry_after: The longest ``Retry-After`` the client will wait out (default 60);
            beyond it the error is raised at once.
        first_read_backoff: Seconds before the first retry of a GET, when shorter than
            ``initial_backoff`` (default 0.05). A read is idempotent, and one failed answer
            is most often one flaky instance or one dropped connection; the client-wide
            governor (pace cut on overload) and the retry budget, not each request's own
            wait, are what protect a struggling service. Its later retries keep the
            schedule (``initial_backoff * 2``, ...), so a call outlasts an outage as long
            as before, and a ``Retry-After`` is still the floor. While the client's other
            answers mostly succeed, the schedule does not grow: a request's failures in a
            row are then bad luck (see :mod:`breadasync._limits`), retried at the first
            step's wait.
    """

    max_retries: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    jitter: float = 0.25
    max_retry_after: float = 60.0
    first_read_backoff: float = 0.05

    def __post_init__(self) -> None:
        check_int(self.max_retries, "max_retries", 0, error=ConfigError)
        for name in ("initial_backoff", "max_backoff", "max_retry_after", "first_read_backoff"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"RetryPolicy.{name} must be >= 0, got {value!r}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"RetryPolicy.jitter must be within 0..1, got {self.jitter!r}")


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """How often to ask a running job for its status.

    The first poll comes after ``initial`` seconds; each next interval is ``factor`` times
    the last, up to ``maximum`` (the docs recommend 10-30 s for rollouts), but at most a
    quarter of the time the job has been watched (a job that reports no progress is still
    seen complete soon), or sooner when its progress says it will finish sooner; ``jitter``
    spreads many pollers apart.

    Attributes:
        initial: Seconds before the first poll (default 1).
        maximum: Longest interval (default 30).
        minimum: Shortest interval (default 0.25).
        factor: Growth of the interval per poll (default 1.5).
        jitter: Up to this fraction of an interval added at random (default 0.1).
    """

    initial: float = 1.0
    maximum: float = 30.0
    minimum: float = 0.25
    factor: float = 1.5
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "minimum"):
            _positive(f"PollPolicy.{name}", getattr(self, name))
        if self.minimum > self.maximum:
            raise ConfigError("PollPolicy.minimum must not exceed PollPolicy.maximum")
        if self.factor < 1:
            raise ConfigError(f"PollPolicy.factor must be >= 1, got {self.factor!r}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"PollPolicy.jitter must be within 0..1, got {self.jitter!r}")


@dataclass(frozen=True, slots=True)
class Limits:
    """How hard one client may push the service; shared by every call and task using it.

    Attributes:
        max_concurrency: Requests in flight at once (default 64).
        max_requests_per_second: A steady pace for all requests (default: none). Below it,
            the client paces itself after a 429 or under overload (see
            :mod:`breadasync._limits`).
        max_body_bytes: The largest answer accepted (default 64 MiB).
    """

    max_concurrency: int = 64
    max_requests_per_second: float | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        check_int(self.max_concurrency, "max_concurrency", 1, error=ConfigError)
        if self.max_requests_per_second is not None:
            _positive("max_requests_per_second", self.max_requests_per_second)
        check_int(self.max_body_bytes, "max_body_bytes", 1024, error=ConfigError)


def resolve_api_key(api_key: str | None) -> str:
    """The key to use: the argument, else ``BREAD_API_KEY``; a :class:`ConfigError` if none."""
    key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
    if key is not None and not isinstance(key, str):
        raise ConfigError(f"api_key must be a str, got {type(key).__name__}")
    if key is None or not key.strip():
        raise ConfigError(
            f"no API key: set the {ENV_API_KEY} environment variable (or pass api_key=..., "
            "or --api-key on the command line)"
        )
    key = key.strip()
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in key) or not key.isascii():
        # Never echo the key itself, not even in this message.
        raise ConfigError("the API key contains spaces, control or non-ASCII characters")
    return key


def resolve_base_url(base_url: str | None, *, allow_insecure_http: bool) -> URL:
    """The service's base URL: the argument, else ``BREAD_BASE_URL``, else the public one.

    Plain ``http`` is allowed only to loopback hosts (``localhost`` itself, and the literal
    addresses 127.0.0.0/8 and ``::1``) unless ``allow_insecure_http`` is set, since the key
    travels in a header. A path ending in ``/v1`` (as in the API docs) is dropped: every
    request path already starts with ``/v1``.
    """
    raw = base_url if base_url is not None else os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
    if not isinstance(raw, str):
        raise ConfigError(f"base_url must be a str, got {type(raw).__name__}")
    try:
        url = URL(raw.strip())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"base_url {raw!r} is not a URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"base_url {raw!r} must be an http(s) URL with a host, like {DEFAULT_BASE_URL}"
        )
    if url.user or url.password:
        raise ConfigError("base_url must not carry credentials; pass api_key instead")
    if url.query_string or url.fragment:
        # Not echoed: a query may hold a secret (a key pasted there by mistake).
        shown = str(url.with_query(None).with_fragment(None))
        raise ConfigError(f"base_url {shown!r} must not have a query (?...) or fragment (#...)")
    if url.scheme == "http" and not allow_insecure_http and not _is_loopback(url.host):
        raise ConfigError(
            f"base_url {raw!r} uses plain http to a host that is not loopback, which would "
            "send the API key unencrypted; use https, or allow it explicitly "
            "(allow_insecure_http=True; --allow-insecure-http on the command line)"
        )
    path = url.path.rstrip("/")
    if path == "/v1" or path.endswith("/v1"):
        path = path[: -len("/v1")]
    return url.with_path(path)


def _is_loopback(host: str) -> bool:
    # Only what cannot leave the machine: ``*.localhost`` names may be resolved through DNS.
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


TimeoutArg = float | Timeouts | TimeoutLike | None
"""What ``timeout=`` takes: seconds for one attempt, a :class:`Timeouts`, an
``httpx.Timeout`` or ``None`` (no bound), as the SDK's does."""
