"""The one request path: every call of a client goes through :meth:`Transport.request`.

It builds the URL (path segments already percent-encoded by the caller) and the headers
(auth, user override, idempotency key), waits for the :class:`~breadasync._limits.Governor`
(retry budget, pace, concurrency), hands one attempt to the sender (any
:class:`~breadasync._transports.AsyncBaseTransport`; aiohttp by default), maps what comes
back to the exceptions of :mod:`breadasync._errors`, tells the governor what the answer
says about the service, and retries what is worth retrying: after the request's own
backoff, never sooner than the ``Retry-After`` it was given. Each attempt is logged at
DEBUG on the ``breadasync`` logger (method, path, status, attempt, the wait before the next
one), never with the key.

Why it is long: the retry loop, the status-to-exception mapping and the key scrubbing are
one protocol that reads best in one place; the sender, the governor and the clock live in
their own modules.
"""

from __future__ import annotations

import logging
import math
import random
import re
import ssl
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypedDict, TypeVar, Unpack
from urllib.parse import urlencode

import anyio
import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._clock import Clock, SystemClock, seconds_text
from ._config import Limits, RetryPolicy, Timeouts
from ._errors import (
    AnswerTooLargeError,
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    CertificateError,
    ClientClosedError,
    InvalidArgumentError,
    ProtocolError,
    RedirectError,
    server_message,
    status_error_class,
)
from ._json import is_broken_text, loads_exact
from ._limits import Governor, Ticket, Verdict
from ._redact import FRAGMENT, HIDDEN, Redactor
from ._retry import BACKPRESSURE, backoff, is_retryable_status, parse_retry_after
from ._transports import AsyncBaseTransport, BodyTooLargeError, TransportRequest
from ._version import __version__

_T = TypeVar("_T")
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
        requests: Attempts sent (each retry counts); what the service saw.
        retries: Attempts that were retries.
        responses: Answers by HTTP status.
        connection_errors: Attempts that got no usable answer.
        throttled: Answers that asked the client to slow down (429, 503).
        bytes_received: Body bytes read.
        concurrency_limit: Requests allowed in flight now (``max_concurrency``: overload
            lowers the pace, ``rate_limit``, instead).
        concurrency_cuts: Kept for compatibility; always 0 now.
        max_concurrency: The configured ceiling of ``concurrency_limit``.
        in_flight: Requests in flight now.
        rate_limit: The pace the client keeps now, requests per second (``None``: unpaced;
            set after the service pushed back, or by ``max_requests_per_second``).
        rate_cuts: How many times pushback lowered the pace.
        budget_waits: Times a retry waited for the retry budget.
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
    rate_limit: float | None = None
    rate_cuts: int = 0
    budget_waits: int = 0


class RequestOptions(TypedDict, total=False):
    """The options of :meth:`Transport.request_decoded`, for the calls that pass them on."""

    params: Mapping[str, Any] | None
    json_body: Any
    user_id: str | None
    timeouts: Timeouts | None
    idempotency_key: str | None
    slots: anyio.CapacityLimiter | None
    headers: Mapping[str, str] | None


