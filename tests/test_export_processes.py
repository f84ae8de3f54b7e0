"""Decoding in child processes (``decode_processes``): the same rows as in-process decoding,
every child stopped when the export ends, and small exports left to threads."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from breadasync import BreadClient, InvalidArgumentError
from breadasync.emulator import Emulator, EmulatorThread
from breadasync.export import batch_to_rows
from breadasync.export._decode_process import DecodeProcesses
from breadasync.export._exporter import PROCESS_MIN_PAGES, ExportOptions
from breadasync.export._reader import decode_page


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def rows(folder: Path) -> list[dict[str, object]]:
    table = ds.dataset(folder, format="parquet").to_table().sort_by("row_offset")
    return batch_to_rows(table)


async def test_child_decoding_gives_the_rows_served_and_leaves_no_child(tmp_path: Path) -> None:
    emulator = Emulator(speed=0)  # the realistic profile: nulls, nested fields, escapes
    with EmulatorThread(emulator):
        lines = PROCESS_MIN_PAGES * 1000 + 500
        emulator.add_target("r", "t", rows=lines, rollout="complete")
        emulator.add_target("r", "u", rows=lines, rollout="complete")
        before = children()
        during: list[int] = []
        async with BreadClient(emulator.api_key, emulator.url) as client:
            one = await client.export_rollout(
                "t",
                repo_name="r",
                dest=tmp_path / "one",
                decode_processes=2,
                on_progress=lambda _: during.append(len(children() - before)),
            )
            many = await client.export_many(
                ["t", "u"], repo_name="r", dest=tmp_path / "many", decode_processes=1
            )
        assert max(during) >= 1  # the pages were decoded in children
        assert children() == before  # every decoding child was stopped
        assert one.rows == lines
        assert many.rows == 2 * lines
        served = emulator.trajectories("r", "t")
        assert rows(tmp_path / "one") == served
        assert rows(tmp_path / "many" / "repo=r" / "target=t") == served
        assert rows(tmp_path / "many" / "repo=r" / "target=u") == emulator.trajectories("r", "u")


def test_decode_processes_is_checked() -> None:
    assert ExportOptions(decode_processes=3).decode_processes == 3
    with pytest.raises(InvalidArgumentError):
        ExportOptions(decode_processes=-1)


@pytest.mark.parametrize("job_id", [7, "run-7", 2**70, None])
def test_a_child_reports_the_job_a_page_names(job_id: int | str | None) -> None:
    """The page's job id crosses from the child as it was sent (the reader checks it)."""
    envelope = {"status": "complete", "lines": 2, "offset": 0, "limit": 2, "has_more": False}
    if job_id is not None:
        envelope["job_id"] = job_id
    body = json.dumps({**envelope, "output": [{"a": 1}, {"a": None}]}).encode()
    args = (body, "GET", "/p", 200, 0, 2)
    with DecodeProcesses(1) as decoder:
        child = decode_page(*args, decoder=decoder)
    here = decode_page(*args)
    assert (child.job_id, child.lines, child.status) == (job_id, 2, "complete")
    assert (here.job_id, here.lines, here.status) == (child.job_id, child.lines, child.status)
    assert batch_to_rows(pa.Table.from_batches([child.batch])) == [{"a": 1}, {"a": None}]
