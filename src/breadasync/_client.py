"""BreadClient and its resources: ``client.targets``, ``.targets.stim``, ``.targets.rollout``.

The method names and the keyword-only ``repo_name`` are the official SDK's, so code moves
over by adding ``await``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio

from ._config import (
    DEFAULT_MAX_BODY_BYTES,
    NOT_GIVEN,
    Limits,
    NotGiven,
    PollPolicy,
    RetryPolicy,
    Timeouts,
    resolve_api_key,
    resolve_base_url,
)
from ._errors import (
    ConfigError,
    InvalidArgumentError,
    JobError,
    JobFailedError,
    PollTimeoutError,
    ProtocolError,
)
from ._fanout import (
    AsCompleted,
    Fanout,
    ProgressCallback,
    RolloutResults,
    TargetLike,
    collect,
    normalise_targets,
)
from ._models import (
    JobState,
    JobStatus,
    Origin,
    OutputPage,
    Target,
    TargetList,
    parse_job,
    parse_page,
    parse_target,
    parse_target_list,
)
from ._polling import PollSchedule
from ._transport import ClientStats, Response, Transport, decode_json
from ._validation import (
    check_limit,
    check_name,
    check_offset,
    check_seconds,
    check_user_id,
    repo_path,
    target_path,
)
from .export._dest import DestinationLike
from .export._exporter import (
    BatchStream,
    Compression,
    Exporter,
    ExportOptions,
    ExportProgress,
    ExportResult,
    ExportResults,
    check_target,
    export_many,
)

ExportProgressCallback = Callable[[ExportProgress], Any]

_T = TypeVar("_T")
JobKind = Literal["stim", "rollout"]


class BreadClient:
    """An asyncio client for the Bread API: one aiohttp session, shared limits, retries.

    Use it as ``async with BreadClient() as client:``, or create it once (a web backend's
    lifespan) and ``await client.aclose()`` at the end. Every call and task using one client
    shares its connection pool, its concurrency cap and its rate limit. Bind a client to one
    event loop.

    Args:
        api_key: Defaults to ``BREAD_API_KEY``; a :class:`ConfigError` names it if neither.
        base_url: Defaults to ``BREAD_BASE_URL``, then ``https://bapi.bread.com.ai``. Plain
            http is refused for hosts that are not loopback unless ``allow_insecure_http``.
        timeout: Seconds for one attempt, or a :class:`Timeouts` (connect 5 s, read 60 s,
            attempt 120 s, 600 s across retries by default).
        max_retries: Retries of a failed request (default 5); see :class:`RetryPolicy`.
        max_concurrency: Requests in flight at once (default 64); it shrinks by itself while
            the service answers 429/503 and recovers after.
        max_requests_per_second: A pace for all requests (default: none).
        user_id: Act for this user (a master key's ``X-User-Id``) on every request.
        retry: The full retry policy (``max_retries`` overrides its count when given).
        poll: How ``run(poll=True)`` and ``wait`` space their status reads.
        max_body_bytes: The largest answer accepted (default 64 MiB).
        allow_insecure_http: Allow plain http to a host that is not loopback.
        trust_env: Use proxy settings from the environment (``HTTPS_PROXY``...).
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float | Timeouts = Timeouts(),  # noqa: B008 (frozen, so shared safely)
        max_retries: int | NotGiven = NOT_GIVEN,
        max_concurrency: int = 64,
        max_requests_per_second: float | None = None,
        user_id: str | None = None,
        retry: RetryPolicy | None = None,
        poll: PollPolicy = PollPolicy(),  # noqa: B008 (frozen)
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        allow_insecure_http: bool = False,
        trust_env: bool = False,
    ) -> None:
        key = resolve_api_key(api_key)
        url = resolve_base_url(base_url, allow_insecure_http=allow_insecure_http)
        policy = retry or RetryPolicy()
        if max_retries is not NOT_GIVEN:
            policy = replace(policy, max_retries=max_retries)
        if not isinstance(poll, PollPolicy):
            raise ConfigError(f"poll must be a PollPolicy, got {type(poll).__name__}")
        try:
            self.user_id = check_user_id(user_id)
        except InvalidArgumentError as exc:
            raise ConfigError(str(exc)) from None
        self.poll_policy = poll
        self._transport = Transport(
            api_key=key,
            base_url=url,
            timeouts=Timeouts.of(timeout),
            retry=policy,
            limits=Limits(max_concurrency, max_requests_per_second, max_body_bytes),
            trust_env=trust_env,
        )
        self.targets = Targets(self)
        """Targets, and through them their stim and rollout jobs."""

    def __repr__(self) -> str:
        limits = self._transport.limits
        return (
            f"BreadClient(base_url={self.base_url!r}, "
            f"max_concurrency={limits.max_concurrency}, "
            f"max_retries={self._transport.retry.max_retries})"
        )

    @property
    def base_url(self) -> str:
        """Where requests go."""
        return self._transport.base_url

    @property
    def max_concurrency(self) -> int:
        """The configured ceiling of requests in flight."""
        return self._transport.limits.max_concurrency

    @property
    def stats(self) -> ClientStats:
        """Counters of this client: requests, retries, answers by status, throttling, and
        the current (adaptive) concurrency limit."""
        return self._transport.stats()

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._transport.closed

    async def aclose(self) -> None:
        """Close the connection pool. Calls still in flight fail with
        :class:`ClientClosedError`; closing twice is harmless."""
        await self._transport.aclose()

    async def __aenter__(self) -> BreadClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def rollout_many(
        self,
        targets: Iterable[TargetLike],
        *,
        repo_name: str | None = None,
        wait: bool = True,
        wait_for_stim: bool = False,
        concurrency: int | None = None,
        poll_policy: PollPolicy | NotGiven = NOT_GIVEN,
        target_timeout: float | None = None,
        total_timeout: float | None = None,
        fail_fast: bool = False,
        user_id: str | NotGiven | None = NOT_GIVEN,
        on_progress: ProgressCallback | None = None,
    ) -> RolloutResults:
        """Start the rollouts of many targets and watch them to the end.

        Starting is idempotent: running this again over the same targets starts nothing
        twice and reports their current state. Polls adapt per target (see
        :class:`PollPolicy`) and go through one scheduler.

        Args:
            targets: Names (with ``repo_name``), ``(repo, target)`` pairs or
                :class:`TargetRef`; repos may be mixed, duplicates share one result.
            wait: Watch each job to ``complete``/``failed`` (else report it ``STARTED``).
            wait_for_stim: A target whose stim job is still running is watched until it
                completes, then its rollout is started; otherwise that is an error.
            concurrency: Starts and polls in flight at once (default: the client's
                ``max_concurrency``); the client's own limits apply on top.
            poll_policy: Poll spacing (default: the client's).
            target_timeout: Seconds a target may take from its first request.
            total_timeout: Seconds the whole call may take.
            fail_fast: Raise the first failure (and stop the rest) instead of recording it.
            user_id: Act for this user on every request, polls included.
            on_progress: Called with a :class:`RolloutUpdate` after every status read.

        Returns:
            One :class:`RolloutResult` per input target, in input order; ``.summary()``
            counts them.

        Raises:
            InvalidArgumentError: A target is malformed (nothing is sent).
        """
        refs = normalise_targets(targets, repo_name)
        fanout = Fanout(
            self,
            refs,
            start=True,
            wait=wait,
            wait_for_stim=wait_for_stim,
            concurrency=concurrency,
            poll_policy=poll_policy,
            target_timeout=target_timeout,
            total_timeout=total_timeout,
            fail_fast=fail_fast,
            user_id=user_id,
            on_progress=on_progress,
        )
        return await collect(fanout, refs)

    async def wait_many(
        self,
        targets: Iterable[TargetLike],
        *,
        repo_name: str | None = None,
        concurrency: int | None = None,
        poll_policy: PollPolicy | NotGiven = NOT_GIVEN,
        target_timeout: float | None = None,
        total_timeout: float | None = None,
        fail_fast: bool = False,
        user_id: str | NotGiven | None = NOT_GIVEN,
        on_progress: ProgressCallback | None = None,
    ) -> RolloutResults:
        """Watch rollouts that were already started (a job never started is an error).

        Same arguments and results as :meth:`rollout_many`, without starting anything.
        """
        refs = normalise_targets(targets, repo_name)
        fanout = Fanout(
            self,
            refs,
            start=False,
            wait=True,
            wait_for_stim=False,
            concurrency=concurrency,
            poll_policy=poll_policy,
            target_timeout=target_timeout,
            total_timeout=total_timeout,
            fail_fast=fail_fast,
            user_id=user_id,
            on_progress=on_progress,
        )
        return await collect(fanout, refs)

    def as_completed(
        self,
        targets: Iterable[TargetLike],
        *,
        repo_name: str | None = None,
        start: bool = True,
        wait_for_stim: bool = False,
        concurrency: int | None = None,
        poll_policy: PollPolicy | NotGiven = NOT_GIVEN,
        target_timeout: float | None = None,
        total_timeout: float | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        on_progress: ProgressCallback | None = None,
    ) -> AsCompleted:
        """Each target's :class:`RolloutResult` the moment it has one::

            async with client.as_completed(targets, repo_name="r") as results:
                async for result in results:
                    print(result.target, result.outcome)

        Starts the rollouts first (``start=True``) or only watches them. Leaving the block
        early cancels whatever is still running. Arguments as in :meth:`rollout_many`.
        """
        refs = normalise_targets(targets, repo_name)
        fanout = Fanout(
            self,
            refs,
            start=start,
            wait=True,
            wait_for_stim=wait_for_stim,
            concurrency=concurrency,
            poll_policy=poll_policy,
            target_timeout=target_timeout,
            total_timeout=total_timeout,
            fail_fast=False,
            user_id=user_id,
            on_progress=on_progress,
        )
        return AsCompleted(fanout, len(dict.fromkeys(refs)))

    async def export_rollout(
        self,
        target_name: str,
        *,
        repo_name: str,
        dest: DestinationLike,
        page_size: int = 1000,
        concurrency: int = 16,
        rows_per_part: int = 100_000,
        compression: Compression = "zstd",
        resume: bool = True,
        allow_partial: bool = False,
        window: int | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        on_progress: ExportProgressCallback | None = None,
    ) -> ExportResult:
        """Export a rollout's output to Parquet files in the folder or prefix ``dest``.

        Pages are fetched in parallel (``concurrency``), at most ``window`` ahead of the
        writer, converted to Arrow off the event loop and written as parts of
        ``rows_per_part`` rows (``part-00000.parquet``...), each to a temporary name,
        fsynced and renamed when whole. ``_manifest.json``, written last, commits the
        export. The export holds exactly the job's ``lines`` rows: column ``offset``, the
        documented fields, and ``extra`` (every other field, as JSON).

        Args:
            page_size: Rows per page request, 1..1000.
            resume: Keep the verified parts of an earlier run into ``dest`` (default); if
                false, replace an earlier export of this target there.
            allow_partial: Export what a running or failed job has so far.
            on_progress: Called with an :class:`~breadasync.export.ExportProgress` as pages
                are written.
            dest: A folder path; a URI (``s3://bucket/prefix``, ``gs://``, ``abfs://``,
                ``file://``; pyarrow's URI options such as ``?endpoint_override=``); a
                ``(pyarrow.fs.FileSystem, path)`` or ``(fsspec filesystem, path)`` pair; or a
                :class:`~breadasync.export.Destination`. Credentials come from each
                store's standard chain.

        Raises:
            UnfinishedJobError: The job is not complete and ``allow_partial`` is false.
            ExportMismatchError: ``dest`` holds another export; nothing was changed.
            ExportLockedError: Another exporter is writing to ``dest``.
            DestinationError: ``dest`` is a file, not writable, the disk is full, or the
                store refuses the credentials.
            InvalidArgumentError: ``dest`` has an unknown or unsupported scheme (raised
                before any request).
            DataIntegrityError: The pages do not add up to ``lines`` rows.
            APIError: A request failed after its retries (e.g. :class:`NotFoundError`).
        """
        target = check_target(target_name, repo_name)
        options = ExportOptions(
            page_size, concurrency, window, rows_per_part, compression, resume, allow_partial
        )
        return await Exporter(self, options, user_id, on_progress=on_progress).export(target, dest)

    async def export_many(
        self,
        targets: Iterable[TargetLike],
        *,
        dest: DestinationLike,
        repo_name: str | None = None,
        target_concurrency: int = 4,
        page_size: int = 1000,
        concurrency: int = 16,
        rows_per_part: int = 100_000,
        compression: Compression = "zstd",
        resume: bool = True,
        allow_partial: bool = False,
        window: int | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        on_progress: ExportProgressCallback | None = None,
    ) -> ExportResults:
        """Export many targets into one dataset folder, ``dest/repo=R/target=T/``.

        Names are percent-encoded into the folder names (Hive style, as
        ``pyarrow.dataset``, DuckDB and polars read them), so no name can leave ``dest`` or
        collide with another. ``concurrency`` page requests are shared by all targets;
        ``target_concurrency`` targets export at once. One target's failure is recorded in
        its result (``error``) and does not stop the others. Other arguments as in
        :meth:`export_rollout`.
        """
        options = ExportOptions(
            page_size, concurrency, window, rows_per_part, compression, resume, allow_partial
        )
        return await export_many(
            Exporter(self, options, user_id, on_progress=on_progress),
            targets,
            repo_name,
            dest,
            target_concurrency,
        )

    def iter_rollout_batches(
        self,
        target_name: str,
        *,
        repo_name: str,
        page_size: int = 1000,
        concurrency: int = 16,
        allow_partial: bool = False,
        window: int | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
    ) -> BatchStream:
        """A rollout's output as ``pyarrow.RecordBatch`` objects, in offset order, without
        touching disk (the exporter's own pipeline)::

            async for batch in client.iter_rollout_batches("t", repo_name="r"):
                ...

        Same checks as :meth:`export_rollout`: an unfinished job is refused unless
        ``allow_partial``; short pages are completed; exactly ``lines`` rows come out.
        Use ``async with`` around it when you may stop early.
        """
        target = check_target(target_name, repo_name)
        options = ExportOptions(page_size, concurrency, window, allow_partial=allow_partial)
        return BatchStream(Exporter(self, options, user_id), target)

    async def _get_raw(self, path: str, params: Mapping[str, Any], user_id: str | None) -> Response:
        """A GET whose body the caller decodes (the exporter, off the event loop);
        ``user_id`` is already resolved (:meth:`_user`)."""
        return await self._transport.request("GET", path, params=params, user_id=user_id)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
    ) -> Any:
        """Call an endpoint this client does not wrap; returns the decoded JSON.

        ``path`` is a path on the configured origin (``/v1/repo/r/bakes``); absolute URLs
        are refused, so the key only goes where it belongs. Same limits, retries and errors
        as every other call.
        """
        if method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise InvalidArgumentError(f"unsupported HTTP method {method!r}")
        return await self._call(
            method.upper(),
            path,
            lambda data, _origin: data,
            params=params,
            body=json,
            user_id=user_id,
            timeout=timeout,
        )

    async def _call(
        self,
        method: str,
        path: str,
        parse: Callable[[Any, Origin], _T],
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
        idempotency_key: str | None = None,
    ) -> _T:
        response = await self._transport.request(
            method,
            path,
            params=params,
            json_body=body,
            user_id=self._user(user_id),
            timeouts=None if timeout is NOT_GIVEN else Timeouts.of(timeout),
            idempotency_key=idempotency_key,
        )
        try:
            data = decode_json(
                response.body, method=method, path=response.path, status=response.status
            )
            return parse(data, Origin(method, response.path, response.status))
        except ProtocolError as exc:
            raise self._transport.scrubbed(exc) from None

    def _user(self, user_id: str | NotGiven | None) -> str | None:
        if user_id is NOT_GIVEN:
            return self.user_id
        return check_user_id(user_id)