class Transport:
    """Sends the requests of one client: retries, limits and error mapping around a sender.

    Args:
        api_key, base_url, timeouts, retry, limits: The client's configuration.
        trust_env: Proxy settings from the environment (the default aiohttp sender only).
        transport: The sender of single attempts (default: :class:`AiohttpTransport`).
        clock: Where time and sleeping come from (tests pass a virtual one).
        rng: The source of backoff jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: URL,
        timeouts: Timeouts,
        retry: RetryPolicy,
        limits: Limits,
        trust_env: bool = False,
        transport: AsyncBaseTransport | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, Any] | None = None,
    ) -> None:
        self._key = api_key
        self._default_query = dict(default_query or {})
        self._redactor = Redactor(api_key)
        self._base = str(base_url)
        self._origin = base_url.origin()
        self.timeouts = timeouts
        self.retry = retry
        self.limits = limits
        if transport is None:
            # Imported here: aiohttp costs a plain ``import breadasync`` 0.4 s of CPU.
            from ._aiohttp_transport import AiohttpTransport

            transport = AiohttpTransport(
                max_connections=limits.max_concurrency, trust_env=trust_env
            )
        self._sender = transport
        self._clock: Clock = clock or SystemClock()
        self._closed = False
        self._governor = Governor(
            max_concurrency=limits.max_concurrency,
            max_rate=limits.max_requests_per_second,
            clock=self._clock,
        )
        own = {"User-Agent": f"breadasync/{__version__}", "Accept": "application/json"}
        self._headers = _overlay(own, default_headers or {})
        self._headers["Authorization"] = f"Bearer {api_key}"
        self._stats = ClientStats(max_concurrency=limits.max_concurrency)
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"Transport(base_url={self._base!r}, sender={type(self._sender).__name__})"

    @property
    def base_url(self) -> str:
        """The base URL requests go to."""
        return self._base

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    @property
    def governor(self) -> Governor:
        """The client-wide limits (pace, concurrency, retry budget)."""
        return self._governor

    def stats(self) -> ClientStats:
        """A snapshot of the counters."""
        s = self._stats
        g = self._governor
        return ClientStats(
            requests=s.requests,
            retries=s.retries,
            responses=Counter(s.responses),
            connection_errors=s.connection_errors,
            throttled=s.throttled,
            bytes_received=s.bytes_received,
            concurrency_limit=g.concurrency.limit,
            concurrency_cuts=g.concurrency.cuts,
            max_concurrency=g.concurrency.maximum,
            in_flight=g.concurrency.in_flight,
            rate_limit=g.rate,
            rate_cuts=g.cubic.cuts,
            budget_waits=g.budget.waits,
        )

    def scrub(self, text: str) -> str:
        """``text`` with the API key hidden (a copy, or any fragment long enough to matter),
        should the service have echoed it."""
        return self._redactor.text(text)

    def scrubbed(self, error: ProtocolError) -> ProtocolError:
        """``error`` with the API key replaced in its texts: a broken answer may echo it."""
        error.message = self.scrub(error.message)
        error.args = (error.message,)
        error.excerpt = self.scrub(error.excerpt)
        # The parser's error it was raised from keeps the whole body (orjson's ``doc``).
        error.__context__ = error.__cause__ = None
        return error

    def hide_key(self, body: bytes) -> bytes:
        """``body`` with every whole copy of the API key replaced (not fragments, and not
        a key shorter than :data:`~breadasync._redact.FRAGMENT`: in an answer's bytes that
        could be chance, and the replacement would change the answer)."""
        key = self._key.encode()
        if len(key) < FRAGMENT or key not in body:
            return body
        return body.replace(key, HIDDEN.encode())

    def _scrub_bytes(self, body: bytes) -> bytes:
        return self._redactor.bytes(body)

    async def aclose(self) -> None:
        """Close the sender; requests in flight fail with :class:`ClientClosedError`."""
        self._closed = True
        await self._sender.aclose()

    def url_for(self, path: str, params: Mapping[str, Any] | None = None) -> tuple[URL, str]:
        """The URL for ``path`` (already encoded) and the path-with-query shown in errors."""
        if not path.startswith("/") or path.startswith("//") or "://" in path.split("?")[0]:
            raise InvalidArgumentError(
                f"{path!r} is not a path on the configured origin: pass a path such as "
                "'/v1/repo/my_repo/targets' (absolute URLs are refused so the API key only "
                f"goes to {self._origin})"
            )
        shown = path
        if self._default_query:
            params = {**self._default_query, **(params or {})}
        if params:
            # A path given with a query of its own (``request("GET", "/x?page=2")``) keeps it.
            shown = f"{path}{'&' if '?' in path else '?'}{urlencode(params)}"
        return URL(self._base + shown, encoded=True), shown

    # --- one request, with retries ------------------------------------------------------

    async def request(self, method: str, path: str, **options: Unpack[RequestOptions]) -> Response:
        """Send a request, retrying per the policy, and return the 2xx answer (see
        :meth:`request_decoded`)."""
        return await self.request_decoded(method, path, _as_is, **options)

    async def request_decoded(
        self,
        method: str,
        path: str,
        decode: Callable[[Response], Awaitable[_T]],
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        user_id: str | None = None,
        timeouts: Timeouts | None = None,
        idempotency_key: str | None = None,
        slots: anyio.CapacityLimiter | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _T:
        """Send a request, retrying per the policy, and return ``decode`` of the 2xx answer.
        ``headers`` are sent besides the client's own (which they may not replace).

        A GET whose body ``decode`` finds is not JSON (a :class:`ProtocolError` marked
        ``retryable``: cut short, or a proxy's page in its place) is retried like a 5xx, so
        one broken body among good ones costs a retry, not the call.

        ``slots``, if given, is held by each attempt while it waits for the governor and
        is in flight, not during the waits between attempts (backoff, ``Retry-After``): a
        caller's own cap on requests in flight (the exporter's ``concurrency``) is then not
        taken up by requests that are only waiting, so one slow retry does not idle the
        others.

        Raises:
            APIStatusError: The service answered an error status (after retries if any).
            APIConnectionError: No usable answer (after retries); :class:`CertificateError`
                at once.
            ProtocolError: A redirect, or a body over the size limit.
        """
        url, shown = self.url_for(path, params)
        timeouts = timeouts or self.timeouts
        # The caller's extras win (as the SDK's do); they may not name the credentials
        # (see ``Extras``).
        headers = _overlay(self._headers, headers or {})
        if user_id:
            headers["X-User-Id"] = user_id
        data: bytes | None = None
        if method != "GET":
            # One key per call, reused by its retries, so a repeat is recognised as such.
            headers["Idempotency-Key"] = idempotency_key or f"breadasync-{uuid.uuid4()}"
            data = b"" if json_body is None else orjson.dumps(json_body)
            if json_body is not None and not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
        clock = self._clock
        deadline = math.inf if timeouts.total is None else clock.now() + timeouts.total
        attempt = 0
        error: APIError | None = None
        while True:
            if self._closed:
                raise ClientClosedError(
                    f"{method} {shown}: the client is closed; create a new BreadClient",
                    method=method,
                    path=shown,
                )
            if slots is not None:
                await slots.acquire()
            try:
                ticket = await self._admit(method, shown, attempt, deadline, error)
                remaining = deadline - clock.now()
                bound = remaining if timeouts.request is None else min(timeouts.request, remaining)
                attempt_request = TransportRequest(
                    method=method,
                    url=str(url),
                    path=shown,
                    headers=headers,
                    content=data,
                    connect_timeout=timeouts.connect,
                    read_timeout=timeouts.read,
                    # No attempt may outlive the call's total timeout.
                    timeout=None if bound == math.inf else max(bound, 0.001),
                    max_body_bytes=self.limits.max_body_bytes,
                )
                self._stats.requests += 1
                try:
                    outcome = await self._attempt(attempt_request)
                except BaseException:
                    self._governor.finish(ticket, None)
                    raise
                self._governor.finish(ticket, self._verdict(outcome))
            finally:
                if slots is not None:
                    slots.release()
            if isinstance(outcome, Response):
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s %s -> %d (attempt %d, %d bytes)",
                        method,
                        shown,
                        outcome.status,
                        attempt + 1,
                        len(outcome.body),
                    )
                try:
                    return await decode(outcome)
                except ProtocolError as exc:
                    if not (exc.retryable and method == "GET"):
                        raise
                    outcome = exc
            error = outcome
            wait = self._next_wait(error, attempt, deadline, timeouts, read=method == "GET")
            if log.isEnabledFor(logging.DEBUG):
                then = "giving up" if wait is None else f"retrying in {wait:.2f} s"
                log.debug(
                    "%s %s -> %s (attempt %d); %s",
                    method,
                    shown,
                    _what(error),
                    attempt + 1,
                    then,
                )
            if wait is None:
                raise error
            await clock.sleep(wait)
            attempt += 1
            self._stats.retries += 1

    async def _admit(
        self, method: str, shown: str, attempt: int, deadline: float, error: APIError | None
    ) -> Ticket:
        """Wait for the governor, but not past the call's deadline."""
        remaining = deadline - self._clock.now()
        if remaining == math.inf:
            return await self._governor.admit(retry=attempt > 0)
        with anyio.move_on_after(max(remaining, 0.0)):
            return await self._governor.admit(retry=attempt > 0)
        why = (
            "waiting for its turn (the client's concurrency limit, or its pace after the "
            "service pushed back) would pass the total timeout"
        )
        if error is not None:
            raise _gave_up(error, attempt, why)
        raise APITimeoutError(f"{method} {shown}: not sent: {why}", method=method, path=shown)

    def _next_wait(
        self,
        error: APIError,
        attempt: int,
        deadline: float,
        timeouts: Timeouts,
        *,
        read: bool = False,
    ) -> float | None:
        """Seconds before the next attempt, or ``None`` to give up (``error`` is then final,
        its ``attempts`` and message updated)."""
        policy = self.retry
        retry_after: float | None = None
        if isinstance(error, APIStatusError):
            retry_after = error.retry_after
            retryable = is_retryable_status(error.status, error.headers)
        elif isinstance(error, CertificateError | ClientClosedError):
            retryable = False
        elif isinstance(error, ProtocolError):
            retryable = error.retryable and read and not self._closed
        else:
            retryable = isinstance(error, APIConnectionError) and not self._closed
        if not retryable:
            # A permanent answer: earlier transient failures do not make it "given up".
            error.attempts = attempt + 1
            return None
        if attempt >= policy.max_retries:
            _gave_up(error, attempt + 1)
            return None
        if retry_after is not None and retry_after > policy.max_retry_after:
            _gave_up(
                error,
                attempt + 1,
                f"the service asked to wait {retry_after:.0f}"
                f" s, more than max_retry_after={policy.max_retry_after:.0f} s",
            )
            return None
        # The wait is this request's own: Retry-After is a floor for it, not for the client.
        # Failures the client as a whole calls bad luck (a flaky instance among healthy
        # ones) are retried at the first step's wait however many in a row.
        escalate = not self._governor.bad_luck(attempt + 1)
        wait = backoff(policy, attempt, retry_after, self._rng, read=read, escalate=escalate)
        if self._clock.now() + wait > deadline:
            _gave_up(
                error,
                attempt + 1,
                f"the next retry would pass the total timeout of {timeouts.total} s",
            )
            return None
        return wait

    @staticmethod
    def _verdict(outcome: Response | APIError) -> Verdict | None:
        """What an attempt's outcome says about the service (``None``: nothing)."""
        if isinstance(outcome, APIStatusError):
            if outcome.status == 429:
                return Verdict.THROTTLED
            if outcome.status >= 500 or outcome.status == 408:
                return Verdict.FAILED
            return Verdict.ACCEPTED
        if isinstance(outcome, CertificateError | ClientClosedError):
            return None
        if isinstance(outcome, APIConnectionError):
            return Verdict.FAILED
        return Verdict.ACCEPTED

    async def _attempt(self, request: TransportRequest) -> Response | APIError:
        """One attempt: the 2xx answer, or the error it ended in (returned, not raised, so
        the caller decides)."""
        method, shown = request.method, request.path
        try:
            answer = await self._sender.handle_async_request(request)
        except BodyTooLargeError as exc:
            self._stats.responses[exc.status] += 1
            return self._too_large(method, shown, exc.status, exc.size)
        except APIConnectionError as exc:
            self._stats.connection_errors += 1
            return self._connection_error(exc)
        except ssl.SSLCertVerificationError as exc:
            from ._aiohttp_transport import certificate_error

            self._stats.connection_errors += 1
            return certificate_error(method, shown, request.url, exc)
        except TimeoutError:
            self._stats.connection_errors += 1
            return self._connection_error(
                APITimeoutError(
                    f"{method} {shown}: no complete answer within the timeout "
                    f"(attempt {seconds_text(request.timeout)})",
                    method=method,
                    path=shown,
                )
            )
        except OSError as exc:
            self._stats.connection_errors += 1
            return self._connection_error(
                APIConnectionError(
                    f"{method} {shown}: {_first_line(exc)}", method=method, path=shown
                )
            )
        status = answer.status
        self._stats.responses[status] += 1
        self._stats.bytes_received += len(answer.content)
        headers = answer.headers
        if not isinstance(headers, CIMultiDictProxy):
            headers = CIMultiDictProxy(CIMultiDict(headers))
        if 300 <= status < 400:
            location = self.scrub(headers.get("Location", "(no Location header)"))
            return RedirectError(
                f"{method} {shown} -> {status}: the service redirected to {location}; "
                "redirects are not followed so the API key never leaves "
                f"{self._origin}. Check the base URL.",
                method=method,
                path=shown,
                status=status,
                location=location,
            )
        if status >= 400:
            if status in BACKPRESSURE:
                self._stats.throttled += 1
            return self._status_error(method, shown, status, headers, answer.content)
        if len(answer.content) > request.max_body_bytes:
            return self._too_large(method, shown, status, f"{len(answer.content):,} bytes")
        return Response(status, headers, answer.content, method, shown)

    def _connection_error(self, error: APIConnectionError) -> APIConnectionError:
        if self._closed and not isinstance(error, ClientClosedError):
            return ClientClosedError(
                f"{error.method} {error.path}: the client was closed while the request was "
                "in flight",
                method=error.method,
                path=error.path,
            )
        error.message = self.scrub(error.message)
        error.args = (error.message,)
        return error

    def _too_large(self, method: str, shown: str, status: int, size: str) -> ProtocolError:
        return AnswerTooLargeError(
            f"{method} {shown} -> {status}: the answer is {size}, over the limit of "
            f"{self.limits.max_body_bytes:,} bytes (Limits.max_body_bytes); for output "
            "pages of large rows, ask for fewer rows a page (limit=, or page_size= to "
            "export), or raise the limit",
            method=method,
            path=shown,
            status=status,
        )

    def _status_error(
        self, method: str, shown: str, status: int, headers: CIMultiDictProxy[str], body: bytes
    ) -> APIStatusError:
        # Hidden before the cut: a copy of the key cut in two would survive it.
        body = self._scrub_bytes(body[: 32 * 1024])[: 16 * 1024]
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
        retry_after = parse_retry_after(headers, now=self._clock.wall())
        # The headers are kept on the error (and pickled with it): an echoed key is hidden.
        headers = CIMultiDictProxy(CIMultiDict((k, self.scrub(v)) for k, v in headers.items()))
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
    """Decode an answer's JSON exactly (integers of any size), or raise a
    :class:`ProtocolError` that shows its start."""
    try:
        return loads_exact(body)
    except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError is a ValueError
        deep = "depth" in str(exc) or "recursion" in str(exc)
        problem = "JSON nested too deeply" if deep else f"not JSON ({exc})"
        excerpt = _text_excerpt(body) if not deep else body[:40].decode("utf-8", "replace")
        # Only a GET is retried, and only for a text that is not JSON at all.
        broken = isinstance(exc, ValueError) and is_broken_text(exc, body)
        raise ProtocolError(
            f"{method} {path} -> {status}: the answer is {problem}; it begins: {excerpt!r}",
            method=method,
            path=path,
            status=status,
            excerpt=excerpt,
            retryable=broken and method == "GET",
        ) from None


def _overlay(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ``extra`` over it, header names compared whatever their case."""
    named = {name.lower() for name in extra}
    return {**{k: v for k, v in base.items() if k.lower() not in named}, **extra}


async def _as_is(response: Response) -> Response:
    return response


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


def _what(error: APIError) -> str:
    """An attempt's outcome for the log: the status, or what went wrong."""
    if isinstance(error, APIStatusError | ProtocolError):
        return str(error.status)
    return f"{type(error).__name__}: {error.message.split(': ', 1)[-1]}"
