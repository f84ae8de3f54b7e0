"""The aiohttp sender: one session and connection pool per client, and the one place where
aiohttp's exceptions become breadasync's."""

from __future__ import annotations

import asyncio
import re

import aiohttp
from yarl import URL

from ._clock import seconds_text
from ._errors import APIConnectionError, APITimeoutError, BreadError, CertificateError
from ._transports import AsyncBaseTransport, BodyTooLargeError, TransportRequest, TransportResponse

_CHUNK = 256 * 1024


class AiohttpTransport(AsyncBaseTransport):
    """Sends attempts over an aiohttp session created on first use.

    aiohttp's silent re-send of an idempotent request on a dropped connection is turned off,
    so every attempt on the wire is one the retry layer counted, waited for and logged.

    Args:
        max_connections: Size of the connection pool.
        trust_env: Use proxy settings from the environment.
    """

    def __init__(self, *, max_connections: int = 64, trust_env: bool = False) -> None:
        self._max_connections = max_connections
        self._trust_env = trust_env
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _session_for_this_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ttl_dns_cache=300, keepalive_timeout=30
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                trust_env=self._trust_env,
                raise_for_status=False,
            )
            # aiohttp re-sends a GET once, unseen, when a connection closes before the answer
            # (RFC 9112 allows it); the service then sees attempts nobody counted. aiohttp has
            # no public switch; its own test client flips this attribute the same way.
            if hasattr(session, "_retry_connection"):
                session._retry_connection = False
            self._session = session
            self._loop = loop
        elif self._loop is not loop:
            raise BreadError(
                "this BreadClient is bound to another event loop; create one client per loop"
            )
        return self._session

    async def aclose(self) -> None:
        """Close the session and its connections."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _timeout(self, request: TransportRequest) -> aiohttp.ClientTimeout:
        key = (request.timeout, request.connect_timeout, request.read_timeout)
        cached = self._timeouts.get(key)
        if cached is None:
            if len(self._timeouts) > 64:
                self._timeouts.clear()
            # ``total`` bounds one whole attempt, body included: a drip-fed body resets
            # ``sock_read`` forever.
            cached = aiohttp.ClientTimeout(
                total=request.timeout,
                connect=request.connect_timeout,
                sock_read=request.read_timeout,
            )
            self._timeouts[key] = cached
        return cached

    async def handle_async_request(self, request: TransportRequest) -> TransportResponse:
        """Send one attempt; aiohttp's failures come out as breadasync's."""
        session = self._session_for_this_loop()
        method, shown = request.method, request.path
        try:
            async with session.request(
                method,
                URL(request.url, encoded=True),
                headers=request.headers,
                data=request.content,
                timeout=self._timeout(request),
                allow_redirects=False,
            ) as resp:
                body = await _read_body(resp, request.max_body_bytes)
                return TransportResponse(resp.status, resp.headers, body)
        except TimeoutError:
            raise APITimeoutError(
                f"{method} {shown}: no complete answer within the timeout (connect "
                f"{seconds_text(request.connect_timeout)}, read "
                f"{seconds_text(request.read_timeout)}, attempt {seconds_text(request.timeout)})",
                method=method,
                path=shown,
            ) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise certificate_error(method, shown, request.url, exc.certificate_error) from None
        except aiohttp.ClientPayloadError as exc:
            raise APIConnectionError(
                f"{method} {shown}: the body could not be read whole: the connection "
                f"dropped mid-body, or its encoding is broken ({_reason(exc)})",
                method=method,
                path=shown,
            ) from None
        except aiohttp.ClientResponseError as exc:
            if not isinstance(exc.__cause__, aiohttp.http_exceptions.HttpProcessingError):
                # A proxy's refusal and the like: aiohttp's own words.
                raise APIConnectionError(
                    f"{method} {shown}: {_reason(exc)}", method=method, path=shown
                ) from None
            # The parser's: its "400" is aiohttp's code, not the service's status.
            raise APIConnectionError(
                f"{method} {shown}: the answer is not valid HTTP ({_reason(exc)})",
                method=method,
                path=shown,
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise APIConnectionError(
                f"{method} {shown}: cannot connect to {URL(request.url).origin()}: "
                f"{exc.strerror or _first_line(exc)}; is the base URL right and the service up?",
                method=method,
                path=shown,
            ) from None
        except aiohttp.ServerDisconnectedError:
            raise APIConnectionError(
                f"{method} {shown}: the server closed the connection", method=method, path=shown
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise APIConnectionError(
                f"{method} {shown}: {_first_line(exc)}", method=method, path=shown
            ) from None


def certificate_error(
    method: str, shown: str, url: str, exc: BaseException | None
) -> CertificateError:
    """The permanent error for a TLS certificate the client cannot trust."""
    reason = getattr(exc, "verify_message", None) or (_first_line(exc) if exc else "unknown")
    host = URL(url).host
    return CertificateError(
        f"{method} {shown}: the TLS certificate of {host} cannot be verified ({reason}); "
        "not retried: check the base URL, and the CA certificates this machine trusts "
        "(SSL_CERT_FILE)",
        method=method,
        path=shown,
    )


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    length = resp.content_length
    if length is not None and not resp.headers.get("Content-Encoding"):
        if length > limit:
            raise BodyTooLargeError(resp.status, f"{length:,} bytes")
        return await resp.read()
    # No trusted length (chunked or compressed): count while reading.
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(resp.status, f"more than {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _reason(exc: BaseException) -> str:
    """What aiohttp says went wrong, without its own ``400, message=`` wrapping."""
    text = getattr(exc, "message", None) or str(exc)
    text = " ".join(str(text).split())
    return re.sub(r"^\d{3}, message=?:? ?", "", text).strip("'\"") or type(exc).__name__
