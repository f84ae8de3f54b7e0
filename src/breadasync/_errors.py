"""Every exception breadasync raises, in one tree::

    BreadError                      anything raised on purpose by breadasync
    ├── ConfigError                 the client cannot be built as asked (also a ValueError)
    ├── InvalidArgumentError        a call's arguments are invalid; nothing was sent (ValueError)
    ├── APIError                    a request went wrong; carries method and path
    │   ├── APIStatusError          the service answered an error status
    │   │   ├── BadRequestError             400
    │   │   ├── AuthenticationError         401
    │   │   ├── PaymentRequiredError        402
    │   │   ├── PermissionDeniedError       403
    │   │   ├── NotFoundError               404
    │   │   ├── ConflictError               409
    │   │   ├── UnprocessableEntityError    422
    │   │   ├── RateLimitError              429
    │   │   └── InternalServerError         5xx
    │   ├── APIConnectionError      no answer: refused, reset, dropped mid-body
    │   │   ├── APITimeoutError     no answer in time
    │   │   ├── CertificateError    the service's TLS certificate cannot be verified (not retried)
    │   │   └── ClientClosedError   the client was closed while the request was in flight
    │   └── ProtocolError           an answer that is not a valid API response
    │       └── RedirectError       a redirect (never followed: the key must not travel)
    ├── JobError                    a job did not end as the caller needed
    │   ├── JobFailedError          it ended ``failed``
    │   └── PollTimeoutError        it was still running when the wait ran out
    └── ExportError                 an export cannot go on; what is on disk stays consistent
        ├── UnfinishedJobError      the job is not complete (and no partial export was allowed)
        ├── DestinationError        the folder cannot be used: a file, no permission, disk full
        ├── ExportLockedError       another exporter is writing to the same folder
        ├── ExportMismatchError     the folder holds an export of another target or size
        └── DataIntegrityError      the service's pages do not add up: a gap, an overlong page,
                                    ``lines`` changing on a complete job

Transport failures (no answer) and server answers (a status) are separate branches, so a
caller can retry the first and report the second. No exception ever carries the API key:
texts and bodies are scrubbed of it before they are stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from ._models import JobStatus


class BreadError(Exception):
    """Base of every exception breadasync raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # The subclasses take keyword-only arguments, which Exception's own pickling cannot
        # pass: rebuild from the message and the attributes instead, so an error crosses a
        # process boundary (a Ray task, multiprocessing) as itself.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[BreadError], args: tuple[Any, ...], state: dict[str, Any]) -> BreadError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ConfigError(BreadError, ValueError):
    """The client cannot be configured as asked: no API key, a bad base URL, a bad limit.

    Raised by :class:`BreadClient` before any request is sent.
    """


class InvalidArgumentError(BreadError, ValueError):
    """A call's arguments are invalid (an empty name, ``limit=0``...); nothing was sent."""


class APIError(BreadError):
    """A request to the service went wrong.

    Attributes:
        method: The HTTP method, e.g. ``"GET"``.
        path: The request path with its query, e.g. ``"/v1/repo/r/targets/t/rollout"``.
        attempts: How many attempts were made before giving up.
    """

    def __init__(self, message: str, *, method: str, path: str) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.path = path
        self.attempts = 1


class APIStatusError(APIError):
    """The service answered with an error status (4xx or 5xx).

    Attributes:
        status: The HTTP status code.
        server_message: The service's own message (from ``error``, ``message`` or ``detail``).
        code: The service's error code when it sends one (``"RESOURCE_NOT_FOUND"``...).
        body: The raw body (at most a few KB, scrubbed of the API key).
        headers: The response headers.
        retry_after: Seconds the service asked to wait, if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str,
        path: str,
        status: int,
        server_message: str | None,
        code: str | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, method=method, path=path)
        self.status = status
        self.server_message = server_message
        self.code = code
        self.body = body
        self.headers: Mapping[str, str] = dict(headers or {})
        self.retry_after = retry_after

    @property
    def status_code(self) -> int:
        """The HTTP status code, by the SDK's name (:attr:`status`)."""
        return self.status


