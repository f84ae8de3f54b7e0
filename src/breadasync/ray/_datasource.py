"""The Ray Data datasource: planned on the driver, read by tasks that are each a client."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import pyarrow as pa
import ray
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from breadasync._client import BreadClient
from breadasync._config import TimeoutArg, Timeouts, resolve_api_key, resolve_base_url
from breadasync._errors import (
    APIConnectionError,
    BreadError,
    InternalServerError,
    InvalidArgumentError,
    RateLimitError,
    first_error,
)
from breadasync._models import TargetLike, normalise_targets
from breadasync._validation import MAX_PAGE_SIZE, check_int

from ._bridge import (
    DECODE_THREADS_PER_TASK,
    EXPORT_SCHEMA,
    ColumnMode,
    ReadBounds,
    check_columns,
    plan_target,
    read_range,
    rows_to_arrow,
    schema_for,
)
from ._planner import Segment, TargetRows, split


def _with_names(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("repo", pa.string(), nullable=False)).append(
        pa.field("target", pa.string(), nullable=False)
    )


SCHEMA = _with_names(EXPORT_SCHEMA)
"""The columns of a Ray read (column mode ``"json"``): those of the Parquet export, then
``repo`` and ``target``."""

TYPED_SCHEMA = _with_names(schema_for("typed"))
"""The columns of a Ray read with ``columns="typed"``: those of the typed Parquet export,
then ``repo`` and ``target``."""


def read_schema(columns: ColumnMode) -> pa.Schema:
    """The schema of a Ray read in the column mode ``columns``."""
    return TYPED_SCHEMA if columns == "typed" else SCHEMA


BLOCK_ROWS = 16_384
"""Rows per block a read task yields: a few MB of realistic rows, well under Ray's block
target, and small enough that a task's memory stays flat."""

TRANSIENT_ERRORS: tuple[type[BreadError], ...] = (
    APIConnectionError,
    InternalServerError,
    RateLimitError,
)
"""Errors after which a read task reads again what it has not yielded yet (once its
client has used up its own retries). Any other error, a 404 or a 401 say, fails the
dataset at once."""

MIN_TASK_PAGES = 8
"""Pages a read task gets at least (when there are enough): a task costs a client, a
connection and Ray's scheduling, worth it only over a few requests' worth of rows."""

SAMPLE_ROWS = 64
"""Rows of one page read at planning to estimate the in-memory size of a row."""


class _Secret:
    """The API key: it travels inside the pickled read task (how a Ray worker gets it), but
    never shows in a repr, a log line or a task's name or metadata."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "'<hidden>'"


@dataclass(frozen=True, slots=True)
class _Connection:
    """How one read task reaches the service, with its share of the budget."""

    base_url: str
    api_key: _Secret = field(repr=False)
    max_concurrency: int
    max_requests_per_second: float | None
    max_retries: int
    timeout: Timeouts
    user_id: str | None
    allow_insecure_http: bool
    page_size: int
    columns: ColumnMode = "json"

    def client(self) -> BreadClient:
        return BreadClient(
            self.api_key.value,
            self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
            max_concurrency=self.max_concurrency,
            max_requests_per_second=self.max_requests_per_second,
            user_id=self.user_id,
            allow_insecure_http=self.allow_insecure_http,
        )


class _Slots:
    """A counted budget of pages held by a task's segment readers."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._changed = anyio.Condition()

    async def take(self, n: int) -> None:
        async with self._changed:
            while self._free < n:
                await self._changed.wait()
            self._free -= n

    async def give(self, n: int) -> None:
        async with self._changed:
            self._free += n
            self._changed.notify_all()


