"""Export one rollout's output to Parquet: plan, fetch in parallel, convert, write, commit.

Guarantees: an export ends with exactly ``lines`` rows, each offset once and in order, or
fails with an error that says why; a part file that exists under its final name is whole;
an interrupted export resumes without fetching the parts it already wrote; a folder holding
another export is never touched.

:class:`Exporter` runs single-target exports and is the machinery that ``export_many``
(``_many``) and the batch stream (``_stream``) build on; the options and results it works
with are ``_options``'s (re-exported here, where they were first imported from).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import pyarrow as pa
from anyio.streams.memory import MemoryObjectReceiveStream

from breadasync._errors import (
    BreadError,
    DataIntegrityError,
    UnfinishedJobError,
    cancel_requests,
    reraise,
)
from breadasync._models import JobState, JobStatus, TargetRef, parse_page
from breadasync._validation import target_path
from breadasync._version import __version__

from ._commit import PartWriter, commit, in_mode, reconcile
from ._decode import DecodeLimits
from ._decode_process import PIPELINE_DEPTH, DecodeProcesses
from ._dest import Destination, DestinationLike, resolve_destination
from ._options import (
    DECODE_THREADS,
    PROCESS_MIN_PAGES,
    WINDOW_ROWS_PER_REQUEST,
    ExportOptions,
    ExportProgress,
    ExportResult,
    ProgressCallback,
)
from ._plan import FINGERPRINT_ROWS, ExportPlan, JobIdentity, Part
from ._reader import Page, RangeReader, ReadBounds
from ._schema import SCHEMA_VERSION, ColumnMode, schema_for
from ._store import PartRecord, describe_os_error
from ._threads import run_to_end

if TYPE_CHECKING:
    from breadasync._api import Api
    from breadasync._config import NotGiven

# Also here for the code that imports them from this module (the Ray bridge, tests).
__all__ = [
    "DECODE_THREADS",
    "FORMAT",
    "PROCESS_MIN_PAGES",
    "WINDOW_ROWS_PER_REQUEST",
    "ExportOptions",
    "Exporter",
    "in_thread",
    "pages_of",
]

FORMAT = "breadasync-export"
"""The ``format`` of an export's identity (in its journal and manifest)."""


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


def pages_of(plan: ExportPlan, parts: Iterable[Part]) -> Iterator[Page]:
    """The pages that fetch ``parts``, one at a time (a plan of any size costs nothing)."""
    for part in parts:
        for offset, limit in plan.pages(part):
            yield Page(offset, limit, part.index)


async def in_thread(func: Any, *args: Any) -> Any:
    """``func(*args)`` in a worker thread, never left running by a cancellation (see
    :mod:`._threads`)."""
    return await run_to_end(func, *args)