class Targets:
    """``client.targets``: create, get and list targets; ``.stim`` and ``.rollout`` jobs."""

    def __init__(self, client: BreadClient) -> None:
        self._client = client
        self.stim = Stim(client)
        """Stimulus-generation jobs."""
        self.rollout = Rollout(client)
        """Rollout (trajectory-generation) jobs."""

    async def create(
        self,
        *,
        repo_name: str,
        target_name: str,
        template: str = "default",
        overrides: Mapping[str, Any] | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
        idempotency_key: str | None = None,
    ) -> Target:
        """Create a target (idempotent: the same config again returns the existing one).

        Raises:
            ConflictError: The target exists with a different config (targets are immutable).
            UnprocessableEntityError: An override has the wrong type or range.
        """
        path = repo_path(repo_name)
        check_name(target_name, "target_name")
        check_name(template, "template")
        if overrides is not None and not isinstance(overrides, Mapping):
            raise InvalidArgumentError(
                f"overrides must be a mapping, got {type(overrides).__name__}"
            )
        body: dict[str, Any] = {"target_name": target_name, "template": template}
        if overrides is not None:
            body["overrides"] = dict(overrides)
        return await self._client._call(
            "POST",
            path,
            parse_target,
            body=body,
            user_id=user_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )

    async def get(
        self,
        target_name: str,
        *,
        repo_name: str,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
    ) -> Target:
        """A target and its config.

        Raises:
            NotFoundError: No such target.
        """
        return await self._client._call(
            "GET",
            target_path(repo_name, target_name),
            parse_target,
            user_id=user_id,
            timeout=timeout,
        )

    async def list(
        self,
        *,
        repo_name: str,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
    ) -> TargetList:
        """The names of a repo's targets.

        Raises:
            NotFoundError: No such repo.
        """
        return await self._client._call(
            "GET",
            repo_path(repo_name),
            parse_target_list,
            user_id=user_id,
            timeout=timeout,
        )


