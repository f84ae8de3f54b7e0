"""The column modes' cost, in CPU time (not wall time): what one realistic 1000-row page of
the emulator costs in ``columns="json"`` and ``columns="typed"``, step by step, and the
Parquet bytes each writes.

Steps per page: :func:`rows_to_batch` alone (the part the modes change), :func:`decode_page`
(orjson, the hostile-body checks, ``rows_to_batch``), and the zstd Parquet of the batch.
Pages are the emulator's realistic profile (docs dialect), from row 1,000 on so that the rare
``tool_calls`` are among them. Printed only: the lead runs it on a quiet machine.

    python -m benchmarks.columns [--pages 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks._common import per_page_ms
from breadasync.emulator._data import RowShape, page_bytes, target_seed
from breadasync.export import ColumnMode, rows_to_batch
from breadasync.export._reader import decode_page

PATH = "/v1/repo/r/targets/t/rollout/output"
MODES: tuple[ColumnMode, ...] = ("json", "typed")


def parquet_bytes(batch: pa.RecordBatch) -> int:
    """The zstd Parquet size of ``batch``."""
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_batches([batch]), sink, compression="zstd")
    return sink.tell()


def realistic_pages(count: int) -> list[bytes]:
    """``count`` output pages of 1000 rows from row 1,000 on, as the emulator serves them."""
    shape = RowShape(model="Qwen/Qwen3-32B")
    seed = target_seed("r", "t")
    pages = []
    for i in range(count):
        start = 1000 * (i + 1)
        rows = page_bytes(seed, start, start + 1000, shape, "docs")
        head = b'{"status":"complete","lines":10000000,"offset":%d,"limit":1000,' % start
        pages.append(head + b'"has_more":true,"output":' + rows + b"}")
    return pages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pages = realistic_pages(args.pages)
    rounds = args.rounds
    kb = sum(map(len, pages)) / len(pages) / 1024
    rows = [orjson.loads(p)["output"] for p in pages]
    print(f"{len(pages)} realistic emulator pages of 1000 rows, {kb:,.0f} KB each on average")
    for mode in MODES:
        measure(mode, pages, rows, rounds)


def measure(
    mode: ColumnMode, pages: list[bytes], rows: list[list[dict[str, Any]]], rounds: int
) -> None:
    """Print one mode's costs."""
    batches = [rows_to_batch(r, 0, columns=mode) for r in rows]
    convert = per_page_ms(pages, lambda i, p: rows_to_batch(rows[i], 0, columns=mode), rounds)
    decode = per_page_ms(
        pages,
        lambda i, p: decode_page(p, "GET", PATH, 200, 1000 * (i + 1), 1000, columns=mode),
        rounds,
    )
    write = per_page_ms(pages, lambda i, p: parquet_bytes(batches[i]), rounds)
    size = sum(parquet_bytes(b) for b in batches) / len(batches) / 1024
    clean = sum(b.column("extra").null_count for b in batches) / len(batches)
    print(
        f"  columns={mode!r:<8} rows_to_batch {convert:6.2f}  decode_page {decode:6.2f}  "
        f"zstd Parquet {write:6.2f} ms CPU/page; {size:,.0f} KB/page; "
        f"rows with no extra {clean:,.0f}/1000"
    )


if __name__ == "__main__":
    main()