def _unfinished(target: TargetRef, job: JobStatus, dest: str) -> UnfinishedJobError:
    lines = f"{job.lines:,}" if job.lines is not None else "no"
    partial = "allow a partial export (allow_partial=True; --allow-partial on the command line)"
    if job.is_failed:
        why = (
            f"{job.status} ({job.error or 'no reason given'}) after {lines} lines; to keep the "
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
        self._bounds = ReadBounds.for_concurrency(
            options.concurrency, max(DECODE_THREADS, options.decode_processes * PIPELINE_DEPTH)
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
        """The job's identity; without a ``job_id``, or for a job not complete (a service
        may name a job only while it runs, so a later read may not), one more small page
        request for the fingerprint of its first rows."""
        if job.job_id is not None and job.is_complete:
            return JobIdentity.of(job.job_id, job.config)
        return JobIdentity.of(job.job_id, job.config, await self._first_rows(target, lines))

    async def _first_rows(self, target: TargetRef, lines: int) -> list[dict[str, Any]] | None:
        """The job's first rows (at most :data:`FINGERPRINT_ROWS` of ``lines``), or ``None``
        for a job without rows."""
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
        return rows if wanted else None

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
        if (
            final
            and (known.job_id is None or job.job_id is None)
            and known.first_rows is not None
            and job.lines is not None
        ):
            # No two ids to compare: the first rows tell a re-run with the same config.
            rows = await self._first_rows(target, min(plan.lines, job.lines))
            now = JobIdentity.of(job.job_id, job.config, rows)
            if now.first_rows != known.first_rows:
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
            self._decoder = DecodeProcesses(
                self._options.decode_processes,
                limits=DecodeLimits(max_body_bytes=self._client.max_body_bytes),
            )
        self._decoder_users += 1
        try:
            yield
        finally:
            self._decoder_users -= 1
            if self._decoder_users == 0:
                decoder, self._decoder = self._decoder, None
                with anyio.CancelScope(shield=True):
                    await in_thread(decoder.close)

    def reader(self, plan: ExportPlan) -> RangeReader:
        """A range reader for ``plan``'s target."""
        return RangeReader(
            self._client,
            plan.target,
            expected_lines=plan.lines,
            complete=plan.status == JobState.COMPLETE,
            bounds=self._bounds,
            window=self._options.pages_ahead,
            user_id=self._user_id,
            job_id=plan.job.job_id if plan.job is not None else None,
            columns=self._options.columns,
            decoder=self._decoder,
        )

    async def export(self, target: TargetRef, dest: DestinationLike) -> ExportResult:
        """Export one target into ``dest`` (a path, a URI, a (filesystem, path) pair or a
        :class:`Destination`)."""
        started = time.monotonic()
        cancels = cancel_requests()
        retries0 = self._client.stats.retries
        # Before any request: an unknown scheme or a malformed URI fails here.
        store = await in_thread(resolve_destination, dest)
        shown = store.display
        plan, job = await self.plan(target, shown)
        await in_thread(store.prepare)
        lock = store.locked()
        locked = False

        def enter() -> None:
            nonlocal locked
            lock.__enter__()
            locked = True  # set in the thread: a cancel during the call still sees it

        try:
            await in_thread(enter)
            reused, todo, committed = await in_thread(self._reconcile, store, plan)
            pages = sum(part.rows for part in todo) // plan.page_size
            try:
                async with self._decoding(pages):
                    reader = self.reader(plan)
                    progress = _Progress(self._on_progress, target, plan.lines, reader)
                    progress.add(sum(r.rows for r in reused))
                    written = await self._write_parts(store, plan, todo, reader, progress)
            except BaseExceptionGroup as group:
                try:
                    reraise(group, cancels)
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
                await in_thread(self._commit, store, plan, job, records, started)
        finally:
            # Shielded: a cancelled export must still let go of its folder, and only once
            # every thread it started is done with it.
            if locked:
                with anyio.CancelScope(shield=True):
                    await in_thread(lock.__exit__, None, None, None)
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
            tg.start_soon(reader.run, pages_of(plan, parts), send)
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
                            writer = await in_thread(open_part, part)
                        await in_thread(writer.add, batches)
                        progress.add(sum(batch.num_rows for batch in batches))
                        if writer.done:
                            # A part on disk and in the journal, or neither: one thread call
                            # does both, which a cancel (anyio's or a bare task.cancel())
                            # waits for.
                            with anyio.CancelScope(shield=True):
                                record = await in_thread(_commit_part, writer, store)
                            written.append(record)
                            writer = None
                    except OSError as exc:
                        raise describe_os_error(exc, "write", store.uri(part.name)) from exc
        finally:
            unfinished = [w for w in opened if not w.committed]
            if unfinished:
                with anyio.CancelScope(shield=True):
                    for stale in unfinished:
                        await in_thread(stale.discard)

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


def _commit_part(writer: PartWriter, store: Destination) -> PartRecord:
    record = writer.commit()
    store.append_journal(record.to_dict())
    return record
