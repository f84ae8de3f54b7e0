"""Export to S3 against export to local disk, side by side in one run (issue 13).

The emulator runs in its own process with 20 ms added to every answer (its page cache warmed
first); moto's S3 server runs in another, on 127.0.0.1, behind a counting middleware. Each
variant exports the same target in a process of its own (so its peak RSS is its own):

(a) ``local``: ``client.export_rollout(dest="<folder>")``;
(b) ``s3``: ``client.export_rollout(dest="s3://bench/<prefix>?endpoint_override=...")``;
(c) ``s3-resume``: the same call again on the committed prefix: what verifying the parts
    (size, footer, SHA-256) reads back and costs.

Reported: rows/s, the S3/local ratio (target >= 0.7), peak RSS (target < 300 MB), CPU
seconds of the exporting process, and requests to the store by kind and per part.

    python -m benchmarks.export_s3                  # 1M rows
    python -m benchmarks.export_s3 --rows 100000    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks._common import HERE, RemoteEmulator, emulator_process, machine, table
from benchmarks._common import write_section as _write_section
from benchmarks.export import LATENCY, PAGE, warm

WORK = Path(".bench-work-s3")
BUCKET = "bench"
ROWS_PER_PART = 100_000
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",  # moto's dummy credentials
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# moto's server in a child process, counting requests by method and kind; GET /__count
# returns the counts so far.
MOTO = textwrap.dedent("""
    import json, logging, sys, threading
    from collections import Counter
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = DomainDispatcherApplication(create_backend_app)
    counts = Counter()
    lock = threading.Lock()
    def counting(environ, start_response):
        if environ["PATH_INFO"] == "/__count":
            body = json.dumps(counts).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        query = environ.get("QUERY_STRING", "")
        kind = ("uploads" if "uploads" in query.split("&") else "uploadId" if "uploadId" in
                query else "copy" if "HTTP_X_AMZ_COPY_SOURCE" in environ else "list" if
                "list-type" in query else "")
        with lock:
            counts[f"{environ['REQUEST_METHOD']} {kind}".strip()] += 1
        return app(environ, start_response)
    server = make_server("127.0.0.1", 0, counting, threaded=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()
""")


@contextmanager
def moto_process() -> Iterator[str]:
    """moto's S3 server in a child process; yields its ``host:port``."""
    proc = subprocess.Popen([sys.executable, "-c", MOTO], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield f"127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


def store_counts(endpoint: str) -> dict[str, int]:
    """Requests the S3 server has seen so far, by method and kind."""
    with urllib.request.urlopen(f"http://{endpoint}/__count", timeout=30) as resp:
        counts: dict[str, int] = json.loads(resp.read())
    return counts


def s3_uri(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


# --- a variant, in a child process ----------------------------------------------------------


async def export(url: str, key: str, target: str, dest: str) -> dict[str, Any]:
    from breadasync import BreadClient

    started, cpu0 = time.perf_counter(), time.process_time()
    async with BreadClient(key, url) as client:
        result = await client.export_rollout(
            target, repo_name="bench", dest=dest, rows_per_part=ROWS_PER_PART
        )
    return {
        "rows": result.rows,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu0,
        "parts_written": result.parts_written,
        "parts_reused": result.parts_reused,
        "bytes": result.bytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child(url: str, key: str, target: str, dest: str) -> None:
    print(json.dumps(asyncio.run(export(url, key, target, dest))), flush=True)


def run_child(name: str, emu: RemoteEmulator, target: str, dest: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.export_s3", "--child"),
            *(emu.url, emu.api_key, target, dest),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=HERE.parent,
        env={**os.environ, **S3_ENV},
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(name, result, flush=True)
    return result


def make_bucket(endpoint: str) -> None:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
        secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir(BUCKET)


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=4, metavar=("URL", "KEY", "TARGET", "DEST"))
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    scenario = {
        "speed": 0,
        "cache_bytes": 4 * 1024**3,
        "faults": {"latency": LATENCY},
        "targets": [{"repo": "bench", "target": "m1", "rows": args.rows, "rollout": "complete"}],
    }
    local = WORK / "local"
    shutil.rmtree(WORK, ignore_errors=True)
    with emulator_process(scenario, WORK) as emu, moto_process() as endpoint:
        make_bucket(endpoint)
        asyncio.run(warm(emu, "m1", args.rows))
        results = {"local": run_child("local", emu, "m1", str(local))}
        counts: dict[str, dict[str, int]] = {}
        for name in ("s3", "s3-resume"):
            before = store_counts(endpoint)
            results[name] = run_child(name, emu, "m1", s3_uri(endpoint, "m1"))
            counts[name] = diff(store_counts(endpoint), before)
    shutil.rmtree(WORK, ignore_errors=True)
    rate = {name: r["rows"] / r["seconds"] for name, r in results.items()}
    parts = max(1, results["s3"]["parts_written"])
    rows = [
        [
            name,
            f"{r['rows']:,}",
            f"{r['seconds']:.1f} s",
            f"{rate[name]:,.0f}",
            f"{r['cpu_seconds']:.1f} s",
            f"{r['peak_rss_mb']:,.0f} MB",
            ", ".join(f"{k} {v}" for k, v in sorted(counts.get(name, {}).items())) or "-",
        ]
        for name, r in results.items()
    ]
    body = (
        "## Export to S3 against local disk (issue 13)\n\n"
        f"{args.rows:,} rows from the emulator in its own process ({LATENCY * 1000:.0f} ms per "
        f"answer, pages of {PAGE}), parts of {ROWS_PER_PART:,} rows, to local disk and to "
        f"moto's S3 server on 127.0.0.1 (another process); {machine()}.\n\n"
        + table(["variant", "rows", "time", "rows/s", "CPU", "peak RSS", "S3 requests"], rows)
        + f"\n\nS3 / local: **{rate['s3'] / rate['local']:.2f}x** (target >= 0.7); "
        f"{sum(counts['s3'].values()) / parts:.1f} requests to the store per part written. "
        f"Resume of the committed prefix read back {results['s3-resume']['bytes']:,} bytes "
        f"(every part, for its SHA-256) in {results['s3-resume']['seconds']:.1f} s."
    )
    print(body)
    if not args.no_write:
        _write_section("export-s3", body)


if __name__ == "__main__":
    main()
