"""How many 1000-row output pages per second the emulator serves (one process, one core).

The emulator runs as ``breadasync emulator`` in its own process; this process pulls pages
over loopback with a light aiohttp loop (bytes only, no decoding) so the emulator is what is
measured. Reported: pages/s of wall time, and pages per CPU-second of the emulator process
(the rate one core sustains). Cold = the first fetch of each page (rows generated and
serialised); warm = served from the cache.

    python -m benchmarks.emulator_throughput [--profile simple]
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

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

ROWS = 300_000
PAGE = 1000
CONCURRENCY = 8
WARM_SECONDS = 6.0
WARM_MAX_PAGES = 10_000


async def pull(emu: RemoteEmulator, offsets: list[int], seconds: float | None) -> tuple[int, int]:
    """Fetch pages at ``offsets`` (cycling, until ``seconds`` pass if given)."""
    headers = {"Authorization": f"Bearer {emu.api_key}"}
    url = f"{emu.url}/v1/repo/bench/targets/big/rollout/output"
    pages = 0
    size = 0
    deadline = None if seconds is None else time.monotonic() + seconds
    queue: asyncio.Queue[int] = asyncio.Queue()
    budget = len(offsets) if seconds is None else WARM_MAX_PAGES
    for i in range(budget):
        queue.put_nowait(offsets[i % len(offsets)])

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal pages, size
        while not queue.empty():
            if deadline is not None and time.monotonic() > deadline:
                return
            offset = queue.get_nowait()
            params = {"limit": str(PAGE), "offset": str(offset)}
            async with session.get(url, params=params, headers=headers) as resp:
                assert resp.status == 200, resp.status
                size += len(await resp.read())
            pages += 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return pages, size


async def measure(
    emu: RemoteEmulator, offsets: list[int], seconds: float | None
) -> tuple[float, float, float]:
    cpu0, t0 = emu.cpu_seconds(), time.perf_counter()
    pages, size = await pull(emu, offsets, seconds)
    wall, cpu = time.perf_counter() - t0, emu.cpu_seconds() - cpu0
    return pages / wall, pages / cpu, size / pages


def main() -> None:
    parse_profile()
    scenario = {
        "speed": 0,
        "cache_bytes": 2 * 1024**3,
        "targets": [{"repo": "bench", "target": "big", "rows": ROWS, "rollout": "complete"}],
    }
    offsets = list(range(0, ROWS, PAGE))
    with emulator_process(scenario, Path(".bench-work")) as emu:
        # The first page builds the row pools of the target's shape (once per shape, about
        # 0.3 s): outside the cold pass, which measures pages.
        asyncio.run(pull(emu, offsets[:1], None))
        offsets = offsets[1:]
        cold_wall, cold_cpu, page_bytes = asyncio.run(measure(emu, offsets, None))
        warm_wall, warm_cpu, _ = asyncio.run(measure(emu, offsets, WARM_SECONDS))
    rows = [
        ["cold (generate + serialise)", f"{cold_wall:,.0f}", f"{cold_cpu:,.0f}"],
        ["warm (cached)", f"{warm_wall:,.0f}", f"{warm_cpu:,.0f}"],
    ]
    body = (
        "## Emulator throughput\n\n"
        f"Pages of {PAGE} rows (~{page_bytes / 1e6:.2f} MB each) pulled by {CONCURRENCY} "
        f"concurrent connections from another process, rows of {profile_label()}; "
        f"{machine()}. Target: >= 500 pages per emulator CPU-second.\n\n"
        + table(["pass", "pages/s (wall)", "pages per emulator CPU-second"], rows)
    )
    write_section(section("emulator_throughput"), body)
    print(body)


if __name__ == "__main__":
    main()
