"""Page decoding, in CPU time (not wall time): what one realistic 1000-row page costs on each
decode path, how much of that holds this process's GIL, and what hostile bodies cost.

Paths:
- ceiling: orjson, then :func:`rows_to_batch`, then zstd Parquet, one thread (the issue's
  in-process reference; the Parquet step is measured on its own too);
- in-process: :func:`decode_page` (orjson, the hostile-body checks, ``rows_to_batch``); all
  of it holds the GIL;
- child process: ``decode_page(decoder=DecodeProcesses(1))``; this process's CPU (the part
  that competes for its GIL) and the child's are measured apart;
- for comparison, Arrow's JSON reader on the same page (it releases the GIL, but cannot
  tell an explicit ``null`` from an absent key, so it cannot be exact alone).

Printed only: the lead runs it on a quiet machine.

    python -m benchmarks.decode [--pages 40]
"""

from __future__ import annotations

import argparse
import io
import resource
import time

import orjson
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from tests.decode_pages import realistic_page

from benchmarks._common import per_page_ms
from breadasync import ProtocolError
from breadasync.export import DecodeProcesses, rows_to_batch
from breadasync.export._reader import decode_page

PATH = "/v1/repo/r/targets/t/rollout/output"


def parquet(batch: pa.RecordBatch) -> None:
    pq.write_table(pa.Table.from_batches([batch]), io.BytesIO(), compression="zstd")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pages = [realistic_page(i * 1000) for i in range(args.pages)]
    kb = sum(map(len, pages)) / len(pages) / 1024
    rounds = args.rounds
    batches = [rows_to_batch(orjson.loads(p)["output"], i * 1000) for i, p in enumerate(pages)]

    results = {
        "orjson.loads alone": per_page_ms(pages, lambda i, p: orjson.loads(p), rounds),
        "zstd Parquet of the batch alone": per_page_ms(
            pages, lambda i, p: parquet(batches[i]), rounds
        ),
        "ceiling (orjson + rows_to_batch + zstd Parquet)": per_page_ms(
            pages,
            lambda i, p: parquet(rows_to_batch(orjson.loads(p)["output"], i * 1000)),
            rounds,
        ),
        "decode_page in-process (all GIL-held)": per_page_ms(
            pages, lambda i, p: decode_page(p, "GET", PATH, 200, i * 1000, 1000), rounds
        ),
        "Arrow read_json, inferred (GIL released)": per_page_ms(
            pages,
            lambda i, p: pa_json.read_json(
                pa.BufferReader(p),
                read_options=pa_json.ReadOptions(use_threads=False, block_size=len(p) + 64),
            ),
            rounds,
        ),
    }

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    # A child's CPU is known once it has ended: one child for a single page (its start-up),
    # then one for every page; the difference is the pages' own cost.
    before = children_cpu()
    with DecodeProcesses(1) as processes:
        decode_page(pages[0], "GET", PATH, 200, 0, 1000, decoder=processes)
    startup = children_cpu() - before
    before = children_cpu()
    with DecodeProcesses(1) as processes:
        decode_page(pages[0], "GET", PATH, 200, 0, 1000, decoder=processes)
        results["decode_page in a child: this process (GIL)"] = per_page_ms(
            pages,
            lambda i, p: decode_page(p, "GET", PATH, 200, i * 1000, 1000, decoder=processes),
            rounds,
        )
    spent = children_cpu() - before - startup
    results["decode_page in a child: the child"] = spent * 1000 / (len(pages) * rounds)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{len(pages)} realistic pages of 1000 rows, {kb:,.0f} KB each on average")
    for name, ms in results.items():
        print(f"  {name:<50} {ms:6.2f} ms CPU/page")
    print(f"  child process: start-up {startup * 1000:,.0f} ms CPU, peak RSS {rss:,.0f} MB")

    hostile = {
        "100,000-deep array": b"[" * 100_000 + b"]" * 100_000,
        "100,000-deep object in a row": b'{"output":[{"x":'
        + b'{"a":' * 100_000
        + b"1"
        + b"}" * 100_000
        + b"}]}",
        "a million keys": b'{"output":[{"x":{'
        + b",".join(b'"k%d":1' % i for i in range(10**6))
        + b"}}]}",
        "NaN": b'{"output":[{"x":NaN}]}',
        "duplicate keys": b'{"output":[{"x":1,"x":2}]}',
    }
    print("hostile bodies, refused with ProtocolError:")
    for name, body in hostile.items():
        started = time.process_time()
        try:
            decode_page(body, "GET", PATH, 200, 0, 1000)
        except ProtocolError:
            pass
        else:
            raise AssertionError(f"{name} was accepted")
        ms = (time.process_time() - started) * 1000
        print(f"  {name:<50} {ms:8.1f} ms CPU ({len(body) / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
