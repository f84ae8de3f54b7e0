"""The API layer under the :class:`~breadasync.BreadClient` facade: one transport, the user
override, the endpoint paths, answer parsing and raw page fetches.

The resources (``client.targets``...), the fan-out and watch engine and the exporter depend
on :class:`Api`, never on ``BreadClient``, so dependencies point one way: facade -> engines
-> this layer -> transport. Nothing here imports the engines or the exporter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio

from ._config import NOT_GIVEN, NotGiven, PollPolicy, TimeoutArg, Timeouts
from ._errors import InvalidArgumentError, ProtocolError
from ._models import JobStatus, Origin, TargetRef, parse_job
from ._transport import ClientStats, Response, Transport, decode_json
from ._validation import check_user_id, target_path

_T = TypeVar("_T")

JobKind = Literal["stim", "rollout"]
"""Which of a target's two jobs: stimulus generation or rollout."""


@dataclass(frozen=True, slots=True)
class Extras:
    """What the SDK's ``extra_headers``, ``extra_query`` and ``extra_body`` add to every
    request of one call (their values win over the call's own, as in the SDK)."""

    headers: Mapping[str, str] | None = None
    query: Mapping[str, Any] | None = None
    body: Mapping[str, Any] | None = None

    @classmethod
    def of(
        cls,
        headers: Mapping[str, str] | None,
        query: Mapping[str, Any] | None,
        body: Mapping[str, Any] | None,
        *,
        prefix: str = "extra",
    ) -> Extras | None:
        """The extras given (``None`` when there are none), checked; ``prefix`` names the
        arguments in errors (``extra_headers``, or the client's ``default_headers``)."""
        for name, value in (("headers", headers), ("query", query), ("body", body)):
            if value is not None and not isinstance(value, Mapping):
                raise InvalidArgumentError(
                    f"{prefix}_{name} must be a mapping, not {type(value).__name__}"
                )
        for name in headers or {}:
            if not isinstance(name, str) or name.lower() in _OWN_HEADERS:
                # The key is the client's one credential: a header carrying another would
                # also escape the scrubbing of that key from errors and logs.
                raise InvalidArgumentError(
                    f"{prefix}_headers may not set {name!r}: the client sends it itself "
                    "(api_key=, user_id=, idempotency_key=)"
                )
        if not (headers or query or body):
            return None
        return cls(headers, query, body)


_OWN_HEADERS = frozenset(
    {"authorization", "host", "content-length", "idempotency-key", "x-user-id"}
)


class Api:
    """Calls of the Bread API with one client's transport, user and poll defaults.

    Args:
        transport: Sends the requests (limits, retries and error mapping included).
        user_id: The default ``X-User-Id`` (already checked), or ``None``.
        poll_policy: The default poll spacing of waits and fan-outs.
        max_concurrency: The configured ceiling of requests in flight (the default
            concurrency of a fan-out).
        extras: Added to every request (see :meth:`with_extras`).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        user_id: str | None,
        poll_policy: PollPolicy,
        max_concurrency: int,
        extras: Extras | None = None,
    ) -> None:
        self._transport = transport
        self.user_id = user_id
        self.poll_policy = poll_policy
        self.max_concurrency = max_concurrency
        self._extras = extras

    def with_extras(self, extras: Extras | None) -> Api:
        """This API, adding ``extras`` to every request (the same transport, limits and
        counters): what one SDK-style call with ``extra_*`` arguments works with."""
        if extras is None:
            return self
        return Api(
            self._transport,
            user_id=self.user_id,
            poll_policy=self.poll_policy,
            max_concurrency=self.max_concurrency,
            extras=extras,
        )

    @property
    def base_url(self) -> str:
        """Where requests go."""
        return self._transport.base_url

    @property
    def max_body_bytes(self) -> int:
        """The largest answer the client reads (``Limits.max_body_bytes``)."""
        return self._transport.limits.max_body_bytes

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the transport's counters."""
        return self._transport.stats()

    @property
    def closed(self) -> bool:
        """Whether the transport was closed."""
        return self._transport.closed

    async def aclose(self) -> None:
        """Close the transport (and its connection pool)."""
        await self._transport.aclose()

    def user(self, user_id: str | NotGiven | None) -> str | None:
        """The user a call acts for: the default when not given, else ``user_id`` checked."""
        if user_id is NOT_GIVEN:
            return self.user_id
        return check_user_id(user_id)

    def scrubbed(self, error: ProtocolError) -> ProtocolError:
        """``error`` without the API key, should a broken answer have echoed it."""
        return self._transport.scrubbed(error)

    async def call(
        self,
        method: str,
        path: str,
        parse: Callable[[Any, Origin], _T],
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        idempotency_key: str | None = None,
        hide_key: bool = False,
    ) -> _T:
        """Send one request and parse its JSON answer with ``parse`` (a GET whose body is
        not JSON is retried, see :meth:`Transport.request_decoded`). ``hide_key``: the
        answer is a job's status, whose texts go into results and exceptions; a copy of
        the key in it is hidden (other answers are data, kept exactly)."""

        async def decode(response: Response) -> _T:
            body = self._transport.hide_key(response.body) if hide_key else response.body
            data = decode_json(body, method=method, path=response.path, status=response.status)
            return parse(data, Origin(method, response.path, response.status))

        headers = None
        if self._extras is not None:
            extras = self._extras
            headers = extras.headers
            if extras.query:
                params = {**(params or {}), **extras.query}
            if extras.body and method != "GET":
                body = {**(body if isinstance(body, Mapping) else {}), **extras.body}
        try:
            return await self._transport.request_decoded(
                method,
                path,
                decode,
                params=params,
                json_body=body,
                headers=headers,
                user_id=self.user(user_id),
                timeouts=None if timeout is NOT_GIVEN else Timeouts.of(timeout),
                idempotency_key=idempotency_key,
            )
        except ProtocolError as exc:
            raise self.scrubbed(exc) from None

    async def get_decoded(
        self,
        path: str,
        params: Mapping[str, Any],
        user_id: str | None,
        decode: Callable[[Response], Awaitable[_T]],
        slots: anyio.CapacityLimiter | None = None,
    ) -> _T:
        """A GET whose body ``decode`` reads (the exporter, off the event loop), retried
        when it is not JSON; ``user_id`` is already resolved (:meth:`user`); ``slots`` is
        held by each attempt in flight, not by the waits between them or the decode (see
        :meth:`Transport.request`)."""
        try:
            return await self._transport.request_decoded(
                "GET", path, decode, params=params, user_id=user_id, slots=slots
            )
        except ProtocolError as exc:
            raise self.scrubbed(exc) from None

    async def get_job(
        self,
        ref: TargetRef,
        kind: JobKind,
        *,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
    ) -> JobStatus:
        """A job's current status (``not_started`` if it never started)."""
        path = target_path(ref.repo_name, ref.target_name, kind)
        return await self.call(
            "GET", path, parse_job, user_id=user_id, timeout=timeout, hide_key=True
        )

    async def start_job(
        self,
        ref: TargetRef,
        kind: JobKind,
        *,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        idempotency_key: str | None = None,
    ) -> JobStatus:
        """Start a job (idempotent on the service: a running or finished job is reported)."""
        path = target_path(ref.repo_name, ref.target_name, kind)
        return await self.call(
            "POST",
            path,
            parse_job,
            user_id=user_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
            hide_key=True,
        )
