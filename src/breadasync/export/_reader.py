"""The range reader: rows ``start..stop`` of a rollout's output, fetched in parallel pages
and delivered as Arrow record batches in offset order.

It does not know about files: the Parquet exporter and ``iter_rollout_batches`` both sit on
it, and a distributed reader could hand it one range.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import pyarrow as pa
from anyio.streams.memory import MemoryObjectSendStream

from breadasync._errors import AnswerTooLargeError, DataIntegrityError
from breadasync._models import JobState, Origin, TargetRef, parse_page
from breadasync._validation import target_path

from ._decode import DEFAULT_LIMITS, DecodeLimits, read_page_json
from ._decode_process import DecodeProcesses
from ._schema import ColumnMode, rows_to_batch
from ._threads import run_to_end

log = logging.getLogger("breadasync")

if TYPE_CHECKING:
    from breadasync._api import Api
    from breadasync._transport import Response


@dataclass(frozen=True, slots=True)
class Page:
    """Rows ``offset..offset+limit-1`` to fetch, and the part they belong to."""

    offset: int
    limit: int
    part: int = 0


@dataclass(frozen=True, slots=True)
class _Decoded:
    batch: pa.RecordBatch
    lines: int | None
    status: JobState
    job_id: int | str | None


def decode_page(
    body: bytes,
    method: str,
    path: str,
    status: int,
    offset: int,
    limit: int,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    decoder: DecodeProcesses | None = None,
    columns: ColumnMode = "json",
) -> _Decoded:
    """Decode and convert one page exactly (runs in a worker thread).

    orjson reads the body (with the checks of :func:`read_page_json`, which refuse a
    hostile body before anything else parses it), then :func:`rows_to_batch` converts it;
    in one of ``decoder``'s child processes when given (then ``decoder``'s limits apply),
    else in this one, holding the GIL throughout. ``columns`` is the column mode.

    Raises:
        ProtocolError: the body is not a valid page, or goes past ``limits``.
        DataIntegrityError: the page is not the one asked for, or is longer.
    """
    if decoder is not None:
        batch, lines, state, job_id = decoder.decode(
            body, method, path, status, offset, limit, columns=columns
        )
        return _Decoded(batch, lines, JobState(state), job_id)
    data = read_page_json(
        body, method=method, path=path, status=status, offset=offset, limits=limits
    )
    page = parse_page(data, Origin(method, path, status))
    if page.offset != offset:
        raise DataIntegrityError(
            f"{method} {path}: asked for offset {offset}, the page says offset {page.offset}"
        )
    if len(page.output) > limit:
        raise DataIntegrityError(
            f"{method} {path}: asked for {limit} rows, got {len(page.output)}; the service "
            "sent more rows than a page may hold"
        )
    batch = rows_to_batch(page.output, offset, columns=columns)
    return _Decoded(batch, page.lines, page.status, page.job_id)


@dataclass(frozen=True, slots=True)
class ReadBounds:
    """What the range readers of one export share: how many page requests are in flight,
    how many pages are between their request and the end of their decode, and how many
    decode at once. Build it with :meth:`for_concurrency`, so the three always agree.

    Attributes:
        requests: Bounds page requests in flight; a page waiting to retry does not hold it.
        undecoded: Bounds pages from their request to the end of their decode (twice the
            requests): when decoding is the slower side, pages fetched further ahead would
            only wait as raw bytes (some 0.8 KB a row, more than their batches).
        decoding: Bounds decoding threads (decoding still needs the GIL at times, so more
            threads than cores only contend).
    """

    requests: anyio.CapacityLimiter
    undecoded: anyio.Semaphore
    decoding: anyio.CapacityLimiter

    @classmethod
    def for_concurrency(cls, concurrency: int, decode_threads: int) -> ReadBounds:
        """Bounds for ``concurrency`` page requests in flight and ``decode_threads``
        decoding threads."""
        return cls(
            anyio.CapacityLimiter(concurrency),
            anyio.Semaphore(max(2, 2 * concurrency)),
            anyio.CapacityLimiter(decode_threads),
        )


class RangeReader:
    """Fetches pages of a target's rollout output and delivers their batches in order.

    Args:
        expected_lines: The ``lines`` the export planned for. On a complete job every page
            must report exactly this; on a partial export it may only grow.
        complete: Whether the job was complete when the export began.
        job_id: The ``job_id`` the job's status gave when the export began, or ``None``
            (then the first page that names one sets it). A page naming another job is a
            :class:`~breadasync.DataIntegrityError`: a re-run's rows are never mixed in.
        bounds: Requests, undecoded pages and decoding threads, shared by the targets
            of one export (:class:`ReadBounds`).
        window: Pages fetched ahead of the consumer, at most: memory stays flat. Pages
            beyond one that waits for a retry go on being fetched, up to this bound.
        user_id: The user override, already resolved (``None``: none).
        columns: The column mode of the batches (``"json"`` or ``"typed"``).
        decoder: Child processes to decode pages in (``None``: decode in this process's
            threads).
    """

    def __init__(
        self,
        client: Api,
        target: TargetRef,
        *,
        expected_lines: int,
        complete: bool,
        bounds: ReadBounds,
        window: int,
        user_id: str | None,
        job_id: int | str | None = None,
        columns: ColumnMode = "json",
        decoder: DecodeProcesses | None = None,
    ) -> None:
        self._client = client
        self._expected = expected_lines
        self._complete = complete
        self._job_id = job_id
        self._bounds = bounds
        self._window = window
        self._user_id = user_id
        self._columns = columns
        # The decoder accepts what the client reads (its max_body_bytes, not the default).
        limits = DecodeLimits(max_body_bytes=client.max_body_bytes)
        self._decode = functools.partial(
            decode_page, columns=columns, decoder=decoder, limits=limits
        )
        self._path = target_path(target.repo_name, target.target_name, "rollout", "output")
        self._cap: int | None = None
        self.requests = 0
        """Page requests made (a short page costs one more)."""

    async def run(
        self,
        pages: Iterable[Page],
        send: MemoryObjectSendStream[tuple[Page, list[pa.RecordBatch]]],
    ) -> None:
        """Fetch ``pages`` and send ``(page, batches)`` in their order; closes ``send``.

        ``pages`` is consumed lazily, and only a window of them is ever in flight or held,
        so a job of any size costs the same memory.
        """
        window = anyio.Semaphore(self._window)
        queued_send, queued = anyio.create_memory_object_stream[_InFlight](self._window)
        async with send, anyio.create_task_group() as tg:

            async def fetch(item: _InFlight) -> None:
                item.batches = await self._fetch(item.page)
                item.done.set()

            async def deliver() -> None:
                async with queued:
                    async for item in queued:
                        await item.done.wait()
                        try:
                            await send.send((item.page, item.batches))
                        except anyio.BrokenResourceError:
                            # The consumer left (it failed or was cancelled, and says so
                            # itself): stop fetching, without an error of our own that
                            # would turn its cancellation into an exception group.
                            tg.cancel_scope.cancel()
                            return
                        window.release()

            tg.start_soon(deliver)
            async with queued_send:
                for page in pages:
                    await window.acquire()
                    item = _InFlight(page)
                    tg.start_soon(fetch, item)
                    try:
                        await queued_send.send(item)
                    except anyio.BrokenResourceError:
                        return  # deliver left: the consumer is gone

    async def _fetch(self, page: Page) -> list[pa.RecordBatch]:
        """The rows of one page, following a short page with a fetch of the rest."""
        batches = []
        offset, end = page.offset, page.offset + page.limit
        while offset < end:
            limit = end - offset if self._cap is None else min(end - offset, self._cap)
            async with self._bounds.undecoded:
                # The limiter bounds attempts in flight, not pages waiting for a retry: a
                # page held back by a backoff or a Retry-After leaves its slot to the pages
                # beyond it. A body that is not JSON is fetched again, like a 5xx.
                try:
                    decoded, path = await self._client.get_decoded(
                        self._path,
                        {"limit": limit, "offset": offset},
                        self._user_id,
                        functools.partial(self._decode_body, offset, limit),
                        self._bounds.requests,
                    )
                except AnswerTooLargeError as exc:
                    # Rows of long traces make pages of 1000 rows bigger than the size limit
                    # (or its count of values): fewer rows a page from here on (this
                    # target's), the rest as short pages. An error page that large is no page.
                    self.requests += 1
                    if limit == 1 or not 200 <= exc.status < 300:
                        raise
                    # A page asked for before an earlier halving may fail later: never grow.
                    self._cap = min(self._cap or limit, limit // 2)
                    log.info("GET %s: over the size limit; %d rows a page", self._path, self._cap)
                    continue
                self.requests += 1
            self._check(decoded, path, offset)
            batches.append(decoded.batch)
            offset += decoded.batch.num_rows
        return batches

    async def _decode_body(
        self, offset: int, limit: int, response: Response
    ) -> tuple[_Decoded, str]:
        # Run to its end even when cancelled: no decode outlives the export.
        decoded = await run_to_end(
            self._decode,
            response.body,
            response.method,
            response.path,
            response.status,
            offset,
            limit,
            limiter=self._bounds.decoding,
        )
        return decoded, response.path

    def _check(self, decoded: _Decoded, path: str, offset: int) -> None:
        found = decoded.job_id
        if found is not None:
            if self._job_id is None:
                self._job_id = found
            elif str(found) != str(self._job_id):  # one endpoint may quote it, one not
                raise DataIntegrityError(
                    f"GET {path}: this page is of job {found}, but the read began with job "
                    f"{self._job_id}: the job was re-run, or the page came from another "
                    "job; rows of two jobs must not be mixed, so read it again for the new "
                    "job's rows"
                )
        # ``lines`` is optional on a page (the spec): the status's count, read when the
        # export began and again at its end, is the one the export holds to.
        lines = decoded.lines
        changed = lines is not None and lines != self._expected
        if self._complete and (decoded.status is not JobState.COMPLETE or changed):
            said = f"{lines:,} lines" if lines is not None else "no line count"
            raise DataIntegrityError(
                f"GET {path}: the job was complete with {self._expected:,} lines when the "
                f"export began, but this page says {decoded.status} with {said}; a complete "
                "job must not change"
            )
        if lines is not None and lines < self._expected:
            raise DataIntegrityError(
                f"GET {path}: the job's lines fell from {self._expected:,} to {lines:,}"
            )
        if decoded.batch.num_rows == 0:
            raise DataIntegrityError(
                f"GET {path}: no rows at offset {offset:,} although the job has "
                f"{max(lines or 0, self._expected):,} lines; the export would have a gap"
            )


class _InFlight:
    """A page being fetched: the consumer waits on ``done`` in page order."""

    __slots__ = ("batches", "done", "page")

    def __init__(self, page: Page) -> None:
        self.page = page
        self.done = anyio.Event()
        self.batches: list[pa.RecordBatch] = []
