"""The transport seam, as httpx draws it: :class:`AsyncBaseTransport` sends one attempt and
returns the answer; :class:`MockTransport` answers from a function, for tests.

A transport does one thing: put one request on the wire and bring back its status, headers
and body. It never retries, never follows a redirect, never paces; retries, limits, error
mapping and ``Retry-After`` live above it (:mod:`breadasync._transport`) and wrap any
transport. The aiohttp sender (:mod:`breadasync._aiohttp_transport`) is one implementation.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio

from ._redact import HIDDEN

_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
"""Headers a request's repr hides."""


@dataclass(frozen=True, slots=True)
class TransportRequest:
    """One attempt to send.

    Attributes:
        method: ``"GET"``, ``"POST"``...
        url: The absolute URL, already encoded.
        path: The path with its query, as errors and logs show it.
        headers: The request's own headers (auth and user agent included).
        content: The body, or ``None``.
        connect_timeout, read_timeout: Seconds to connect, and between bytes of the answer.
        timeout: Seconds for the whole attempt, body included.
        max_body_bytes: The largest body to read; a transport stops reading beyond it and
            raises :class:`BodyTooLargeError`.
    """

    method: str
    url: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None
    connect_timeout: float | None = None
    read_timeout: float | None = None
    timeout: float | None = None
    max_body_bytes: int = 64 * 1024 * 1024

    def __repr__(self) -> str:
        # A failed assertion on recorded requests prints them: never the credentials.
        headers = {
            k: HIDDEN if k.lower() in _SECRET_HEADERS else v for k, v in self.headers.items()
        }
        return (
            f"TransportRequest(method={self.method!r}, url={self.url!r}, headers={headers!r}, "
            f"content={self.content!r}, timeout={self.timeout!r})"
        )


@dataclass(frozen=True, slots=True)
class TransportResponse:
    """One answer: status, headers (looked up case-insensitively above the transport) and the
    whole body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes = b""


class BodyTooLargeError(Exception):
    """Raised by a transport that stopped reading a body over ``max_body_bytes``.

    Attributes:
        status: The answer's status.
        size: What is known of the size, for the message (``"70,000,000 bytes"``).
    """

    def __init__(self, status: int, size: str) -> None:
        super().__init__(f"{status}: {size}")
        self.status = status
        self.size = size


class AsyncBaseTransport(ABC):
    """Sends one attempt. Subclass it to put breadasync on another HTTP stack, or use
    :class:`MockTransport` in tests; pass it as ``BreadClient(transport=...)``.

    :meth:`handle_async_request` returns the answer whatever its status (3xx, 4xx and 5xx
    included; redirects are not followed). When there is no usable answer it raises
    :class:`~breadasync.APIConnectionError` (or a subclass: :class:`~breadasync.
    APITimeoutError`, :class:`~breadasync.CertificateError`), or one of ``TimeoutError``,
    ``ssl.SSLCertVerificationError`` or ``OSError``, which the layer above maps to those.
    """

    @abstractmethod
    async def handle_async_request(self, request: TransportRequest) -> TransportResponse:
        """Send ``request`` once and return its answer."""

    async def aclose(self) -> None:  # noqa: B027 (a transport without resources needs nothing)
        """Release connections; the default has none."""


Handler = Callable[[TransportRequest], TransportResponse | Awaitable[TransportResponse]]
"""What :class:`MockTransport` calls: a plain or async function of the request."""


class MockTransport(AsyncBaseTransport):
    """A transport that answers every attempt by calling ``handler(request)``.

    The handler may be sync or async, may sleep (on a :class:`~breadasync.testing.
    VirtualClock` in tests), and may raise what a transport raises (``OSError`` for a reset
    connection, ``TimeoutError``...). The attempt's ``timeout`` is enforced around it, and a
    body over ``max_body_bytes`` is refused as a real transport would.

    Attributes:
        requests: Every request it was handed, in order (what "the server" saw).
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.requests: list[TransportRequest] = []

    async def handle_async_request(self, request: TransportRequest) -> TransportResponse:
        """Call the handler, under the attempt's timeout."""
        self.requests.append(request)
        with anyio.fail_after(request.timeout):
            answer = self._handler(request)
            if inspect.isawaitable(answer):
                answer = await answer
        if len(answer.content) > request.max_body_bytes:
            raise BodyTooLargeError(answer.status, f"{len(answer.content):,} bytes")
        return answer
