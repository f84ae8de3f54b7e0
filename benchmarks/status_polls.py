"""Status-poll throughput of one client at concurrency 64: breadasync vs the official SDK.

Both clients poll ``GET .../rollout`` of a complete target on an emulator running in its
own process, in the same run, alternating rounds (A B A B ...) so that drift of this noisy
machine hits both alike. Reported per client: requests/s (the median round), and this
process's CPU time per request (what one core can drive). The emulator's own CPU is shown
too: if it nears one core, it is the ceiling, not the clients.

    python -m benchmarks.status_polls
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks._common import (
    RemoteEmulator,
    emulator_process,
    machine,
    parse_profile,
    profile_label,
    section,
    table,
    write_section,
)

CONCURRENCY = 64
REQUESTS_PER_ROUND = 6000
ROUNDS = 3
WARMUP = 500


async def drive(call: Callable[[], Awaitable[object]], total: int) -> None:
    """``total`` calls, at most CONCURRENCY at once."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def round_breadasync(emu: RemoteEmulator, total: int) -> tuple[float, float]:
    from breadasync import BreadClient

    async with BreadClient(emu.api_key, emu.url, max_concurrency=CONCURRENCY) as client:

        async def call() -> object:
            return await client.targets.rollout.get("t", repo_name="bench")

        await drive(call, WARMUP)
        return await timed(call, total)


async def round_official(emu: RemoteEmulator, total: int) -> tuple[float, float]:
    import aibread

    async with aibread.AsyncBread(api_key=emu.api_key, base_url=emu.url) as client:

        async def call() -> object:
            return await client.targets.rollout.get("t", repo_name="bench")

        await drive(call, WARMUP)
        return await timed(call, total)


async def timed(call: Callable[[], Awaitable[object]], total: int) -> tuple[float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await drive(call, total)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return total / wall, cpu / total


def main() -> None:
    parse_profile()
    scenario = {
        "speed": 0,
        "targets": [{"repo": "bench", "target": "t", "rows": 1000, "rollout": "complete"}],
    }
    runs: dict[str, list[tuple[float, float]]] = {"breadasync": [], "aibread (official)": []}
    emulator_cpu: dict[str, float] = {"breadasync": 0.0, "aibread (official)": 0.0}
    with emulator_process(scenario, Path(".bench-work")) as emu:
        for _ in range(ROUNDS):
            for name, runner in (
                ("breadasync", round_breadasync),
                ("aibread (official)", round_official),
            ):
                cpu0 = emu.cpu_seconds()
                runs[name].append(asyncio.run(runner(emu, REQUESTS_PER_ROUND)))
                emulator_cpu[name] += emu.cpu_seconds() - cpu0
    rows = []
    medians = {}
    for name, results in runs.items():
        rate = statistics.median(r for r, _ in results)
        cpu = statistics.median(c for _, c in results)
        medians[name] = rate
        emu_per_req = emulator_cpu[name] / ((REQUESTS_PER_ROUND + WARMUP) * ROUNDS)
        rows.append(
            [
                name,
                f"{rate:,.0f}",
                f"{cpu * 1e6:,.0f} µs",
                f"{1 / cpu:,.0f}",
                f"{emu_per_req * 1e6:,.0f} µs",
            ]
        )
    ratio = medians["breadasync"] / medians["aibread (official)"]
    body = (
        "## Status-poll throughput (issue 3)\n\n"
        f"`GET .../rollout` at concurrency {CONCURRENCY}, {ROUNDS} alternating rounds of "
        f"{REQUESTS_PER_ROUND:,} requests after {WARMUP} of warm-up, against the emulator in "
        f"its own process ({profile_label()}); {machine()}. Medians of the rounds.\n\n"
        + table(
            [
                "client",
                "requests/s",
                "client CPU per request",
                "requests per client CPU-second",
                "emulator CPU per request",
            ],
            rows,
        )
        + f"\n\n**breadasync / official SDK: {ratio:.2f}x** requests/s (target: >= 2x)."
    )
    write_section(section("status_polls"), body)
    print(body)


if __name__ == "__main__":
    main()
