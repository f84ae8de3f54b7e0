"""The output folder reads as it is (issue 11 item 4): one target's folder and the Hive
dataset of many, in one call each, with the right row count, in pyarrow.dataset, pandas,
polars (``read_parquet`` and ``scan_parquet`` on the folder) and DuckDB; in both column
modes; and an export of the earlier layout (``_manifest.json``) still resumes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from breadasync import BreadClient
from breadasync.emulator import Emulator, EmulatorThread
from breadasync.export import MANIFEST_KEY, batch_to_rows, load_manifest, schema_for
from breadasync.export._manifest import LEGACY_MANIFEST, decode_manifest

ROWS = {"t": 2500, "u": 1200, "v": 7}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Emulator, Path]:
    """One emulator; each column mode exported as one target and as a dataset of three."""
    import asyncio

    root = tmp_path_factory.mktemp("readers")
    emulator = Emulator(speed=0)
    for name, rows in ROWS.items():
        emulator.add_target("r", name, rows=rows, rollout="complete")
    with EmulatorThread(emulator) as server:

        async def run() -> None:
            async with BreadClient(emulator.api_key, server.url) as client:
                for mode in ("json", "typed"):
                    await client.export_rollout(
                        "t",
                        repo_name="r",
                        dest=root / mode / "one",
                        rows_per_part=1000,
                        columns=mode,  # type: ignore[arg-type]
                    )
                    results = await client.export_many(
                        list(ROWS),
                        repo_name="r",
                        dest=root / mode / "many",
                        rows_per_part=1000,
                        columns=mode,  # type: ignore[arg-type]
                    )
                    assert not results.failures()

        asyncio.run(run())
    warm_up(root / "json" / "one")
    return emulator, root


def warm_up(folder: Path) -> None:
    """polars and DuckDB start their thread pools (and the pools' event fds) on first use,
    for the life of the process: a module fixture starts them, so that no test that checks
    for leaked files is the first to use them."""
    for read in READERS.values():
        read(folder)


READERS: dict[str, Callable[[Path], int]] = {
    "pyarrow.dataset": lambda p: ds.dataset(p, format="parquet", partitioning="hive").count_rows(),
    "pyarrow.parquet": lambda p: pq.read_table(p).num_rows,
    "pandas": lambda p: len(pd.read_parquet(p)),
    "polars.read_parquet": lambda p: pl.read_parquet(p).height,
    "polars.scan_parquet": lambda p: int(pl.scan_parquet(p).select(pl.len()).collect().item()),
    "duckdb": lambda p: duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{p}/**/*.parquet', hive_partitioning = true)"
    ).fetchall()[0][0],
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("mode", ["json", "typed"])
def test_each_reader_reads_the_folder_in_one_call(
    exports: tuple[Emulator, Path], mode: str, reader: str
) -> None:
    _, root = exports
    assert READERS[reader](root / mode / "one") == ROWS["t"]
    assert READERS[reader](root / mode / "many") == sum(ROWS.values())


def test_the_dataset_keeps_rows_apart_by_target(exports: tuple[Emulator, Path]) -> None:
    emulator, root = exports
    frame = pl.read_parquet(root / "typed" / "many")
    counts = dict(frame.group_by("target").len().iter_rows())
    assert counts == ROWS
    con = duckdb.connect()
    try:
        got = con.sql(
            f"SELECT target, count(*) FROM read_parquet('{root}/json/many/**/*.parquet', "
            "hive_partitioning = true) GROUP BY target ORDER BY target"
        ).fetchall()
    finally:
        con.close()
    assert dict(got) == ROWS
    table = ds.dataset(root / "typed" / "many", partitioning="hive").to_table(
        filter=ds.field("target") == "u"
    )
    table = table.sort_by("row_offset").drop_columns(["repo", "target"])
    assert batch_to_rows(table) == emulator.trajectories("r", "u")


@pytest.mark.parametrize("mode", ["json", "typed"])
def test_the_manifest_is_a_row_less_part_of_the_same_schema(
    exports: tuple[Emulator, Path], mode: str
) -> None:
    _, root = exports
    folder = root / mode / "one"
    # Every non-empty file is Parquet (what polars needs); the lock is empty between runs.
    assert {p.name for p in folder.iterdir() if p.stat().st_size} == {
        "_manifest.parquet",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    }
    file = pq.ParquetFile(folder / "_manifest.parquet")
    assert file.metadata.num_rows == 0
    assert file.schema_arrow.remove_metadata() == schema_for(mode).remove_metadata()  # type: ignore[arg-type]
    manifest = orjson.loads(file.schema_arrow.metadata[MANIFEST_KEY])
    assert manifest == load_manifest(folder)
    assert manifest["rows"] == ROWS["t"]
    assert manifest["schema"]["columns"] == mode
    assert decode_manifest(b"not parquet") is None


@pytest.fixture
def exporter(make_client: Callable[..., BreadClient]) -> BreadClient:
    return make_client()


@pytest.mark.bread_emulator(speed=0)
async def test_an_export_with_the_earlier_manifest_resumes(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    """A folder an earlier version committed (``_manifest.json``) is recognised: nothing is
    fetched again, and the next commit writes the new manifest in its place."""
    bread_emulator.add_target("r", "t", rows=1500, rollout="complete")
    await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    manifest: dict[str, Any] | None = load_manifest(tmp_path)
    assert manifest is not None
    del manifest["identity"]["columns"]  # the earlier layout did not record it
    (tmp_path / "_manifest.parquet").unlink()
    (tmp_path / LEGACY_MANIFEST).write_bytes(orjson.dumps(manifest))
    again = await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    assert (again.pages, again.parts_written, again.parts_reused) == (0, 0, 2)
    # One part damaged: only it is fetched again, and the commit moves to the new manifest.
    part = tmp_path / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-10])
    fixed = await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    assert (fixed.parts_written, fixed.parts_reused) == (1, 1)
    assert not (tmp_path / LEGACY_MANIFEST).exists()
    assert (load_manifest(tmp_path) or {})["identity"]["columns"] == "json"
    assert pl.read_parquet(tmp_path).height == 1500
