"""The one request path: every call of a client goes through :meth:`Transport.request`.

It builds the URL (path segments already percent-encoded by the caller), adds the auth and
user-override headers, waits for the client's rate and concurrency limits, sends one
attempt with its timeouts, reads the body under a size cap, maps failures to the exceptions
of :mod:`breadasync._errors` (aiohttp's never escape), and retries what is worth retrying.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

import aiohttp
import anyio
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from ._config import Limits, RetryPolicy, Timeouts
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    BreadError,
    ClientClosedError,
    InvalidArgumentError,
    ProtocolError,
    RedirectError,
    server_message,
    status_error_class,
)
from ._limits import AdaptiveConcurrency, Pause, RateLimiter
from ._retry import BACKPRESSURE, backoff, is_retryable_status, parse_retry_after
from ._version import __version__

log = logging.getLogger("breadasync")

_EXCERPT = 200
_HTML_TITLE = re.compile(rb"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAGS = re.compile(r"<[^>]+>")


@dataclass(frozen=True, slots=True)
class Response:
    """A successful (2xx) answer: its status, headers and body bytes, and the request's
    method and path (with query) as errors show them."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    method: str
    path: str


@dataclass(slots=True)
class ClientStats:
    """What one client has done so far (read it through :attr:`BreadClient.stats`).

    Attributes:
        requests: Attempts sent (each retry counts).
        retries: Attempts that were retries.
        responses: Answers by HTTP status.
        connection_errors: Attempts that got no usable answer.
        throttled: Answers that asked the client to slow down (429, 503).
        bytes_received: Body bytes read.
        concurrency_limit: Requests allowed in flight now (shrinks under backpressure).
        concurrency_cuts: How many times backpressure halved ``concurrency_limit``.
        max_concurrency: The configured ceiling of ``concurrency_limit``.
        in_flight: Requests in flight now.
    """

    requests: int = 0
    retries: int = 0
    responses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    throttled: int = 0
    bytes_received: int = 0
    concurrency_limit: int = 0
    concurrency_cuts: int = 0
    max_concurrency: int = 0
    in_flight: int = 0