class _ReadFn:
    """The body of one read task: its segments' rows as Arrow tables, in order.

    A transient error that outlasts the client's own retries (one of ``transient``) makes
    the task read again what it has not yielded yet, up to ``retries`` times: the rows
    already handed to Ray are skipped, so none is duplicated or lost. Any other error
    fails the task at once, with the service's message.
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        connection: _Connection,
        retries: int,
        transient: tuple[type[BaseException], ...],
    ) -> None:
        self.segments = tuple(segments)
        self.connection = connection
        self.retries = retries
        self.transient = transient
        self.attempts = 0
        """Reads started (1 + the retries made), in the process that ran the task."""

    def __repr__(self) -> str:
        return f"<bread read task: {len(self.segments)} segment(s), {self.rows:,} rows>"

    @property
    def rows(self) -> int:
        """Rows the task yields."""
        return sum(s.rows for s in self.segments)

    def __call__(self) -> Iterator[pa.Table]:
        done = 0
        while True:
            self.attempts += 1
            try:
                for block in self._stream(_skip(self.segments, done)):
                    done += block.num_rows
                    yield block
                return
            except self.transient as exc:
                if self.attempts > self.retries:
                    raise exc.with_traceback(None) from None
                wait = getattr(exc, "retry_after", None)
                time.sleep(min(30.0, 0.5 * 2 ** (self.attempts - 1)) if wait is None else wait)
            except BreadError as exc:
                # The service's message, not the frames of the event loop that got it.
                raise exc.with_traceback(None) from None

    def _stream(self, segments: tuple[Segment, ...]) -> Iterator[pa.Table]:
        # A private event loop in a thread of this task: Ray calls us synchronously, and
        # the blocks stream out one at a time while the next pages are fetched.
        with anyio.from_thread.start_blocking_portal() as portal:
            send, receive = anyio.create_memory_object_stream[pa.Table](1)
            future = portal.start_task_soon(self._produce, segments, send)
            try:
                while True:
                    try:
                        block = portal.call(receive.receive)
                    except anyio.EndOfStream:
                        break
                    yield block
                future.result()
            finally:
                if not future.done():
                    future.cancel()
                portal.call(receive.aclose)

    async def _produce(
        self, segments: tuple[Segment, ...], send: MemoryObjectSendStream[pa.Table]
    ) -> None:
        conn = self.connection
        window = conn.max_concurrency + 8
        try:
            async with send, conn.client() as client, anyio.create_task_group() as tg:
                bounds = ReadBounds.for_concurrency(conn.max_concurrency, DECODE_THREADS_PER_TASK)
                slots = _Slots(window)
                queued_send, queued = anyio.create_memory_object_stream[
                    tuple[Segment, int, MemoryObjectReceiveStream[list[pa.RecordBatch]]]
                ](math.inf)

                async def start_segments() -> None:
                    # Later segments start while earlier ones are read, within one window
                    # of pages, so a task of many small targets keeps its requests busy.
                    async with queued_send:
                        for seg in segments:
                            pages = min(window, -(-seg.rows // conn.page_size))
                            await slots.take(pages)
                            seg_send, seg_receive = anyio.create_memory_object_stream[
                                list[pa.RecordBatch]
                            ]()
                            tg.start_soon(
                                partial(
                                    read_range,
                                    client,
                                    seg.target,
                                    seg.start,
                                    seg.stop,
                                    lines=seg.lines,
                                    complete=seg.complete,
                                    page_size=conn.page_size,
                                    bounds=bounds,
                                    window=pages,
                                    send=seg_send,
                                    columns=conn.columns,
                                    job_id=seg.job_id,
                                )
                            )
                            await queued_send.send((seg, pages, seg_receive))

                tg.start_soon(start_segments)
                pending: list[pa.RecordBatch] = []
                rows = 0
                schema = read_schema(conn.columns)
                async with queued:
                    async for seg, pages, seg_receive in queued:
                        async with seg_receive:
                            async for batches in seg_receive:
                                for batch in batches:
                                    pending.append(_named(batch, seg, schema))
                                    rows += batch.num_rows
                                if rows >= BLOCK_ROWS:
                                    await send.send(pa.Table.from_batches(pending, schema))
                                    pending, rows = [], 0
                        await slots.give(pages)
                if pending:
                    await send.send(pa.Table.from_batches(pending, schema))
        except BaseExceptionGroup as group:
            raise first_error(group) from None


def _skip(segments: tuple[Segment, ...], rows: int) -> tuple[Segment, ...]:
    """The segments without their first ``rows`` rows (those already yielded)."""
    left = []
    for seg in segments:
        if rows >= seg.rows:
            rows -= seg.rows
            continue
        left.append(replace(seg, start=seg.start + rows))
        rows = 0
    return tuple(left)


def _named(batch: pa.RecordBatch, seg: Segment, schema: pa.Schema) -> pa.RecordBatch:
    n = batch.num_rows
    return pa.RecordBatch.from_arrays(
        [
            *batch.columns,
            pa.repeat(pa.scalar(seg.target.repo_name, pa.string()), n),
            pa.repeat(pa.scalar(seg.target.target_name, pa.string()), n),
        ],
        schema=schema,
    )


def _cluster_cpus() -> int:
    if ray.is_initialized():
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
        return max(1, int(resources.get("CPU", 1)))
    return os.cpu_count() or 1  # what ray.init() will find when Ray Data starts it


class BreadDatasource(Datasource):
    """The rollout outputs of many targets as a Ray Data source.

    Planning happens here, on the driver: the status of every target's rollout is read once
    (an unfinished job raises :class:`~breadasync.UnfinishedJobError` unless
    ``allow_partial``; a missing target or a bad key raises the client's error with the
    service's message), and one page is sampled to size a row. Read tasks then fetch
    exactly the ``lines`` planned, and fail with :class:`~breadasync.DataIntegrityError` if
    a complete job's ``lines`` change under them.

    The budget: at most ``max_tasks`` read tasks run at once (pass ``concurrency=
    datasource.max_tasks`` to ``ray.data.read_datasource``; :func:`read_rollouts` does),
    and each is one client with ``max_concurrency // tasks`` requests in flight and
    ``max_requests_per_second / tasks`` requests per second, where ``tasks`` is the smaller
    of ``max_tasks`` and the number of read tasks. So the whole cluster never has more than
    ``max_concurrency`` requests in flight, nor goes faster than the rate given. 429/503
    make a task's client slow down by itself, as any client does.

    Args:
        max_concurrency: Requests in flight across the whole cluster (default 64).
        max_requests_per_second: Requests per second across the whole cluster.
        max_tasks: Read tasks running at once (default: the cluster's CPUs, at most
            ``max_concurrency``); the budget is split evenly between them.
        max_retries: Retries of one request by a task's client (default 5).
        task_retries: Times a read task reads again, after a transient error (one of
            :data:`TRANSIENT_ERRORS`) outlasts its client's retries, the rows it has not
            yielded yet (default 3); rows already yielded are skipped, so none is
            duplicated. A worker that dies is rerun by Ray, which replaces the blocks of
            the lost run with the same blocks.
        columns: ``"json"`` (default) or ``"typed"``: the exporter's column modes, with
            the same columns and types (docs/SCHEMA.md).
        repo_name: The repository of targets given by name alone.
        api_key, base_url, timeout, user_id, allow_insecure_http, page_size, allow_partial:
            As for :class:`~breadasync.BreadClient` and the exporter. The key travels to the
            workers inside the serialized read tasks; it is in no task name, repr or
            metadata.
    """

    def __init__(
        self,
        targets: Iterable[TargetLike],
        *,
        repo_name: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        max_concurrency: int = 64,
        max_requests_per_second: float | None = None,
        max_tasks: int | None = None,
        allow_partial: bool = False,
        page_size: int = MAX_PAGE_SIZE,
        max_retries: int = 5,
        task_retries: int = 3,
        timeout: TimeoutArg = Timeouts(),  # noqa: B008 (frozen)
        user_id: str | None = None,
        allow_insecure_http: bool = False,
        columns: ColumnMode = "json",
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        check_columns(columns)
        refs = list(dict.fromkeys(normalise_targets(targets, repo_name)))
        check_int(max_concurrency, "max_concurrency", 1)
        check_int(page_size, "page_size", 1, MAX_PAGE_SIZE)
        if max_tasks is not None:
            check_int(max_tasks, "max_tasks", 1)
        if max_requests_per_second is not None and not max_requests_per_second > 0:
            raise InvalidArgumentError(
                f"max_requests_per_second must be > 0, got {max_requests_per_second!r}"
            )
        key = resolve_api_key(api_key)
        url = str(resolve_base_url(base_url, allow_insecure_http=allow_insecure_http))
        self.max_concurrency = max_concurrency
        """Requests in flight across the whole cluster, at most."""
        self.max_requests_per_second = max_requests_per_second
        """Requests per second across the whole cluster, at most (``None``: no pace)."""
        self.max_tasks = min(max_tasks or _cluster_cpus(), max_concurrency)
        """Read tasks running at once, at most."""
        self.page_size = page_size
        self.task_retries = check_int(task_retries, "task_retries", 0)
        self.columns: ColumnMode = columns
        """The column mode (as the exporter's ``columns``)."""
        self.schema = read_schema(columns)
        """The schema of the blocks: :data:`SCHEMA` or :data:`TYPED_SCHEMA`."""
        self._connection = _Connection(
            url,
            _Secret(key),
            max_concurrency,
            max_requests_per_second,
            max_retries,
            Timeouts.of(timeout),
            user_id,
            allow_insecure_http,
            page_size,
            columns,
        )
        planned: tuple[list[TargetRows], float] = _run(partial(self._plan, refs, allow_partial))
        self.targets, self.row_bytes = planned
        """The targets as planned (``lines``, complete), and the estimated bytes of a row in
        memory."""

    def __repr__(self) -> str:
        return (
            f"BreadDatasource({len(self.targets)} targets, {self.rows:,} rows, "
            f"base_url={self._connection.base_url!r}, max_concurrency={self.max_concurrency}, "
            f"max_tasks={self.max_tasks})"
        )

    @property
    def rows(self) -> int:
        """Rows the read will give: the sum of the planned ``lines``."""
        return sum(t.lines for t in self.targets)

    async def _plan(self, refs: list[Any], allow_partial: bool) -> tuple[list[TargetRows], float]:
        planned: dict[int, TargetRows] = {}
        async with self._connection.client() as client:

            async def one(i: int) -> None:
                lines, complete, job_id = await plan_target(
                    client, refs[i], allow_partial=allow_partial
                )
                planned[i] = TargetRows(refs[i], lines, complete, job_id)

            try:
                async with anyio.create_task_group() as tg:
                    for i in range(len(refs)):
                        tg.start_soon(one, i)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            targets = [planned[i] for i in range(len(refs))]
            row_bytes = 0.0
            sample = next((t for t in targets if t.lines > 0), None)
            if sample is not None:
                page = await client.targets.rollout.get_output(
                    sample.target.target_name,
                    repo_name=sample.target.repo_name,
                    limit=min(SAMPLE_ROWS, sample.lines, self.page_size),
                    offset=0,
                )
                if page.output:
                    batch = rows_to_arrow(page.output, 0, self.columns)
                    names = len(sample.target.repo_name) + len(sample.target.target_name)
                    row_bytes = batch.nbytes / batch.num_rows + names + 8  # + two offsets
        return targets, row_bytes

    @property
    def most_tasks(self) -> int:
        """The most read tasks the plan can give, whatever parallelism Ray asks for."""
        pages = sum(-(-t.lines // self.page_size) for t in self.targets)
        return max(1, pages // MIN_TASK_PAGES)

    def estimate_inmemory_data_size(self) -> int:
        """Bytes the rows will take in memory (planned rows x sampled row size)."""
        return int(self.rows * self.row_bytes)

    def get_name(self) -> str:
        """``Bread``: Ray names the read tasks ``ReadBread``."""
        return "Bread"

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> list[ReadTask]:
        """Balanced read tasks over all targets' rows (see :func:`._planner.split`), each
        with a client holding its share of the budget."""
        tasks = split(self.targets, parallelism, self.page_size, MIN_TASK_PAGES)
        if not tasks:
            return []
        running = min(self.max_tasks, len(tasks))
        rate = self.max_requests_per_second
        share = _Connection(
            **{
                **{f: getattr(self._connection, f) for f in _Connection.__dataclass_fields__},
                "max_concurrency": max(1, self.max_concurrency // running),
                "max_requests_per_second": None if rate is None else rate / running,
            }
        )
        read_tasks = []
        for segments in tasks:
            fn = _ReadFn(segments, share, self.task_retries, TRANSIENT_ERRORS)
            meta = BlockMetadata(
                num_rows=fn.rows,
                size_bytes=int(fn.rows * self.row_bytes),
                input_files=None,
                exec_stats=None,
            )
            read_tasks.append(
                ReadTask(fn, meta, schema=self.schema, per_task_row_limit=per_task_row_limit)
            )
        return read_tasks


def _run(fn: Any) -> Any:
    """Run an async function to completion from sync code, even under a running loop (a
    notebook): then in a thread of its own."""
    try:
        import asyncio

        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(fn)
    with anyio.from_thread.start_blocking_portal() as portal:
        return portal.call(fn)
