"""A kill loses little (issue 12, item 6): a SIGKILL at any moment of a throttled, faulty
export leaves committed parts that the rerun reuses, and the rows the rerun fetches again
are bounded by ``rows_per_part + window * page_size`` (the part being written and the pages
fetched ahead of it).

The emulator kills the exporting process itself when it receives the N-th page request: a
moment chosen by a counter, not by a clock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from breadasync import BreadClient
from breadasync.emulator import Emulator, EmulatorThread, Faults
from breadasync.export import batch_to_rows

ROWS = 24_000
PAGE = 250
PART = 1000
CONCURRENCY = 4
WINDOW = CONCURRENCY + 8
"""Pages fetched ahead of the writer, given explicitly: the default window is sized for
goodput (``concurrency * WINDOW_ROWS_PER_REQUEST`` rows), and the bound is in its terms."""
BOUND = PART + WINDOW * PAGE


class KillAt(Emulator):
    """An emulator that SIGKILLs ``pid`` when page request number ``kill_at`` arrives."""

    def __init__(self, kill_at: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kill_at = kill_at
        self.pid: int | None = None
        self.pages = 0
        self.killed = False

    async def _get_output(self, request: web.Request) -> web.Response:
        self.pages += 1
        if self.pages >= self.kill_at and self.pid is not None and not self.killed:
            self.killed = True
            os.kill(self.pid, signal.SIGKILL)
        return await super()._get_output(request)


@pytest.fixture(params=[40, 70], ids=["kill-at-page-40", "kill-at-page-70"])
def killer(request: pytest.FixtureRequest) -> Iterator[KillAt]:
    emulator = KillAt(request.param, speed=0)
    with EmulatorThread(emulator):
        yield emulator


async def test_a_kill_loses_at_most_a_part_and_the_window(killer: KillAt, tmp_path: Path) -> None:
    killer.add_target("r", "t", rows=ROWS, rollout="complete")
    # Throttled and flaky, as in issue 12: a page cap, 5xx (503 with Retry-After), dropped
    # bodies, and a rate limit answering 429.
    killer.set_faults(
        Faults(
            errors={500: 0.05, 502: 0.02, 503: 0.03},
            retry_after=0.01,
            retry_after_format="ms",
            drop=0.05,
            page_cap=PAGE,
            rate_limit=300,
            rate_burst=8,
        )
    )
    dest = tmp_path / "out"
    script = textwrap.dedent(f"""
        import asyncio
        from breadasync import BreadClient, RetryPolicy
        async def main():
            retry = RetryPolicy(max_retries=20, initial_backoff=0.002, max_backoff=0.02)
            async with BreadClient(retry=retry) as client:
                await client.export_rollout(
                    "t", repo_name="r", dest={str(dest)!r}, page_size={PAGE},
                    rows_per_part={PART}, concurrency={CONCURRENCY},
                    window={WINDOW})
        asyncio.run(main())
    """)
    env = {**os.environ, "BREAD_API_KEY": killer.api_key, "BREAD_BASE_URL": killer.url or ""}
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    killer.pid = child.pid
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    # Every row the killed run asked for (answered or not).
    asked: set[int] = set()
    for record in killer.stats.records():
        if record.route == "get_rollout_output" and record.offset is not None:
            asked.update(range(record.offset, record.offset + (record.limit or 0)))
    assert len(asked) > BOUND  # the kill came late enough for the bound to say something

    killer.set_faults(None)
    killer.stats.reset()
    async with BreadClient(killer.api_key, killer.url) as client:
        result = await client.export_rollout(
            "t", repo_name="r", dest=dest, page_size=PAGE, rows_per_part=PART
        )
    kept = result.parts_reused * PART
    refetched = {
        offset
        for record in killer.stats.records()
        if record.route == "get_rollout_output" and record.offset is not None
        for offset in range(record.offset, record.offset + (record.limit or 0))
    }
    lost = len(asked & refetched)
    print(f"kill at page {killer.kill_at}: asked {len(asked)}, kept {kept}, lost {lost} rows")
    assert lost <= BOUND
    assert kept >= len(asked) - BOUND > 0
    assert refetched.isdisjoint(range(kept))
    assert result.rows == ROWS
    assert batch_to_rows(pq.read_table(dest)) == killer.trajectories("r", "t")