class BadRequestError(APIStatusError):
    """400: the service refused the request, e.g. a rollout whose stim job is not complete
    or whose target has no ``model_name``. Never retried."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing, unknown or revoked. Never retried."""


class PaymentRequiredError(APIStatusError):
    """402: the account has no credit left. Never retried."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this (e.g. act for another user without a master key)."""


class NotFoundError(APIStatusError):
    """404: no such repo or target. Never retried."""


class ConflictError(APIStatusError):
    """409: the request conflicts with what exists (targets are immutable). Never retried."""


class UnprocessableEntityError(APIStatusError):
    """422: the service's validation refused a field (``limit`` above 1000, a bad type)."""


class RateLimitError(APIStatusError):
    """429: too many requests. Retried after ``Retry-After``; raised when retries run out
    or the service asks for a longer wait than the client allows."""


class InternalServerError(APIStatusError):
    """5xx: the service or a proxy in front of it failed. Retried with backoff."""


class APIConnectionError(APIError):
    """No usable answer: the connection was refused, reset, or dropped mid-body.

    Retried with backoff; raised when retries run out.
    """


class APITimeoutError(APIConnectionError):
    """No complete answer within the request timeout (connect, read or the whole attempt)."""


class CertificateError(APIConnectionError):
    """The service's TLS certificate cannot be verified (self-signed, expired, another
    host's). Permanent, so never retried: the base URL or the machine's trusted CA
    certificates must change."""


class ClientClosedError(APIConnectionError):
    """The client was closed (``aclose``) while this request was in flight or before it
    started."""


class ProtocolError(APIError):
    """The answer is not a valid API response: not JSON, nested absurdly deep, larger than
    the size limit, or with fields of the wrong type. A GET whose body is not JSON at all
    (cut short, or a proxy's page in its place) is retried like a 5xx; the rest is not.

    Attributes:
        status: The HTTP status of the answer.
        excerpt: The first bytes of the body, for a person to read.
        retryable: Whether another try may mend it (the body is not JSON).
    """

    def __init__(
        self,
        message: str,
        *,
        method: str,
        path: str,
        status: int,
        excerpt: str = "",
        retryable: bool = False,
    ) -> None:
        super().__init__(message, method=method, path=path)
        self.status = status
        self.excerpt = excerpt
        self.retryable = retryable


class AnswerTooLargeError(ProtocolError):
    """The answer is larger than ``Limits.max_body_bytes`` (64 MiB by default); it was not
    read to its end. An export or stream meeting one on an output page asks for fewer rows
    a page instead (halving down to one row)."""


class RedirectError(ProtocolError):
    """The service answered with a redirect. It is never followed, so the API key only
    ever goes to the configured origin.

    Attributes:
        location: Where the redirect pointed.
    """

    def __init__(self, message: str, *, method: str, path: str, status: int, location: str) -> None:
        super().__init__(message, method=method, path=path, status=status)
        self.location = location


class JobError(BreadError):
    """A job did not end as the caller needed.

    Attributes:
        repo_name, target_name: Which target.
        kind: ``"stim"`` or ``"rollout"``.
        job: The job's last known status.
    """

    def __init__(
        self, message: str, *, repo_name: str, target_name: str, kind: str, job: JobStatus
    ) -> None:
        super().__init__(message)
        self.repo_name = repo_name
        self.target_name = target_name
        self.kind = kind
        self.job = job


class JobFailedError(JobError):
    """The job ended ``failed`` (or stopped another way, such as ``cancelled``);
    ``job.error`` holds the service's reason."""

    @classmethod
    def of(cls, kind: str, repo_name: str, target_name: str, job: JobStatus) -> JobFailedError:
        """The error for ``job``, which ended ``failed`` (or ``cancelled``...)."""
        return cls(
            f"{kind} of {repo_name}/{target_name} {job.status.ended} after {job.lines} lines: "
            f"{job.error or 'the service gave no reason'}",
            repo_name=repo_name,
            target_name=target_name,
            kind=kind,
            job=job,
        )