class _Jobs:
    """What stim and rollout jobs share: run, get, get_output, wait."""

    _kind: JobKind

    def __init__(self, client: BreadClient) -> None:
        self._client = client

    async def run(
        self,
        target_name: str,
        *,
        repo_name: str,
        poll: bool = True,
        poll_timeout: float | None = None,
        poll_policy: PollPolicy | NotGiven = NOT_GIVEN,
        raise_on_failure: bool = True,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
        idempotency_key: str | None = None,
    ) -> JobStatus:
        """Start the job (idempotent: if it exists, its current state comes back).

        With ``poll=True`` (the default) it then waits, as :meth:`wait` does, until the job
        is ``complete`` or ``failed``.

        Args:
            poll: Wait for a terminal state.
            poll_timeout: Seconds to wait at most (default: no bound); then
                :class:`PollTimeoutError`, the job still running on the service.
            poll_policy: Poll spacing for this call (default: the client's).
            raise_on_failure: Raise :class:`JobFailedError` for a ``failed`` job instead of
                returning its status.
            user_id: Act for this user on every request of the call, polls included.
            timeout: Per-request timeout (not the wait: see ``poll_timeout``).
            idempotency_key: The POST's ``Idempotency-Key`` (default: a fresh one, reused by
                the POST's own retries).

        Raises:
            NotFoundError: No such target.
            BadRequestError: A prerequisite is missing (stim not complete, no ``model_name``).
            PaymentRequiredError: No credit left.
        """
        path = target_path(repo_name, target_name, self._kind)
        if poll:
            check_seconds(poll_timeout, "poll_timeout")  # before anything is sent
        status = await self._client._call(
            "POST",
            path,
            parse_job,
            user_id=user_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )
        if not poll:
            return status
        return await self._wait(
            target_name,
            repo_name,
            status,
            poll_timeout=poll_timeout,
            poll_policy=poll_policy,
            raise_on_failure=raise_on_failure,
            user_id=user_id,
            timeout=timeout,
        )

    async def get(
        self,
        target_name: str,
        *,
        repo_name: str,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
    ) -> JobStatus:
        """The job's current status (``not_started`` if it was never started).

        Raises:
            NotFoundError: No such target.
        """
        return await self._client._call(
            "GET",
            target_path(repo_name, target_name, self._kind),
            parse_job,
            user_id=user_id,
            timeout=timeout,
        )

    async def get_output(
        self,
        target_name: str,
        *,
        repo_name: str,
        limit: int | NotGiven = NOT_GIVEN,
        offset: int | NotGiven = NOT_GIVEN,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
    ) -> OutputPage:
        """One page of the job's output.

        Args:
            limit: Rows per page, 1..1000 (the service's default is 100). A page may hold
                fewer rows than asked even before the end: continue from
                ``offset + len(page.output)``, not ``offset + limit``.
            offset: The first row, from 0.

        Raises:
            InvalidArgumentError: ``limit`` or ``offset`` out of range (nothing is sent).
            NotFoundError: No such target.
        """
        params: dict[str, int] = {}
        if limit is not NOT_GIVEN:
            params["limit"] = check_limit(limit)
        if offset is not NOT_GIVEN:
            params["offset"] = check_offset(offset)
        return await self._client._call(
            "GET",
            target_path(repo_name, target_name, self._kind, "output"),
            parse_page,
            params=params,
            user_id=user_id,
            timeout=timeout,
        )

    async def wait(
        self,
        target_name: str,
        *,
        repo_name: str,
        poll_timeout: float | None = None,
        poll_policy: PollPolicy | NotGiven = NOT_GIVEN,
        raise_on_failure: bool = True,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: float | Timeouts | NotGiven = NOT_GIVEN,
    ) -> JobStatus:
        """Wait until an already started job is ``complete`` or ``failed``.

        Polls adaptively (see :class:`PollPolicy`): often at first, then toward the docs'
        10-30 s, and just after the finish the job's progress predicts.

        Raises:
            JobError: The job was never started.
            JobFailedError: It failed (unless ``raise_on_failure=False``).
            PollTimeoutError: ``poll_timeout`` passed first.
        """
        check_seconds(poll_timeout, "poll_timeout")
        return await self._wait(
            target_name,
            repo_name,
            None,
            poll_timeout=poll_timeout,
            poll_policy=poll_policy,
            raise_on_failure=raise_on_failure,
            user_id=user_id,
            timeout=timeout,
        )

    async def _wait(
        self,
        target_name: str,
        repo_name: str,
        first: JobStatus | None,
        *,
        poll_timeout: float | None,
        poll_policy: PollPolicy | NotGiven,
        raise_on_failure: bool,
        user_id: str | NotGiven | None,
        timeout: float | Timeouts | NotGiven,
    ) -> JobStatus:
        policy = self._client.poll_policy if poll_policy is NOT_GIVEN else poll_policy
        schedule = PollSchedule(policy)
        started = anyio.current_time()
        deadline = None if poll_timeout is None else started + poll_timeout
        status = first
        if status is None:
            status = await self.get(
                target_name, repo_name=repo_name, user_id=user_id, timeout=timeout
            )
            if status.status is JobState.NOT_STARTED:
                raise JobError(
                    f"{self._kind} of {repo_name}/{target_name} has not been started; start it "
                    f"with client.targets.{self._kind}.run(...)",
                    repo_name=repo_name,
                    target_name=target_name,
                    kind=self._kind,
                    job=status,
                )
        schedule.observe(status, anyio.current_time())
        while not status.is_terminal:
            delay = schedule.next_delay()
            if deadline is not None:
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    raise PollTimeoutError(
                        f"{self._kind} of {repo_name}/{target_name} is still {status.status} "
                        f"({status.lines} lines) after {anyio.current_time() - started:.1f} s "
                        f"(poll_timeout={poll_timeout} s); it keeps running on the service",
                        repo_name=repo_name,
                        target_name=target_name,
                        kind=self._kind,
                        job=status,
                    )
                delay = min(delay, remaining)
            await anyio.sleep(delay)
            status = await self.get(
                target_name, repo_name=repo_name, user_id=user_id, timeout=timeout
            )
            schedule.observe(status, anyio.current_time())
        if status.is_failed and raise_on_failure:
            raise JobFailedError.of(self._kind, repo_name, target_name, status)
        return status


class Stim(_Jobs):
    """``client.targets.stim``: stimulus-generation jobs (a rollout needs one complete)."""

    _kind = "stim"


class Rollout(_Jobs):
    """``client.targets.rollout``: rollout (trajectory-generation) jobs and their output."""

    _kind = "rollout"
