"""Fan-out: start and watch 1,000 rollouts whose jobs take 1-5 s, and memory at 10,000.

Side by side in one run, against the emulator in its own process (real-time clock):
(a) ``client.rollout_many(targets)`` with default settings, and (b) what a user of the
official SDK writes: ``asyncio.gather`` over ``AsyncBread().targets.rollout.run(poll=True)``
under a semaphore of the same concurrency. Reported: wall time against the slowest job,
requests made, polls per target, the delay from each job's completion to its detection
(from the emulator's request log; both processes share the machine's monotonic clock), and
the most requests in flight at the emulator. Then the peak memory of this process while
breadasync watches 10,000 targets.

    python -m benchmarks.fanout
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks._common import (
    RemoteEmulator,
    control,
    emulator_process,
    machine,
    parse_profile,
    profile_label,
    section,
    table,
    write_section,
)

TARGETS = 1000
MIN_SECONDS, MAX_SECONDS = 1.0, 5.0
CONCURRENCY = 64
MEMORY_TARGETS = 10_000
MEMORY_SECONDS = (8.0, 12.0)
LATENCY = 0.02
"""Seconds the emulator adds to each answer, as a real service has, so requests overlap."""


def durations_for(count: int, low: float, high: float, seed: int) -> dict[str, float]:
    """Job durations per target name, uniform in ``low..high`` seconds."""
    rng = random.Random(seed)
    return {f"t{i:05d}": rng.uniform(low, high) for i in range(count)}


async def run_breadasync(emu: RemoteEmulator, names: list[str]) -> dict[str, Any]:
    from breadasync import BreadClient

    async with BreadClient(emu.api_key, emu.url, max_concurrency=CONCURRENCY) as client:
        results = await client.rollout_many(names, repo_name="bench")
    summary = results.summary()
    assert summary.complete == len(names), summary
    return {"polls": [r.polls for r in results]}


async def run_official(emu: RemoteEmulator, names: list[str]) -> dict[str, Any]:
    import aibread

    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with aibread.AsyncBread(api_key=emu.api_key, base_url=emu.url) as client:

        async def one(name: str) -> Any:
            async with semaphore:
                return await client.targets.rollout.run(name, repo_name="bench", poll=True)

        statuses = await asyncio.gather(*(one(name) for name in names))
    assert all(s.status == "complete" for s in statuses)
    return {}


def analyse(log: list[dict[str, Any]], durations: dict[str, float]) -> dict[str, Any]:
    by_target: dict[str, list[dict[str, Any]]] = {}
    for record in log:
        by_target.setdefault(record["target"], []).append(record)
    lags, polls = [], []
    first = min(r["started"] for r in log)
    last_completion = 0.0
    for name, records in by_target.items():
        post = next(r for r in records if r["route"] == "run_rollout" and r["status"] == 200)
        done_at = post["started"] + durations[name]
        seen = max(r["started"] + r["elapsed"] for r in records)
        lags.append(seen - done_at)
        polls.append(sum(r["route"] == "get_rollout" for r in records))
        last_completion = max(last_completion, done_at)
    return {
        "lags": sorted(lags),
        "polls": sorted(polls),
        "requests": len(log),
        "slowest_done": last_completion - first,
    }


def measure(runner: Any, durations: dict[str, float]) -> dict[str, Any]:
    with emulator_process(scenario_for(durations), Path(".bench-work")) as emu:
        started = time.monotonic()
        asyncio.run(runner(emu, list(durations)))
        wall = time.monotonic() - started
        stats = control(emu, "/_emulator/stats")
        result = analyse(control(emu, "/_emulator/requests"), durations)
    result.update(wall=wall, max_in_flight=stats["max_in_flight"])
    return result


def scenario_for(durations: dict[str, float]) -> dict[str, Any]:
    return {
        "speed": 1,
        "faults": {"latency": LATENCY},
        "targets": [
            {"repo": "bench", "target": name, "plan": {"rollout_seconds": s, "stimuli": 20}}
            for name, s in durations.items()
        ],
    }


def memory_at_scale() -> tuple[float, float, int]:
    durations = durations_for(MEMORY_TARGETS, *MEMORY_SECONDS, seed=2)
    process = psutil.Process()
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], process.memory_info().rss)

    with emulator_process(scenario_for(durations), Path(".bench-work")) as emu:
        from breadasync import BreadClient

        async def watch() -> int:
            async with BreadClient(emu.api_key, emu.url, max_concurrency=CONCURRENCY) as c:
                results = await c.rollout_many(list(durations), repo_name="bench")
            return results.summary().complete

        before = process.memory_info().rss
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            complete = asyncio.run(watch())
        finally:
            stop.set()
            sampler.join()
    return before / 2**20, (peak[0] - before) / 2**20, complete


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parse_profile()
    durations = durations_for(TARGETS, MIN_SECONDS, MAX_SECONDS, seed=1)
    runs = {
        "breadasync rollout_many": measure(run_breadasync, durations),
        "official SDK, gather + semaphore": measure(run_official, durations),
    }
    rows = []
    for name, r in runs.items():
        lags, polls = r["lags"], r["polls"]
        rows.append(
            [
                name,
                f"{r['wall']:.1f} s",
                f"{r['slowest_done']:.1f} s",
                f"{r['wall'] - r['slowest_done']:+.1f} s",
                f"{r['requests']:,}",
                f"{statistics.median(polls):.0f} / {max(polls)}",
                f"{statistics.median(lags):.2f} / {percentile(lags, 0.95):.2f} / {max(lags):.2f} s",
                f"{r['max_in_flight']} (limit {CONCURRENCY})",
            ]
        )
    base_mb, delta_mb, complete = memory_at_scale()
    ours, theirs = runs["breadasync rollout_many"], runs["official SDK, gather + semaphore"]
    body = (
        "## Fan-out (issue 4)\n\n"
        f"{TARGETS:,} targets, job durations uniform in {MIN_SECONDS:.0f}-{MAX_SECONDS:.0f} s "
        f"(real time), concurrency {CONCURRENCY}, emulator in its own process adding "
        f"{LATENCY * 1000:.0f} ms to each answer, jobs of {profile_label()} (some report "
        f"only lines, or nothing until done); {machine()}. "
        "Wall is from the first request to the last result; slowest job is when the last "
        "job completed, from the first request; detection lag is the time from a job's "
        "completion to the answer that showed it.\n\n"
        + table(
            [
                "client",
                "wall",
                "slowest job done at",
                "wall - slowest",
                "requests",
                "polls/target median / max",
                "detection lag median / p95 / max",
                "max in flight at the emulator",
            ],
            rows,
        )
        + f"\n\nbreadasync finishes {theirs['wall'] / ours['wall']:.1f}x sooner with "
        f"{ours['requests'] / theirs['requests']:.2f}x the requests. Targets: wall within 2 s "
        "of the slowest job, median polls per target <= 20, in flight <= the client's limit."
        f"\n\nMemory while watching {MEMORY_TARGETS:,} targets (jobs of "
        f"{MEMORY_SECONDS[0]:.0f}-{MEMORY_SECONDS[1]:.0f} s, all {complete:,} complete): "
        f"this process grew by **{delta_mb:.0f} MB** at its peak over {base_mb:.0f} MB "
        "before the call (target: under 100 MB)."
    )
    write_section(section("fanout"), body)
    print(body)


if __name__ == "__main__":
    main()