class PollTimeoutError(JobError, TimeoutError):
    """The job was still running when the caller's wait ran out; ``job`` is its last status.
    The job itself keeps running on the service."""


def status_error_class(status: int) -> type[APIStatusError]:
    """The exception class for an HTTP error status."""
    if status >= 500:
        return InternalServerError
    return _BY_STATUS.get(status, APIStatusError)


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: PaymentRequiredError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def server_message(data: Any) -> tuple[str | None, str | None]:
    """The service's message and code from an error body in any dialect:
    ``{"error": ...}`` (docs), ``{"message", "code"}`` (spec) or ``{"detail": [...]}`` (422).
    """
    if not isinstance(data, Mapping):
        return None, None
    code = data.get("code") if isinstance(data.get("code"), str) else None
    for key in ("error", "message"):
        value = data.get(key)
        if isinstance(value, str):
            return value, code
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail, code
    if isinstance(detail, list):
        parts = []
        for item in detail[:5]:
            if isinstance(item, Mapping):
                loc = item.get("loc")
                where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
                parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        if parts:
            return "; ".join(parts), code
    return None, code


class ExportError(BreadError):
    """An export cannot go on. Parts already written stay whole (or invisible), so the
    export can be resumed or the folder removed.

    Attributes:
        dest: The folder of the export, when there is one.
    """

    def __init__(self, message: str, *, dest: str | None = None) -> None:
        super().__init__(message)
        self.dest = dest


class UnfinishedJobError(ExportError):
    """The rollout is not complete (running, pending, failed or not started) and the
    caller did not allow a partial export."""


class DestinationError(ExportError):
    """The destination cannot be written: it is a file, it is not writable, or the disk
    is full. The OS error is the ``__cause__``."""


class ExportLockedError(ExportError):
    """Another exporter holds the destination's lock; two exporters never write one folder."""


class ExportMismatchError(ExportError):
    """The destination already holds an export of another target, another number of lines,
    or another layout; it is left untouched."""


class DataIntegrityError(ExportError):
    """The service's pages do not add up to an exact export: a page longer than asked, no
    rows where ``lines`` says there are some, ``lines`` changing on a complete job, or a
    final count that differs from ``lines``."""


def cancel_requests() -> int:
    """The current task's pending cancellation requests (asyncio's ``cancelling()``; 0
    outside a task). A call compares it with the count at its start: a count left over
    from a cancellation the caller caught without ``uncancel()`` (Python 3.11's TaskGroup
    leaves one too) is not a request to stop this call."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def reraise(group: BaseExceptionGroup[BaseException], cancels_before: int) -> NoReturn:
    """Raise what a failed task group means to the caller: a cancellation of the caller
    (a request since the call began, when it counted ``cancels_before``) stays exactly a
    cancellation (``asyncio.timeout`` and ``wait_for`` turn it into ``TimeoutError``),
    never a group of the streams it broke on its way out; otherwise the first
    :class:`BreadError`."""
    import anyio  # here: a plain ``import breadasync`` loads this module, and not anyio

    consequences = (asyncio.CancelledError, anyio.BrokenResourceError, anyio.ClosedResourceError)
    leaves = _leaves(group)
    cancelled = next((e for e in leaves if isinstance(e, asyncio.CancelledError)), None)
    if cancel_requests() > cancels_before or (
        cancelled is not None and all(isinstance(e, consequences) for e in leaves)
    ):
        raise cancelled or asyncio.CancelledError()
    raise first_error(group) from None


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What to raise for a task group that failed: its first :class:`BreadError` (the others
    are usually the same failure seen by sibling tasks), else the group itself."""
    for leaf in _leaves(group):
        if isinstance(leaf, BreadError):
            return leaf
    return group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found
