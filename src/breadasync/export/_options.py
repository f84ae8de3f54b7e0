"""What an export is asked and what it tells: :class:`ExportOptions` (with the defaults
and bounds behind them), :class:`ExportResult`, :class:`ExportProgress` and
:class:`ExportResults`. Plain data, shared by the single-target exporter (``_exporter``),
``export_many`` (``_many``) and the batch stream (``_stream``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from breadasync._errors import BreadError, InvalidArgumentError
from breadasync._models import TargetRef
from breadasync._results import Results
from breadasync._validation import MAX_PAGE_SIZE, check_int

from ._schema import ColumnMode, check_columns
from ._store import MANIFEST

Compression = Literal["zstd", "snappy", "gzip", "lz4", "brotli", "none"]
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
WINDOW_ROWS_PER_REQUEST = 8192
"""Rows fetched ahead of the writer by default, per page request in flight
(``concurrency``): 131,072 at the default 16. A page that waits for its retry (a 503's
``Retry-After: 1``, twice in a row now and then) then holds back the writer, not the
fetches beyond it, as long as the window holds a few seconds of the export's throughput,
which grows with ``concurrency`` (measured with 10% flaky answers, benchmarks/goodput.py:
0.79x the fault-free throughput with 4,096 per request, 0.96x with 8,192). At about 0.6 KB
a decoded realistic row, 131,072 rows are some 80 MB."""
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