class Transport:
    """Sends requests for one client over one aiohttp session and connection pool."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: URL,
        timeouts: Timeouts,
        retry: RetryPolicy,
        limits: Limits,
        trust_env: bool = False,
    ) -> None:
        self._key = api_key
        self._base = str(base_url)
        self._origin = base_url.origin()
        self.timeouts = timeouts
        self.retry = retry
        self.limits = limits
        self._trust_env = trust_env
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._concurrency = AdaptiveConcurrency(limits.max_concurrency)
        self._pause = Pause()
        self._rate = (
            RateLimiter(limits.max_requests_per_second) if limits.max_requests_per_second else None
        )
        self._stats = ClientStats(max_concurrency=limits.max_concurrency)
        self._client_timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}
        self._rng = random.Random()

    @property
    def base_url(self) -> str:
        """The base URL requests go to."""
        return self._base

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    def stats(self) -> ClientStats:
        """A snapshot of the counters."""
        s = self._stats
        return ClientStats(
            requests=s.requests,
            retries=s.retries,
            responses=Counter(s.responses),
            connection_errors=s.connection_errors,
            throttled=s.throttled,
            bytes_received=s.bytes_received,
            concurrency_limit=self._concurrency.limit,
            concurrency_cuts=self._concurrency.cuts,
            max_concurrency=self._concurrency.maximum,
            in_flight=self._concurrency.in_flight,
        )

    def scrub(self, text: str) -> str:
        """``text`` with the API key replaced, should the service have echoed it."""
        return text.replace(self._key, "***") if self._key in text else text

    def scrubbed(self, error: ProtocolError) -> ProtocolError:
        """``error`` with the API key replaced in its texts: a broken answer may echo it."""
        error.message = self.scrub(error.message)
        error.args = (error.message,)
        error.excerpt = self.scrub(error.excerpt)
        return error

    def _scrub_bytes(self, body: bytes) -> bytes:
        key = self._key.encode()
        return body.replace(key, b"***") if key in body else body

    # --- the session --------------------------------------------------------------------

    def _session_for_this_loop(self, method: str, shown: str) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError(
                f"{method} {shown}: the client is closed; create a new BreadClient",
                method=method,
                path=shown,
            )
        loop = asyncio.get_running_loop()
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.limits.max_concurrency, ttl_dns_cache=300, keepalive_timeout=30
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={
                    "Authorization": f"Bearer {self._key}",
                    "User-Agent": f"breadasync/{__version__}",
                    "Accept": "application/json",
                },
                timeout=aiohttp.ClientTimeout(total=None),
                trust_env=self._trust_env,
                raise_for_status=False,
            )
            self._loop = loop
        elif self._loop is not loop:
            raise BreadError(
                "this BreadClient is bound to another event loop; create one client per loop"
            )
        return self._session

    async def aclose(self) -> None:
        """Close the session; requests in flight fail with :class:`ClientClosedError`."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- one request, with retries ------------------------------------------------------

    def url_for(self, path: str, params: Mapping[str, Any] | None = None) -> tuple[URL, str]:
        """The URL for ``path`` (already encoded) and the path-with-query shown in errors."""
        if not path.startswith("/") or path.startswith("//") or "://" in path.split("?")[0]:
            raise InvalidArgumentError(
                f"{path!r} is not a path on the configured origin: pass a path such as "
                "'/v1/repo/my_repo/targets' (absolute URLs are refused so the API key only "
                f"goes to {self._origin})"
            )
        shown = path
        if params:
            shown = f"{path}?{urlencode(params)}"
        return URL(self._base + shown, encoded=True), shown

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        user_id: str | None = None,
        timeouts: Timeouts | None = None,
        idempotency_key: str | None = None,
    ) -> Response:
        """Send a request, retrying per the policy, and return the 2xx answer.

        Raises:
            APIStatusError: The service answered an error status (after retries if any).
            APIConnectionError: No usable answer (after retries).
            ProtocolError: A redirect, or a body over the size limit.
        """
        url, shown = self.url_for(path, params)
        timeouts = timeouts or self.timeouts
        policy = self.retry
        headers: dict[str, str] = {}
        if user_id:
            headers["X-User-Id"] = user_id
        data: bytes | None = None
        if method != "GET":
            # One key per call, reused by its retries, so a repeat is recognised as such.
            headers["Idempotency-Key"] = idempotency_key or f"breadasync-{uuid.uuid4()}"
            data = b"" if json_body is None else orjson.dumps(json_body)
            if json_body is not None:
                headers["Content-Type"] = "application/json"
        client_timeout = self._client_timeout(timeouts)
        deadline = math.inf if timeouts.total is None else anyio.current_time() + timeouts.total
        attempt = 0
        while True:
            await self._pause.wait()
            if self._rate is not None:
                await self._rate.wait()
            slot = await self._concurrency.acquire()
            attempt_timeout = client_timeout
            remaining = deadline - anyio.current_time()
            if remaining < (client_timeout.total or math.inf):
                # No attempt may outlive the call's total timeout.
                attempt_timeout = aiohttp.ClientTimeout(
                    total=max(remaining, 0.001),
                    connect=client_timeout.connect,
                    sock_read=client_timeout.sock_read,
                )
            try:
                outcome = await self._attempt(method, url, shown, headers, data, attempt_timeout)
            finally:
                self._concurrency.release(slot)
            if isinstance(outcome, Response):
                self._concurrency.succeeded()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s %s -> %d (%d bytes)", method, shown, outcome.status, len(outcome.body)
                    )
                return outcome
            error = outcome
            retryable = False
            retry_after: float | None = None
            if isinstance(error, APIStatusError):
                retry_after = error.retry_after
                retryable = is_retryable_status(error.status, error.headers)
                if error.status in BACKPRESSURE:
                    self._stats.throttled += 1
                    self._concurrency.pushed_back(slot)
                    if retry_after is not None and retry_after <= policy.max_retry_after:
                        # The service's "wait" is for this client, not just this request.
                        self._pause.hold(retry_after)
            elif isinstance(error, APIConnectionError):
                retryable = not self._closed
            if not retryable:
                # A permanent answer: earlier transient failures do not make it "given up".
                error.attempts = attempt + 1
                raise error
            if attempt >= policy.max_retries:
                raise _gave_up(error, attempt + 1)
            if retry_after is not None and retry_after > policy.max_retry_after:
                raise _gave_up(
                    error,
                    attempt + 1,
                    f"the service asked to wait {retry_after:.0f}"
                    f" s, more than max_retry_after={policy.max_retry_after:.0f} s",
                )
            wait = backoff(policy, attempt, retry_after, self._rng)
            if anyio.current_time() + wait > deadline:
                raise _gave_up(
                    error,
                    attempt + 1,
                    f"the next retry would pass the total timeout of {timeouts.total} s",
                )
            log.debug("retrying %s %s in %.2f s after: %s", method, shown, wait, error.message)
            await anyio.sleep(wait)
            attempt += 1
            self._stats.retries += 1

    def _client_timeout(self, timeouts: Timeouts) -> aiohttp.ClientTimeout:
        cached = self._client_timeouts.get(timeouts)
        if cached is None:
            # ``total`` bounds one whole attempt, body included: a drip-fed body resets
            # ``sock_read`` forever.
            cached = aiohttp.ClientTimeout(
                total=timeouts.request, connect=timeouts.connect, sock_read=timeouts.read
            )
            self._client_timeouts[timeouts] = cached
        return cached

    async def _attempt(
        self,
        method: str,
        url: URL,
        shown: str,
        headers: Mapping[str, str],
        data: bytes | None,
        timeout: aiohttp.ClientTimeout,
    ) -> Response | APIError:
        """One attempt: the 2xx answer, or the error it ended in (never raised for
        retryable failures, so the caller decides)."""
        session = self._session_for_this_loop(method, shown)
        self._stats.requests += 1
        try:
            async with session.request(
                method, url, headers=headers, data=data, timeout=timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                self._stats.responses[status] += 1
                if 300 <= status < 400:
                    location = self.scrub(resp.headers.get("Location", "(no Location header)"))
                    raise RedirectError(
                        f"{method} {shown} -> {status}: the service redirected to {location}; "
                        "redirects are not followed so the API key never leaves "
                        f"{self._origin}. Check the base URL.",
                        method=method,
                        path=shown,
                        status=status,
                        location=location,
                    )
                body = await self._read_body(resp, method, shown)
                if status >= 400:
                    return self._status_error(method, shown, status, resp.headers, body)
                return Response(status, resp.headers, body, method, shown)
        except APIError:
            raise
        except TimeoutError:
            self._stats.connection_errors += 1
            return APITimeoutError(
                f"{method} {shown}: no complete answer within the timeout "
                f"({_timeout_text(timeout)})",
                method=method,
                path=shown,
            )
        except aiohttp.ClientPayloadError as exc:
            self._stats.connection_errors += 1
            return self._connection_error(
                method, shown, f"the connection dropped mid-body ({_first_line(exc)})"
            )
        except aiohttp.ClientConnectorError as exc:
            self._stats.connection_errors += 1
            return self._connection_error(
                method,
                shown,
                f"cannot connect to {self._origin}: "
                f"{exc.strerror or _first_line(exc)}; is the base URL right and the service up?",
            )
        except aiohttp.ServerDisconnectedError:
            self._stats.connection_errors += 1
            return self._connection_error(method, shown, "the server closed the connection")
        except (aiohttp.ClientError, OSError) as exc:
            self._stats.connection_errors += 1
            return self._connection_error(method, shown, _first_line(exc))

    def _connection_error(self, method: str, shown: str, what: str) -> APIConnectionError:
        if self._closed:
            return ClientClosedError(
                f"{method} {shown}: the client was closed while the request was in flight",
                method=method,
                path=shown,
            )
        return APIConnectionError(
            f"{method} {shown}: {self.scrub(what)}", method=method, path=shown
        )

    async def _read_body(self, resp: aiohttp.ClientResponse, method: str, shown: str) -> bytes:
        limit = self.limits.max_body_bytes
        length = resp.content_length
        if length is not None and not resp.headers.get("Content-Encoding"):
            if length > limit:
                raise self._too_large(method, shown, resp.status, f"{length:,} bytes")
            body = await resp.read()
        else:
            # No trusted length (chunked or compressed): count while reading.
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(256 * 1024):
                size += len(chunk)
                if size > limit:
                    raise self._too_large(method, shown, resp.status, f"more than {limit:,} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
        self._stats.bytes_received += len(body)
        return body

    def _too_large(self, method: str, shown: str, status: int, size: str) -> ProtocolError:
        return ProtocolError(
            f"{method} {shown} -> {status}: the answer is {size}, over the limit of "
            f"{self.limits.max_body_bytes:,} bytes (Limits.max_body_bytes); no page of this "
            "API should be that large",
            method=method,
            path=shown,
            status=status,
        )

    def _status_error(
        self, method: str, shown: str, status: int, headers: CIMultiDictProxy[str], body: bytes
    ) -> APIStatusError:
        body = self._scrub_bytes(body[: 16 * 1024])
        message: str | None = None
        code: str | None = None
        try:
            message, code = server_message(orjson.loads(body))
        except orjson.JSONDecodeError:
            message = _text_excerpt(body)
        if message:
            message = self.scrub(message)
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        text = f"{method} {shown} -> {status} {reason}"
        if message:
            text += f": {message}"
        retry_after = parse_retry_after(headers)
        return status_error_class(status)(
            text,
            method=method,
            path=shown,
            status=status,
            server_message=message,
            code=code,
            body=body,
            headers=headers,
            retry_after=retry_after,
        )


def decode_json(body: bytes, *, method: str, path: str, status: int) -> Any:
    """Decode an answer's JSON, or raise a :class:`ProtocolError` that shows its start."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        deep = "depth" in str(exc) or "recursion" in str(exc)
        problem = "JSON nested too deeply" if deep else f"not JSON ({exc})"
        excerpt = _text_excerpt(body) if not deep else body[:40].decode("utf-8", "replace")
        raise ProtocolError(
            f"{method} {path} -> {status}: the answer is {problem}; it begins: {excerpt!r}",
            method=method,
            path=path,
            status=status,
            excerpt=excerpt,
        ) from None


def _gave_up(error: APIError, attempts: int, why: str | None = None) -> APIError:
    if attempts > 1 or why:
        note = f"gave up after {attempts} attempt{'s' if attempts > 1 else ''}"
        if why:
            note += f": {why}"
        error.message = f"{error.message} ({note})"
        error.args = (error.message,)
    error.attempts = attempts
    return error


def _text_excerpt(body: bytes) -> str:
    title = _HTML_TITLE.search(body[:4096])
    if title:
        return title.group(1).decode("utf-8", "replace").strip()
    text = _TAGS.sub(" ", body[: _EXCERPT * 4].decode("utf-8", "replace"))
    text = " ".join(text.split())
    return text[:_EXCERPT] + ("..." if len(text) > _EXCERPT else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _timeout_text(timeout: aiohttp.ClientTimeout) -> str:
    return f"connect {timeout.connect} s, read {timeout.sock_read} s, attempt {timeout.total} s"
