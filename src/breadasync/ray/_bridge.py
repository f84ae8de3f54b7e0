"""The one place :mod:`breadasync.ray` touches the exporter's internals.

Planning a target (its job status, refused if unfinished) and reading a range of its rows
into Arrow batches are what the local exporter does too; doing them through its own pieces
keeps a Ray read and a local export row-for-row identical. Everything else in
:mod:`breadasync.ray` uses the public :class:`~breadasync.BreadClient` API, so when the
export internals change, this module is the only one to adapt.
"""

from __future__ import annotations

import anyio
import pyarrow as pa
from anyio.streams.memory import MemoryObjectSendStream

from breadasync._client import BreadClient
from breadasync._config import NOT_GIVEN
from breadasync._errors import first_error
from breadasync._models import JobState, TargetRef
from breadasync.export._exporter import DECODE_THREADS, Exporter, ExportOptions
from breadasync.export._reader import Page, RangeReader, ReadBounds
from breadasync.export._schema import SCHEMA, ColumnMode, check_columns, rows_to_batch, schema_for

EXPORT_SCHEMA = SCHEMA
"""The columns of the local Parquet export (column mode ``"json"``), which a Ray read
reproduces."""

__all__ = [
    "DECODE_THREADS_PER_TASK",
    "EXPORT_SCHEMA",
    "POSITION",
    "ColumnMode",
    "ReadBounds",
    "check_columns",
    "plan_target",
    "read_range",
    "rows_to_arrow",
    "schema_for",
]

POSITION = SCHEMA.names[0]
"""The column holding a row's position in its job's output (0..lines-1)."""

DECODE_THREADS_PER_TASK = DECODE_THREADS


async def plan_target(
    client: BreadClient, target: TargetRef, *, allow_partial: bool
) -> tuple[int, bool, int | str | None]:
    """``(lines, complete, job_id)`` of a target's rollout, as the exporter plans it: an
    unfinished job raises :class:`~breadasync.UnfinishedJobError` unless
    ``allow_partial``."""
    exporter = Exporter(client.api, ExportOptions(allow_partial=allow_partial), NOT_GIVEN)
    plan, job = await exporter.plan(target, "")
    return plan.lines, plan.status == JobState.COMPLETE, job.job_id


def rows_to_arrow(
    rows: list[dict[str, object]], offset: int, columns: ColumnMode = "json"
) -> pa.RecordBatch:
    """Rows as the exporter converts them (used to size a sample page)."""
    return rows_to_batch(rows, offset, columns=columns)


async def read_range(
    client: BreadClient,
    target: TargetRef,
    start: int,
    stop: int,
    *,
    lines: int,
    complete: bool,
    page_size: int,
    bounds: ReadBounds,
    window: int,
    send: MemoryObjectSendStream[list[pa.RecordBatch]],
    columns: ColumnMode = "json",
    job_id: int | str | None = None,
) -> None:
    """Send rows ``start..stop-1`` of ``target`` to ``send`` as lists of batches in offset
    order (one list per page), then close it; with the exporter's checks: short pages are
    completed, and ``lines`` changing on a complete job, or a page of a job other than
    ``job_id`` (the one planned; ``None``: the first page's), is a
    :class:`~breadasync.DataIntegrityError`.

    At most ``window`` pages are fetched ahead of the consumer; ``bounds`` (shared by the
    ranges of one task) bounds requests, undecoded pages and decoding threads (see
    :class:`~breadasync.export._reader.ReadBounds`); ``columns`` is the column mode, as in
    the exporter."""
    reader = RangeReader(
        client.api,
        target,
        expected_lines=lines,
        complete=complete,
        bounds=bounds,
        window=window,
        user_id=client.user_id,
        job_id=job_id,
        columns=columns,
    )
    pages = [Page(at, min(page_size, stop - at)) for at in range(start, stop, page_size)]
    inner_send, inner = anyio.create_memory_object_stream[tuple[Page, list[pa.RecordBatch]]]()
    try:
        async with send, anyio.create_task_group() as tg:
            tg.start_soon(reader.run, pages, inner_send)
            async with inner:
                async for _, batches in inner:
                    await send.send(batches)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
