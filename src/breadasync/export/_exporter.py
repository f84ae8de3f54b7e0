"""Export a rollout's output to Parquet: plan, fetch in parallel, convert, write, commit.

Guarantees: an export ends with exactly ``lines`` rows, each offset once and in order, or
fails with an error that says why; a part file that exists under its final name is whole;
an interrupted export resumes without fetching the parts it already wrote; a folder holding
another export is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import quote

import anyio
import pyarrow as pa
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from breadasync._errors import (
    BreadError,
    DataIntegrityError,
    InvalidArgumentError,
    UnfinishedJobError,
    first_error,
)
from breadasync._models import (
    JobState,
    JobStatus,
    TargetLike,
    TargetRef,
    normalise_targets,
    parse_page,
)
from breadasync._results import Results
from breadasync._validation import MAX_PAGE_SIZE, check_int, check_name, target_path
from breadasync._version import __version__

from ._commit import PartWriter, commit, in_mode, reconcile, refuse_single_export
from ._decode_process import PIPELINE_DEPTH, DecodeProcesses
from ._dest import Destination, DestinationLike, resolve_destination
from ._plan import FINGERPRINT_ROWS, ExportPlan, JobIdentity, Part
from ._reader import Page, RangeReader
from ._schema import SCHEMA_VERSION, ColumnMode, check_columns, schema_for
from ._store import MANIFEST, PartRecord, describe_os_error
from ._threads import run_to_end

if TYPE_CHECKING:
    from breadasync._api import Api
    from breadasync._config import NotGiven

Compression = Literal["zstd", "snappy", "gzip", "lz4", "brotli", "none"]
FORMAT = "breadasync-export"
DECODE_THREADS = 2
"""Threads decoding pages. Arrow's JSON parser releases the GIL, so two keep two cores busy;
more only add contention with the event loop (measured in benchmarks/RESULTS.md)."""
DECODE_PROCESSES = 1
"""Default child processes decoding pages (see :class:`ExportOptions`), chosen by
measurement (``benchmarks/export.py``, 200,000 realistic rows, side by side): one child took
the event loop's p99 lag from 48 to 14 ms and the exporting process's peak RSS from 302 to
180 MB, for about 10% more CPU in all (the Arrow IPC round trip); a second child added CPU
and lag on two cores without adding throughput."""
PROCESS_MIN_PAGES = 50
"""Below this many pages to fetch, an export decodes in threads: starting a child (a Python
with pyarrow, some 0.3 s of CPU) costs more than it saves."""
WINDOW_ROWS_PER_REQUEST = 4096
"""Rows fetched ahead of the writer by default, per page request in flight
(``concurrency``): 65,536 at the default 16. A page that waits for its retry (a 503's
``Retry-After: 1``) then holds back the writer, not the fetches beyond it, as long as the
window holds about a second of the export's throughput, which grows with ``concurrency``.
At about 0.6 KB a decoded realistic row, 65,536 rows are some 40 MB."""
ROWS_PER_PART = 10_000
"""Default rows per part file. A part is the unit a killed export keeps: what a kill can
lose is the part being written plus the pages fetched ahead of it (``rows_per_part +
window * page_size`` rows), so parts are kept small enough to commit every few seconds
even under throttling (10 pages of 1000 rows, 40 at a page cap of 250)."""


@dataclass(frozen=True, slots=True)
class ExportOptions:
    """How an export runs.

    Attributes:
        page_size: Rows asked per page, 1..1000 (default 1000, the most the API gives).
        concurrency: Page requests in flight (default 16; the client's limits apply too).
        window: Pages fetched ahead of the writer (default: ``concurrency + 8`` pages or
            ``concurrency *`` :data:`WINDOW_ROWS_PER_REQUEST` rows, whichever is more;
            pages beyond one that waits for its retry go on being fetched within it).
        rows_per_part: Rows per Parquet file (default :data:`ROWS_PER_PART`, 10,000: the
            most a killed export loses, with the pages fetched ahead).
        compression: Parquet compression (default ``"zstd"``).
        resume: Keep verified parts from an earlier run (default); if false, an earlier
            export of the same target in the folder is replaced.
        allow_partial: Export what a running or failed job has so far instead of refusing.
        columns: ``"json"`` (default): undocumented fields as JSON text in ``extra``;
            ``"typed"``: the known ones (``messages``, ``usage``, ``finish_reason``,
            ``reward``, ``tool_calls``) as typed columns, what does not fit them in
            ``extra`` (see :mod:`breadasync.export._schema`).
        decode_processes: Child processes that decode pages (exactly as this process
            would, sending Arrow IPC back), so decoding holds no GIL of the event loop's
            process; 0 decodes in threads of this one (default :data:`DECODE_PROCESSES`).
            Exports of fewer than :data:`PROCESS_MIN_PAGES` pages always decode in threads
            (a child costs a Python start-up).
    """

    page_size: int = MAX_PAGE_SIZE
    concurrency: int = 16
    window: int | None = None
    rows_per_part: int = ROWS_PER_PART
    compression: Compression = "zstd"
    resume: bool = True
    allow_partial: bool = False
    columns: ColumnMode = "json"
    decode_processes: int = DECODE_PROCESSES

    def __post_init__(self) -> None:
        check_columns(self.columns)
        check_int(self.page_size, "page_size", 1, MAX_PAGE_SIZE)
        check_int(self.decode_processes, "decode_processes", 0, 64)
        check_int(self.concurrency, "concurrency", 1, 1024)
        check_int(self.rows_per_part, "rows_per_part", 1, 100_000_000)
        if self.window is not None:
            check_int(self.window, "window", 1)
        if self.compression not in ("zstd", "snappy", "gzip", "lz4", "brotli", "none"):
            raise InvalidArgumentError(f"unknown compression {self.compression!r}")

    @property
    def pages_ahead(self) -> int:
        """The window in pages: ``window``, else ``concurrency + 8`` pages or
        ``concurrency *`` :data:`WINDOW_ROWS_PER_REQUEST` rows, whichever is more."""
        rows = self.concurrency * WINDOW_ROWS_PER_REQUEST
        return self.window or max(self.concurrency + 8, -(-rows // self.page_size))


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What one export did.

    Attributes:
        target: The target exported.
        dest: Its folder, or its prefix's URI (without URI options).
        rows: Rows in the export (equal to ``lines``).
        lines: The job's lines when the export began.
        status: The job's status then.
        partial: Whether the job was unfinished (``allow_partial``).
        pages: Page requests made by this run (0 when everything was already on disk).
        bytes: Bytes of the export's part files.
        files: The part files, in offset order.
        parts_written: Parts this run wrote.
        parts_reused: Parts verified and kept from an earlier run.
        elapsed: Seconds this run took.
        retries: Retries the client made during this run (all of its requests).
        error: For :meth:`BreadClient.export_many`: why this target failed, else ``None``.
    """

    target: TargetRef
    dest: str
    rows: int = 0
    lines: int = 0
    status: str = ""
    partial: bool = False
    pages: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    parts_written: int = 0
    parts_reused: int = 0
    elapsed: float = 0.0
    retries: int = 0
    error: BreadError | None = None

    @property
    def ok(self) -> bool:
        """Whether the export completed."""
        return self.error is None

    @property
    def manifest(self) -> str:
        """The manifest's path or URI (the export's commit point)."""
        return f"{self.dest.rstrip('/')}/{MANIFEST}"


@dataclass(frozen=True, slots=True)
class ExportProgress:
    """How far one target's export has come, for ``on_progress``.

    Attributes:
        target: The target.
        rows: Rows done: kept from an earlier run, or fetched and handed to the writer.
        total: Rows the export will hold.
        pages: Pages fetched by this run so far.
    """

    target: TargetRef
    rows: int
    total: int
    pages: int


ProgressCallback = Callable[[ExportProgress], Any]


class ExportResults(Results[ExportResult]):
    """One :class:`ExportResult` per target of :meth:`BreadClient.export_many`, in input
    order."""

    @property
    def rows(self) -> int:
        """Rows exported, all targets together."""
        return sum(r.rows for r in self._results)


def hive_segment(key: str, value: str) -> str:
    """``key=value`` with ``value`` percent-encoded, so no name can leave its folder or
    collide with another; names too long for a file name keep a prefix and a hash."""
    encoded = quote(value, safe="")
    if len(encoded) > 180:
        prefix = encoded[:120]
        cut = prefix.rfind("%", len(prefix) - 2)
        if cut != -1:
            prefix = prefix[:cut]
        encoded = f"{prefix}~{hashlib.sha256(value.encode()).hexdigest()[:16]}"
    return f"{key}={encoded}"


def _identity(plan: ExportPlan, columns: ColumnMode) -> dict[str, Any]:
    """What an export is of: a resume keeps only parts written under an equal identity, so
    parts of another job (a re-run, even with the same ``lines``) or of the other column
    mode (another schema) are never mixed in."""
    return {
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "columns": columns,
        "repo": plan.target.repo_name,
        "target": plan.target.target_name,
        "lines": plan.lines,
        "rows_per_part": plan.rows_per_part,
        "job": plan.job.to_dict() if plan.job is not None else None,
    }


def _job_changed(plan: ExportPlan, job: JobStatus, now: JobIdentity, dest: str) -> BreadError:
    was = plan.job.describe() if plan.job is not None else "a job of unknown identity"
    lines = f"{job.lines:,}" if job.lines is not None else "no"
    return DataIntegrityError(
        f"the rollout of {plan.target} changed during the export: it began with {was} "
        f"({plan.status}, {plan.lines:,} lines), the service now has {now.describe()} "
        f"({job.status}, {lines} lines); rows of two jobs must not be mixed, so this export "
        "was not committed. Export again to read the new job (resume=False, or --no-resume, "
        "replaces the parts of the earlier one)",
        dest=dest or None,
    )


_CONSEQUENCES = (asyncio.CancelledError, anyio.BrokenResourceError, anyio.ClosedResourceError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _reraise(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise what a failed task group means to the caller: a cancellation of the caller
    stays exactly a cancellation (``asyncio.timeout`` and ``wait_for`` turn it into
    ``TimeoutError``), never a group of the streams it broke on its way out; otherwise
    the first :class:`BreadError`."""
    task = asyncio.current_task()
    leaves = _leaves(group)
    cancelled = next((e for e in leaves if isinstance(e, asyncio.CancelledError)), None)
    if (task is not None and task.cancelling()) or (
        cancelled is not None and all(isinstance(e, _CONSEQUENCES) for e in leaves)
    ):
        raise cancelled or asyncio.CancelledError()
    raise first_error(group) from None


class _Progress:
    """Reports an export's progress to the caller's callback, if any."""

    def __init__(
        self, callback: ProgressCallback | None, target: TargetRef, total: int, reader: RangeReader
    ) -> None:
        self._callback = callback
        self._target = target
        self._total = total
        self._reader = reader
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows
        if self._callback is not None:
            self._callback(
                ExportProgress(self._target, self.rows, self._total, self._reader.requests)
            )


def _pages(plan: ExportPlan, parts: Iterable[Part]) -> Iterator[Page]:
    """The pages that fetch ``parts``, one at a time (a plan of any size costs nothing)."""
    for part in parts:
        for offset, limit in plan.pages(part):
            yield Page(offset, limit, part.index)


async def _thread(func: Any, *args: Any) -> Any:
    # Never left running by a cancellation: see _threads.
    return await run_to_end(func, *args)


def _unfinished(target: TargetRef, job: JobStatus, dest: str) -> UnfinishedJobError:
    lines = f"{job.lines:,}" if job.lines is not None else "no"
    partial = "allow a partial export (allow_partial=True; --allow-partial on the command line)"
    if job.status is JobState.FAILED:
        why = (
            f"failed ({job.error or 'no reason given'}) after {lines} lines; to keep the "
            f"lines it produced, {partial}"
        )
    elif job.status is JobState.NOT_STARTED:
        why = (
            "has not been started; start it with client.targets.rollout.run(...) or "
            "'breadasync rollout' (its stim job must be complete first)"
        )
    else:
        why = (
            f"is {job.status} ({lines} lines so far); wait for it (client.targets.rollout."
            f"wait(...) or 'breadasync rollout'), or {partial}"
        )
    return UnfinishedJobError(f"cannot export {target}: its rollout {why}", dest=dest)


class Exporter:
    """Runs exports for one client (the machinery behind ``client.export_*``)."""

    def __init__(
        self,
        client: Api,
        options: ExportOptions,
        user_id: str | NotGiven | None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self._client = client
        self._options = options
        # Resolved once: an invalid user_id fails before anything is sent, and pages skip it.
        self._user_id = client.user(user_id)
        self._on_progress = on_progress
        # One limit for every target this exporter handles (export_many shares it).
        self._limiter = anyio.CapacityLimiter(options.concurrency)
        self._decode_limiter = anyio.CapacityLimiter(
            max(DECODE_THREADS, options.decode_processes * PIPELINE_DEPTH)
        )
        self._decoder: DecodeProcesses | None = None
        self._decoder_users = 0

    async def plan(self, target: TargetRef, dest: str) -> tuple[ExportPlan, JobStatus]:
        """Read the job's status and plan the export (refusing an unfinished job unless a
        partial export is allowed)."""
        job = await self._client.get_job(target, "rollout", user_id=self._user_id)
        if job.status is JobState.NOT_STARTED or (
            not job.is_complete and not self._options.allow_partial
        ):
            raise _unfinished(target, job, dest)
        if job.lines is None:
            raise DataIntegrityError(
                f"the status of {target}'s rollout does not say how many lines it has", dest=dest
            )
        identity = await self._identify(target, job, job.lines)
        plan = ExportPlan(
            target,
            job.lines,
            str(job.status),
            self._options.rows_per_part,
            self._options.page_size,
            identity,
        )
        return plan, job

    async def _identify(self, target: TargetRef, job: JobStatus, lines: int) -> JobIdentity:
        """The job's identity; without a ``job_id``, one more small page request for the
        fingerprint of its first rows."""
        if job.job_id is not None:
            return JobIdentity.of(job.job_id, job.config)
        wanted = min(FINGERPRINT_ROWS, lines)
        rows: list[dict[str, Any]] = []
        while len(rows) < wanted:
            page = await self._client.call(
                "GET",
                target_path(target.repo_name, target.target_name, "rollout", "output"),
                parse_page,
                params={"limit": wanted - len(rows), "offset": len(rows)},
                user_id=self._user_id,
            )
            if not page.output:
                break  # the reader reports the gap, with the page's details
            rows.extend(page.output[: wanted - len(rows)])
        return JobIdentity.of(None, job.config, rows if wanted else None)

    async def check_job(self, plan: ExportPlan, dest: str, *, final: bool) -> None:
        """Read the job's status again and fail if it is another job now (a re-run), or a
        complete job changed; ``final`` also re-fetches the fingerprint rows when the
        service gives no ``job_id``."""
        target = plan.target
        job = await self._client.get_job(target, "rollout", user_id=self._user_id)
        known = plan.job
        if known is None:
            return
        if not known.same_status(job.job_id, job.config):
            raise _job_changed(plan, job, JobIdentity.of(job.job_id, job.config), dest)
        if final and known.job_id is None and job.lines is not None:
            now = await self._identify(target, job, min(plan.lines, job.lines))
            if now != known:
                raise _job_changed(plan, job, now, dest)
        if (
            final
            and plan.status == JobState.COMPLETE
            and (job.status is not JobState.COMPLETE or job.lines != plan.lines)
        ):
            lines = f"{job.lines:,}" if job.lines is not None else "no"
            raise DataIntegrityError(
                f"the rollout of {target} was complete with {plan.lines:,} lines when the "
                f"export began, but its status now says {job.status} with {lines} lines; "
                "a complete job must not change",
                dest=dest or None,
            )

    @contextlib.asynccontextmanager
    async def _decoding(self, pages: int) -> AsyncIterator[None]:
        """Child decoding processes for the exports running inside (shared by the targets
        of ``export_many``), if the options ask for them and ``pages`` are worth it; they
        are stopped when the last export using them ends."""
        if self._options.decode_processes == 0 or (
            self._decoder is None and pages < PROCESS_MIN_PAGES
        ):
            yield
            return
        if self._decoder is None:
            self._decoder = DecodeProcesses(self._options.decode_processes)
        self._decoder_users += 1
        try:
            yield
        finally:
            self._decoder_users -= 1
            if self._decoder_users == 0:
                decoder, self._decoder = self._decoder, None
                with anyio.CancelScope(shield=True):
                    await _thread(decoder.close)

    def reader(self, plan: ExportPlan) -> RangeReader:
        """A range reader for ``plan``'s target."""
        return RangeReader(
            self._client,
            plan.target,
            expected_lines=plan.lines,
            complete=plan.status == JobState.COMPLETE,
            limiter=self._limiter,
            decode_limiter=self._decode_limiter,
            window=self._options.pages_ahead,
            user_id=self._user_id,
            columns=self._options.columns,
            decoder=self._decoder,
        )

    async def export(self, target: TargetRef, dest: DestinationLike) -> ExportResult:
        """Export one target into ``dest`` (a path, a URI, a (filesystem, path) pair or a
        :class:`Destination`)."""
        started = time.monotonic()
        retries0 = self._client.stats.retries
        # Before any request: an unknown scheme or a malformed URI fails here.
        store = await _thread(resolve_destination, dest)
        shown = store.display
        plan, job = await self.plan(target, shown)
        await _thread(store.prepare)
        lock = store.locked()
        locked = False

        def enter() -> None:
            nonlocal locked
            lock.__enter__()
            locked = True  # set in the thread: a cancel during the call still sees it

        try:
            await _thread(enter)
            reused, todo, committed = await _thread(self._reconcile, store, plan)
            pages = sum(part.rows for part in todo) // plan.page_size
            try:
                async with self._decoding(pages):
                    reader = self.reader(plan)
                    progress = _Progress(self._on_progress, target, plan.lines, reader)
                    progress.add(sum(r.rows for r in reused))
                    written = await self._write_parts(store, plan, todo, reader, progress)
            except BaseExceptionGroup as group:
                try:
                    _reraise(group)
                except DataIntegrityError:
                    # A page that no longer fits may be a re-run job: say so, naming both.
                    await self.check_job(plan, shown, final=False)
                    raise
            if written:
                await self.check_job(plan, shown, final=True)
            records = sorted(reused + written, key=lambda r: r.start)
            rows = sum(r.rows for r in records)
            if rows != plan.lines:
                raise DataIntegrityError(
                    f"the export of {target} holds {rows:,} rows but the job has "
                    f"{plan.lines:,} lines",
                    dest=shown,
                )
            if not committed:
                await _thread(self._commit, store, plan, job, records, started)
        finally:
            # Shielded: a cancelled export must still let go of its folder, and only once
            # every thread it started is done with it.
            if locked:
                with anyio.CancelScope(shield=True):
                    await _thread(lock.__exit__, None, None, None)
        return ExportResult(
            target=target,
            dest=shown,
            rows=rows,
            lines=plan.lines,
            status=plan.status,
            partial=plan.status != JobState.COMPLETE,
            pages=reader.requests,
            bytes=sum(r.bytes for r in records),
            files=[store.uri(r.name) for r in records],
            parts_written=len(written),
            parts_reused=len(reused),
            elapsed=time.monotonic() - started,
            retries=self._client.stats.retries - retries0,
        )

    def _reconcile(
        self, store: Destination, plan: ExportPlan
    ) -> tuple[list[PartRecord], list[Part], bool]:
        """Decide which stored parts to keep and which to fetch (see ``_commit.reconcile``).
        The flag says the destination already holds this export, whole and committed."""
        return reconcile(
            store,
            plan.parts,
            _identity(plan, self._options.columns),
            resume=self._options.resume,
            what=f"{plan.target} with {plan.lines:,} lines in parts of {plan.rows_per_part:,} rows"
            + in_mode(self._options.columns),
        )

    async def _write_parts(
        self,
        store: Destination,
        plan: ExportPlan,
        parts: list[Part],
        reader: RangeReader,
        progress: _Progress,
    ) -> list[PartRecord]:
        by_index = {part.index: part for part in parts}
        send, receive = anyio.create_memory_object_stream[tuple[Page, list[pa.RecordBatch]]]()
        written: list[PartRecord] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.run, _pages(plan, parts), send)
            await self._consume(store, plan, by_index, receive, written, progress)
        return written

    async def _consume(
        self,
        store: Destination,
        plan: ExportPlan,
        parts: dict[int, Part],
        receive: MemoryObjectReceiveStream[tuple[Page, list[pa.RecordBatch]]],
        written: list[PartRecord],
        progress: _Progress,
    ) -> None:
        writer: PartWriter | None = None
        opened: list[PartWriter] = []

        def open_part(part: Part) -> PartWriter:
            # Registered from the worker thread itself, so a cancel that lands while the
            # part is being opened still finds it to clean up.
            new = PartWriter(
                store,
                _identity(plan, self._options.columns),
                part,
                self._options.compression,
                schema_for(self._options.columns),
            )
            opened.append(new)
            return new

        try:
            async with receive:
                async for page, batches in receive:
                    part = parts[page.part]
                    try:
                        if writer is None:
                            writer = await _thread(open_part, part)
                        await _thread(writer.add, batches)
                        progress.add(sum(batch.num_rows for batch in batches))
                        if writer.done:
                            # A part on disk and in the journal, or neither: a cancel waits.
                            with anyio.CancelScope(shield=True):
                                record = await _thread(writer.commit)
                                await _thread(store.append_journal, record.to_dict())
                            written.append(record)
                            writer = None
                    except OSError as exc:
                        raise describe_os_error(exc, "write", store.uri(part.name)) from exc
        finally:
            unfinished = [w for w in opened if not w.committed]
            if unfinished:
                with anyio.CancelScope(shield=True):
                    for stale in unfinished:
                        await _thread(stale.discard)

    def _commit(
        self,
        store: Destination,
        plan: ExportPlan,
        job: JobStatus,
        records: list[PartRecord],
        started: float,
    ) -> None:
        manifest = {
            "identity": _identity(plan, self._options.columns),
            "source": {
                "base_url": self._client.base_url,
                "repo": plan.target.repo_name,
                "target": plan.target.target_name,
                "kind": "rollout",
            },
            "job": {
                "status": str(job.status),
                "lines": job.lines,
                "job_id": job.job_id,
                "config": dict(job.config),
            },
            "partial": plan.status != JobState.COMPLETE,
            "lines": plan.lines,
            "rows": sum(r.rows for r in records),
            "rows_per_part": plan.rows_per_part,
            "page_size": plan.page_size,
            "compression": self._options.compression,
            "parts": [r.to_dict() for r in records],
            "schema": {
                "version": SCHEMA_VERSION,
                "columns": self._options.columns,
                "fields": [
                    {"name": f.name, "type": str(f.type)} for f in schema_for(self._options.columns)
                ],
            },
            "written": datetime.now(UTC).isoformat(),
            "elapsed_s": round(time.monotonic() - started, 3),
            "breadasync": __version__,
        }
        commit(store, manifest, schema_for(self._options.columns))


async def export_many(
    exporter: Exporter,
    targets: Iterable[TargetLike],
    repo_name: str | None,
    dest: DestinationLike,
    target_concurrency: int,
) -> ExportResults:
    """Export many targets into one Hive-style dataset folder or prefix."""
    refs = normalise_targets(targets, repo_name)
    check_int(target_concurrency, "target_concurrency", 1)
    root = await _thread(resolve_destination, dest)
    await _thread(root.prepare)
    await _thread(refuse_single_export, root)
    unique = list(dict.fromkeys(refs))
    results: dict[TargetRef, ExportResult] = {}
    slots = anyio.CapacityLimiter(target_concurrency)

    async def one(ref: TargetRef) -> None:
        folder = root.child(
            hive_segment("repo", ref.repo_name), hive_segment("target", ref.target_name)
        )
        async with slots:
            try:
                results[ref] = await exporter.export(ref, folder)
            except BreadError as exc:
                results[ref] = ExportResult(target=ref, dest=folder.display, error=exc)

    try:
        async with anyio.create_task_group() as tg:
            for ref in unique:
                tg.start_soon(one, ref)
    except BaseExceptionGroup as group:
        _reraise(group)  # a cancellation stays exactly that
    return ExportResults([results[ref] for ref in refs])


class BatchStream:
    """A rollout's rows as ``pyarrow.RecordBatch`` objects, in offset order: an async
    context manager whose body iterates it::

        async with client.iter_rollout_batches("t", repo_name="r") as batches:
            async for batch in batches:
                ...

    Entering it reads the job's status (a missing target raises :class:`NotFoundError`, an
    unfinished job :class:`UnfinishedJobError`, before any batch is asked for) and starts
    fetching pages in a task group that lives exactly as long as the ``async with`` block:
    leaving the block, early or by an error or a cancellation, stops every fetch and waits
    for the threads decoding pages. An error of the fetches is raised by the iteration. At
    the end, the job's status is read once more: rows of a job re-run meanwhile raise
    :class:`DataIntegrityError` instead of ending the stream.
    """

    def __init__(self, exporter: Exporter, target: TargetRef) -> None:
        self._exporter = exporter
        self._target = target
        self._receive: MemoryObjectReceiveStream[tuple[Page, list[pa.RecordBatch]]] | None = None
        self._group: TaskGroup | None = None
        self._scope = anyio.CancelScope()
        self._error: BaseException | None = None
        self._queue: list[pa.RecordBatch] = []
        self._entered = False
        self._finished = False
        self.plan: ExportPlan | None = None
        """The plan (lines, status, the job's identity), once entered."""

    async def __aenter__(self) -> BatchStream:
        if self._entered:
            raise RuntimeError("a batch stream is entered once; call iter_rollout_batches again")
        self._entered = True
        plan, _ = await self._exporter.plan(self._target, "")
        self.plan = plan
        reader = self._exporter.reader(plan)
        send, receive = anyio.create_memory_object_stream[tuple[Page, list[pa.RecordBatch]]]()
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group, self._receive = group, receive

        async def produce() -> None:
            # A failure reaches the consumer through the stream (the end, then the error),
            # so it never cancels the consumer's own code in the ``async with`` block; a
            # scope of its own, so stopping early cancels the fetches and nothing else.
            with self._scope:
                try:
                    await reader.run(_pages(plan, [Part(0, 0, plan.lines)]), send)
                except ExceptionGroup as failed:
                    self._error = first_error(failed)
                except Exception as exc:
                    self._error = exc
                finally:
                    send.close()

        group.start_soon(produce)
        return self

    def __aiter__(self) -> BatchStream:
        return self

    async def __anext__(self) -> pa.RecordBatch:
        if not self._entered:
            raise RuntimeError(
                "iterate the batches inside 'async with client.iter_rollout_batches(...) as "
                "batches:', which checks the target first and stops every fetch when left"
            )
        if self._finished or self._receive is None:
            raise StopAsyncIteration
        while not self._queue:
            try:
                _, batches = await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                await self._end()
                raise StopAsyncIteration from None
            self._queue.extend(batches)
        return self._queue.pop(0)

    async def _end(self) -> None:
        self._finished = True
        error, self._error = self._error, None
        if error is not None:
            raise error
        assert self.plan is not None
        if self.plan.lines:
            await self._exporter.check_job(self.plan, "", final=True)

    async def aclose(self) -> None:
        """Stop fetching (the ``async with`` block does this when it ends)."""
        self._finished = True
        self._scope.cancel()
        if self._receive is not None:
            self._receive.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        await self.aclose()
        if group is None:
            return
        # The block's own exception (or cancellation) goes on as it is; the group only
        # waits for the fetches, already cancelled, and for their decoding threads.
        try:
            await group.__aexit__(None, None, None)
        except BaseExceptionGroup as failed:
            _reraise(failed)


def check_target(target_name: str, repo_name: str) -> TargetRef:
    """A checked :class:`TargetRef`."""
    return TargetRef(check_name(repo_name, "repo_name"), check_name(target_name, "target_name"))
