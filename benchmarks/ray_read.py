"""Reading rollouts through Ray (``breadasync.ray``) against the local exporter.

The emulator runs in its own process with 20 ms added to every answer, its page cache
warmed first. Each variant runs in a process of its own, one after the other:

(a) the local exporter, ``client.export_rollout`` (the export benchmark's variant);
(b) ``read_rollouts(...).write_parquet(dir)`` on a local Ray cluster of 1 CPU, then 2 CPUs
    (the same budget: 16 requests in flight in all, split between the read tasks).

Reported: rows/s of each, Ray's overhead on one machine (local / Ray at the same cores),
the peak RSS of a Ray worker (sampled every 0.2 s), and how the planner spreads (a) 1,000
targets of 1,000 rows and (b) one target of 1M rows: task count, rows per task, and tasks
and bytes per node over N nodes of 8 CPUs.

    python -m benchmarks.ray_read                 # all of it (needs the ray and bench extras)
    python -m benchmarks.ray_read --rows 100000 --cpus 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

from benchmarks._common import HERE, RemoteEmulator, emulator_process, machine, table
from benchmarks._common import write_section as _write_section
from benchmarks.export import LATENCY, PAGE, WORK, run_child, warm

CONCURRENCY = 16
NODE_CPUS = 8
RAY_PARALLELISM = 200
"""The read parallelism Ray Data picks for a source of this size (its minimum of blocks)."""


def _peak_worker_rss(stop: threading.Event, peak: list[float]) -> None:
    """Sample the RSS of this machine's Ray workers (``ray::`` processes)."""
    while not stop.wait(0.2):
        for proc in psutil.process_iter(["name", "memory_info"]):
            name = proc.info["name"] or ""
            info = proc.info["memory_info"]
            if name.startswith("ray::") and info is not None:
                peak[0] = max(peak[0], info.rss / 2**20)


def _warm(batch: dict[str, Any]) -> dict[str, Any]:
    import breadasync.ray  # noqa: F401 (the import a read task pays once per worker)

    return batch


def child(cpus: int, url: str, key: str, target: str, out: str) -> None:
    """One Ray run: a fresh local cluster of ``cpus`` CPUs, read and write Parquet."""
    import ray

    from breadasync.ray import read_rollouts

    dest = Path(out)
    shutil.rmtree(dest, ignore_errors=True)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=_peak_worker_rss, args=(stop, peak), daemon=True)
    sampler.start()
    try:
        # start the workers and their imports first: a long-lived cluster has them running
        ray.data.range(cpus * 4, override_num_blocks=cpus * 2).map_batches(_warm).materialize()
        started = time.perf_counter()
        dataset = read_rollouts(
            [("bench", target)], api_key=key, base_url=url, max_concurrency=CONCURRENCY
        )
        dataset.write_parquet(str(dest))
        seconds = time.perf_counter() - started
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in dest.glob("*.parquet"))
    finally:
        stop.set()
        sampler.join()
        ray.shutdown()
    shutil.rmtree(dest, ignore_errors=True)
    print(json.dumps({"rows": rows, "seconds": seconds, "worker_peak_rss_mb": peak[0]}))


def run_ray(cpus: int, emu: RemoteEmulator, target: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.ray_read",
            "--child",
            str(cpus),
            emu.url,
            emu.api_key,
            target,
            str(WORK / f"out-ray-{cpus}"),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=HERE.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ray at {cpus} CPU(s) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def spread(row_bytes: float) -> str:
    """How the planner cuts the two shapes of issue 14, and how they land on N nodes."""
    from breadasync import TargetRef
    from breadasync.ray import TargetRows, split
    from breadasync.ray._datasource import MIN_TASK_PAGES

    shapes = {
        "1,000 targets x 1,000 rows": [
            TargetRows(TargetRef("r", f"t{i}"), 1000, True) for i in range(1000)
        ],
        "1 target x 1,000,000 rows": [TargetRows(TargetRef("r", "t"), 1_000_000, True)],
    }
    rows: list[list[str]] = []
    for shape, targets in shapes.items():
        tasks = split(targets, RAY_PARALLELISM, PAGE, MIN_TASK_PAGES)
        sizes = [sum(s.rows for s in task) for task in tasks]
        rows.extend(
            [
                shape,
                f"{len(tasks)}",
                f"{min(sizes):,} / {max(sizes):,}",
                f"{nodes}",
                f"{-(-len(tasks) // nodes)}",
                f"{min(nodes * NODE_CPUS, len(tasks))}",
                f"{max(sizes) * row_bytes / 2**20:,.1f} MB",
            ]
            for nodes in (1, 4, 16)
        )
    return table(
        [
            "shape",
            "tasks",
            "rows per task min / max",
            "nodes",
            "tasks per node",
            "tasks at once",
            "bytes per task",
        ],
        rows,
    )


def row_size(emu: RemoteEmulator, target: str) -> float:
    from breadasync.ray import BreadDatasource

    source = BreadDatasource([("bench", target)], api_key=emu.api_key, base_url=emu.url)
    return source.row_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cpus", default="1,2", help="Ray cluster sizes to run, e.g. 1,2")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    parser.add_argument("--child", nargs=5, metavar=("CPUS", "URL", "KEY", "TARGET", "OUT"))
    args = parser.parse_args()
    if args.child:
        cpus, url, key, target, out = args.child
        child(int(cpus), url, key, target, out)
        return
    scenario = {
        "speed": 0,
        "cache_bytes": 8 * 1024**3,
        "faults": {"latency": LATENCY},
        "targets": [{"repo": "bench", "target": "m1", "rows": args.rows, "rollout": "complete"}],
    }
    cpus = [int(c) for c in args.cpus.split(",") if c]
    with emulator_process(scenario, WORK) as emu:
        asyncio.run(warm(emu, "m1", args.rows))
        local = run_child("breadasync", emu, "m1")
        runs = {n: run_ray(n, emu, "m1") for n in cpus}
        row_bytes = row_size(emu, "m1")
    local_rate = local["rows"] / local["seconds"]
    rows = [
        [
            "local exporter",
            f"{local['rows']:,}",
            f"{local['seconds']:.1f} s",
            f"{local_rate:,.0f}",
            "1.00x",
            f"{local['peak_rss_mb']:,.0f} MB (the process)",
        ]
    ]
    for n, r in runs.items():
        rate = r["rows"] / r["seconds"]
        rows.append(
            [
                f"Ray, {n} CPU{'s' if n > 1 else ''}",
                f"{r['rows']:,}",
                f"{r['seconds']:.1f} s",
                f"{rate:,.0f}",
                f"{local_rate / rate:.2f}x",
                f"{r['worker_peak_rss_mb']:,.0f} MB (a worker)",
            ]
        )
    body = (
        "## Reading through Ray (issue 14)\n\n"
        f"{args.rows:,} rows from the emulator in its own process, {LATENCY * 1000:.0f} ms "
        f"added to every answer, pages of {PAGE}, {CONCURRENCY} requests in flight in all "
        f"(split between Ray's read tasks); {machine()}. Ray's time includes planning and "
        "Parquet writing, not starting the cluster and its workers.\n\n"
        + table(["variant", "rows", "time", "rows/s", "local / this", "peak RSS"], rows)
        + f"\n\nHow the planner spreads the rows (parallelism {RAY_PARALLELISM}, nodes of "
        f"{NODE_CPUS} CPUs, {row_bytes:,.0f} bytes a row in memory as sampled):\n\n"
        + spread(row_bytes)
    )
    if not args.no_write:
        _write_section("ray_read", body)
    print(body)


if __name__ == "__main__":
    main()
