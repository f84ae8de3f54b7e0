"""One flaky page must not stall an export (issue 12, item 1): while a page waits out its
``Retry-After``, the pages beyond it go on being fetched, within the window.

The emulator answers the first request for one page with 503 and ``Retry-After: 1``, then
holds that page's retry until it has seen the pages beyond it: an event, not a clock, so a
busy machine changes how long it takes, not what is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
from aiohttp import web

from breadasync import BreadClient
from breadasync.emulator import Emulator, EmulatorThread
from breadasync.export import batch_to_rows
from breadasync.export._exporter import WINDOW_ROWS_PER_REQUEST, ExportOptions

STALLED = 3000
PAGES = 60
BEYOND = 40
"""Pages beyond the stalled one that must be asked for while it waits: more than the old
default window of ``concurrency + 8`` = 24 pages held."""
HOLD = 60.0
"""The most the emulator holds the retry: only reached if the exporter stopped fetching."""


class StallOne(Emulator):
    """Refuses the first request for the page at ``STALLED`` with 503 + Retry-After: 1,
    and holds its retry until ``BEYOND`` pages beyond it were asked for."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refused = False
        self.beyond: set[int] = set()
        self.asked_while_stalled = 0
        self.enough: asyncio.Event | None = None

    async def _get_output(self, request: web.Request) -> web.Response:
        offset = int(request.rel_url.query.get("offset", "0"))
        if self.enough is None:
            self.enough = asyncio.Event()
        if offset == STALLED and not self.refused:
            self.refused = True
            return web.json_response(
                {"error": {"message": "a flaky instance"}},
                status=503,
                headers={"Retry-After": "1"},
            )
        if self.refused and offset > STALLED and not self.enough.is_set():
            self.beyond.add(offset)
            if len(self.beyond) >= BEYOND:
                self.enough.set()
        if offset == STALLED:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.enough.wait(), HOLD)
            self.asked_while_stalled = len(self.beyond)
        return await super()._get_output(request)


def test_the_default_window_holds_rows_per_request_in_flight() -> None:
    assert ExportOptions().pages_ahead == -(-16 * WINDOW_ROWS_PER_REQUEST // 1000) == 132
    assert ExportOptions(concurrency=2).pages_ahead == 17  # 16,384 rows, rounded up
    assert ExportOptions(page_size=250).pages_ahead == 525  # 131,072 rows, rounded up
    assert ExportOptions(window=5).pages_ahead == 5


async def test_pages_beyond_a_stalled_page_are_fetched_while_it_waits(tmp_path: Path) -> None:
    emulator = StallOne(speed=0, profile="simple")
    with EmulatorThread(emulator):
        emulator.add_target("r", "t", rows=PAGES * 1000, rollout="complete")
        async with BreadClient(emulator.api_key, emulator.url) as client:
            result = await client.export_rollout("t", repo_name="r", dest=tmp_path / "out")
        assert emulator.refused
        assert emulator.asked_while_stalled >= BEYOND
        assert result.rows == PAGES * 1000
        table = ds.dataset(tmp_path / "out", format="parquet").to_table().sort_by("row_offset")
        assert batch_to_rows(table) == emulator.trajectories("r", "t")
