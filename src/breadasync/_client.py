"""The facade: :class:`BreadClient`, which owns one transport and hands out the resources
(``client.targets``...), the fan-out entry points and the exports.

It only assembles the layers below it (the API layer ``_api``, the resources, the watch
engine, the exporter); none of them imports it. The method names and argument shapes are
the official SDK's, so code moves over by adding ``await``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._api import Api, Extras
from ._config import (
    DEFAULT_MAX_BODY_BYTES,
    NOT_GIVEN,
    Limits,
    NotGiven,
    PollPolicy,
    RetryPolicy,
    TimeoutArg,
    Timeouts,
    resolve_api_key,
    resolve_base_url,
)
from ._errors import ConfigError, InvalidArgumentError
from ._fanout import AsCompleted, Fanout, collect
from ._models import ProgressCallback, TargetLike, TargetRef, normalise_targets
from ._resources import Rollout, Stim, Targets
from ._results import RolloutResults, RolloutUpdate
from ._transport import ClientStats, Transport
from ._transports import AsyncBaseTransport
from ._validation import check_user_id

if TYPE_CHECKING:
    # Only for annotations: the exporter (and pyarrow) load when an export is first asked.
    from .export._dest import DestinationLike
    from .export._exporter import Exporter
    from .export._options import Compression, ExportProgress, ExportResult, ExportResults
    from .export._schema import ColumnMode
    from .export._stream import BatchStream

__all__ = ["BreadClient", "Rollout", "Stim", "Targets"]


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
            attempt 120 s, 600 s across retries by default); ``None``: no bound; an
            ``httpx.Timeout`` sets connect and read, as in the SDK.
        max_retries: Retries of a failed request (default 5); see :class:`RetryPolicy`.
        max_concurrency: Requests in flight at once (default 64). The client also paces
            itself after a 429 or under overload, and recovers after.
        max_requests_per_second: A pace for all requests (default: none).
        user_id: Act for this user (a master key's ``X-User-Id``) on every request.
        retry: The full retry policy (``max_retries`` overrides its count when given).
        poll: How ``run(poll=True)`` and ``wait`` space their status reads.
        max_body_bytes: The largest answer accepted (default 64 MiB).
        limits: ``max_concurrency``, ``max_requests_per_second`` and ``max_body_bytes`` as
            one :class:`Limits` (instead of the three arguments, which it overrides).
        allow_insecure_http: Allow plain http to a host that is not loopback.
        trust_env: Use proxy settings from the environment (``HTTPS_PROXY``...).
        default_headers, default_query: Headers and query parameters for every request,
            as the SDK's (the key, user and idempotency headers are the client's own).
        transport: What sends single attempts (default: aiohttp); e.g. a
            :class:`MockTransport` in tests. Retries and limits wrap it; the client closes it.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: TimeoutArg = Timeouts(),  # noqa: B008 (frozen, so shared safely)
        max_retries: int | NotGiven = NOT_GIVEN,
        max_concurrency: int = 64,
        max_requests_per_second: float | None = None,
        user_id: str | None = None,
        retry: RetryPolicy | None = None,
        poll: PollPolicy = PollPolicy(),  # noqa: B008 (frozen)
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        limits: Limits | None = None,
        allow_insecure_http: bool = False,
        trust_env: bool = False,
        transport: AsyncBaseTransport | None = None,
        default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, Any] | None = None,
    ) -> None:
        key = resolve_api_key(api_key)
        url = resolve_base_url(base_url, allow_insecure_http=allow_insecure_http)
        policy = retry or RetryPolicy()
        if max_retries is not NOT_GIVEN:
            policy = replace(policy, max_retries=max_retries)
        if not isinstance(poll, PollPolicy):
            raise ConfigError(f"poll must be a PollPolicy, got {type(poll).__name__}")
        if limits is None:
            limits = Limits(max_concurrency, max_requests_per_second, max_body_bytes)
        elif not isinstance(limits, Limits):
            raise ConfigError(f"limits must be a Limits, got {type(limits).__name__}")
        try:
            checked_user = check_user_id(user_id)
            Extras.of(default_headers, default_query, None, prefix="default")
        except InvalidArgumentError as exc:
            raise ConfigError(str(exc)) from None
        self._max_retries = policy.max_retries
        sender = Transport(
            api_key=key,
            base_url=url,
            timeouts=Timeouts.of(timeout),
            retry=policy,
            limits=limits,
            trust_env=trust_env,
            transport=transport,
            default_headers=default_headers,
            default_query=default_query,
        )
        self._api = Api(
            sender,
            user_id=checked_user,
            poll_policy=poll,
            max_concurrency=limits.max_concurrency,
        )
        self.targets = Targets(self._api)
        """Targets, and through them their stim and rollout jobs."""

    @property
    def api(self) -> Api:
        """The layer below this facade (requests, user override, raw pages): for engines
        built on one client, such as the exporter and :mod:`breadasync.ray`."""
        return self._api

    @property
    def user_id(self) -> str | None:
        """The user every request acts for by default (``X-User-Id``), if any."""
        return self._api.user_id

    @property
    def poll_policy(self) -> PollPolicy:
        """The default poll spacing of waits and fan-outs."""
        return self._api.poll_policy

    def __repr__(self) -> str:
        return (
            f"BreadClient(base_url={self.base_url!r}, "
            f"max_concurrency={self.max_concurrency}, "
            f"max_retries={self._max_retries})"
        )

    @property
    def base_url(self) -> str:
        """Where requests go."""
        return self._api.base_url

    @property
    def max_concurrency(self) -> int:
        """The configured ceiling of requests in flight."""
        return self._api.max_concurrency

    @property
    def stats(self) -> ClientStats:
        """Counters of this client: requests, retries, answers by status, throttling, and
        the current (adaptive) concurrency limit."""
        return self._api.stats

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._api.closed

    async def aclose(self) -> None:
        """Close the connection pool. Calls still in flight fail with
        :class:`ClientClosedError`; closing twice is harmless."""
        await self._api.aclose()

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
        on_progress: ProgressCallback[RolloutUpdate] | None = None,
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
            self._api,
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
        on_progress: ProgressCallback[RolloutUpdate] | None = None,
    ) -> RolloutResults:
        """Watch rollouts that were already started (a job never started is an error).

        Same arguments and results as :meth:`rollout_many`, without starting anything.
        """
        refs = normalise_targets(targets, repo_name)
        fanout = Fanout(
            self._api,
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
        on_progress: ProgressCallback[RolloutUpdate] | None = None,
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
            self._api,
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
        rows_per_part: int = 10_000,
        compression: Compression = "zstd",
        resume: bool = True,
        allow_partial: bool = False,
        columns: ColumnMode = "json",
        window: int | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        on_progress: ProgressCallback[ExportProgress] | None = None,
        decode_processes: int | None = None,
    ) -> ExportResult:
        """Export a rollout's output to Parquet files in the folder or prefix ``dest``.

        Pages are fetched in parallel (``concurrency``), at most ``window`` ahead of the
        writer, converted to Arrow off the event loop and written as parts of
        ``rows_per_part`` rows (``part-00000.parquet``...), each to a temporary name,
        fsynced and renamed when whole. ``_manifest.parquet``, written last, commits the
        export. The export holds exactly the job's ``lines`` rows: column ``row_offset``,
        the documented fields, and ``extra`` (every other field, as JSON); with
        ``columns="typed"`` also ``messages``, ``usage``, ``finish_reason``, ``reward`` and
        ``tool_calls`` as typed columns (docs/SCHEMA.md).

        Args:
            page_size: Rows per page request, 1..1000.
            resume: Keep the verified parts of an earlier run into ``dest`` (default); if
                false, replace an earlier export of this target there.
            allow_partial: Export what a running or failed job has so far.
            columns: ``"json"`` (default) or ``"typed"``: how undocumented fields are
                stored (:class:`~breadasync.export.ExportOptions`).
            on_progress: Called with an :class:`~breadasync.export.ExportProgress` as pages
                are written.
            decode_processes: Child processes that decode pages (0: threads of this
                process; default: :class:`~breadasync.export.ExportOptions`' default).
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
        await _load_exporter()
        from .export._exporter import Exporter, ExportOptions

        target = TargetRef.of(target_name, repo_name)
        options = ExportOptions(
            page_size,
            concurrency,
            window,
            rows_per_part,
            compression,
            resume,
            allow_partial,
            columns,
        )
        if decode_processes is not None:
            options = replace(options, decode_processes=decode_processes)
        exporter = Exporter(self._api, options, user_id, on_progress=on_progress)
        return await exporter.export(target, dest)

    async def export_many(
        self,
        targets: Iterable[TargetLike],
        *,
        dest: DestinationLike,
        repo_name: str | None = None,
        target_concurrency: int = 4,
        page_size: int = 1000,
        concurrency: int = 16,
        rows_per_part: int = 10_000,
        compression: Compression = "zstd",
        resume: bool = True,
        allow_partial: bool = False,
        columns: ColumnMode = "json",
        window: int | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        on_progress: ProgressCallback[ExportProgress] | None = None,
        decode_processes: int | None = None,
    ) -> ExportResults:
        """Export many targets into one dataset folder, ``dest/repo=R/target=T/``.

        Names are percent-encoded into the folder names (Hive style, as
        ``pyarrow.dataset``, DuckDB and polars read them), so no name can leave ``dest`` or
        collide with another. ``concurrency`` page requests are shared by all targets;
        ``target_concurrency`` targets export at once. One target's failure is recorded in
        its result (``error``) and does not stop the others. Other arguments as in
        :meth:`export_rollout`.
        """
        await _load_exporter()
        from .export._exporter import Exporter, ExportOptions
        from .export._many import export_many

        options = ExportOptions(
            page_size,
            concurrency,
            window,
            rows_per_part,
            compression,
            resume,
            allow_partial,
            columns,
        )
        if decode_processes is not None:
            options = replace(options, decode_processes=decode_processes)
        return await export_many(
            Exporter(self._api, options, user_id, on_progress=on_progress),
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
        columns: ColumnMode = "json",
        window: int | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
    ) -> BatchStream:
        """A rollout's output as ``pyarrow.RecordBatch`` objects, in offset order, without
        touching disk (the exporter's own pipeline)::

            async with client.iter_rollout_batches("t", repo_name="r") as batches:
                async for batch in batches:
                    ...

        Entering the block checks the options (``InvalidArgumentError``) and the target
        (``NotFoundError``, ``UnfinishedJobError``) before any batch is asked for, and
        loads pyarrow in a worker thread the first time; leaving it stops every fetch.
        Same checks as :meth:`export_rollout`: an unfinished job is refused unless
        ``allow_partial``; short pages are completed; exactly ``lines`` rows of one job
        come out. ``columns`` chooses the batches' schema (``"json"`` or ``"typed"``, as
        for the export).
        """
        from .export._stream import BatchStream

        target = TargetRef.of(target_name, repo_name)
        api = self._api

        def exporter() -> Exporter:
            from .export._exporter import Exporter, ExportOptions

            options = ExportOptions(
                page_size, concurrency, window, allow_partial=allow_partial, columns=columns
            )
            return Exporter(api, options, user_id)

        # Built on entering, after _load_exporter: no import of pyarrow on the event loop.
        return BatchStream(target, exporter, _load_exporter)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
    ) -> Any:
        """Call an endpoint this client does not wrap; returns the decoded JSON.

        ``path`` is a path on the configured origin (``/v1/repo/r/bakes``); absolute URLs
        are refused, so the key only goes where it belongs. Same limits, retries and errors
        as every other call.
        """
        if method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise InvalidArgumentError(f"unsupported HTTP method {method!r}")
        return await self._api.call(
            method.upper(),
            path,
            lambda data, _origin: data,
            params=params,
            body=json,
            user_id=user_id,
            timeout=timeout,
        )


_EXPORTER: Final = "breadasync.export._exporter"
_EXPORTER_LOADED: Final = threading.Event()
"""Set once the exporter's import has finished: a module appears in ``sys.modules`` as its
import begins, so a second export started meanwhile would wait for it on the loop."""


async def _load_exporter() -> None:
    """Import the exporter (and pyarrow: 0.3-0.7 s the first time) in a worker thread, so a
    process's first export does not hold its event loop for that long (nor one started
    while that import runs: it waits in a thread too)."""
    if not _EXPORTER_LOADED.is_set():
        await anyio.to_thread.run_sync(importlib.import_module, _EXPORTER)
        _EXPORTER_LOADED.set()
