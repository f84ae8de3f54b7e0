"""The Parquet exporter against the emulator: exact, fault-tolerant, resumable."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from breadasync import (
    AnswerTooLargeError,
    BreadClient,
    DataIntegrityError,
    DestinationError,
    ExportLockedError,
    ExportMismatchError,
    InvalidArgumentError,
    NotFoundError,
    ProtocolError,
    RedirectError,
    RetryPolicy,
    UnfinishedJobError,
)
from breadasync.emulator import Emulator, EmulatorThread, Faults, TargetPlan
from breadasync.export import SCHEMA, LocalDestination, batch_to_rows, hive_segment, load_manifest
from breadasync.export._store import PartFile
from tests.conftest import wait_until
from tests.test_export_kill import KillAt

frozen = pytest.mark.bread_emulator(speed=0)
ROBUST = RetryPolicy(max_retries=10, initial_backoff=0.002, max_backoff=0.02)


@pytest.fixture
def exporter(make_client: Callable[..., BreadClient]) -> BreadClient:
    return make_client(retry=ROBUST)


def read_rows(folder: Path) -> list[dict[str, object]]:
    table = pq.read_table(folder)
    assert table.column("row_offset").to_pylist() == list(range(table.num_rows))
    return batch_to_rows(table)


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != ".lock"
    }


# --- exactness -----------------------------------------------------------------------------


@frozen
async def test_export_equals_the_service_rows(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=12_345, rollout="complete")
    result = await exporter.export_rollout(
        "t", repo_name="r", dest=tmp_path / "out", rows_per_part=5000
    )
    assert (result.rows, result.lines, result.status, result.partial) == (
        12_345,
        12_345,
        "complete",
        False,
    )
    assert result.parts_written == 3
    assert result.pages == 13
    assert [Path(f).name for f in result.files] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert result.bytes == sum(Path(f).stat().st_size for f in result.files)
    rows = read_rows(tmp_path / "out")
    expected = bread_emulator.trajectories("r", "t")
    assert rows == expected
    # The awkward rows made it: long, non-ASCII, with fields no document names.
    assert any(len(str(row["response"])) > 20_000 for row in rows)
    assert any("🤔" in str(row["response"]) or "🚀" in str(row["response"]) for row in rows)
    assert {"messages", "reward", "finish_reason"} <= {k for row in rows for k in row}
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("model").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.names == SCHEMA.names


@pytest.mark.bread_emulator(speed=0, dialect="spec")
async def test_spec_dialect_and_values_of_unexpected_types(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target(
        "r",
        "t",
        rows=3000,
        rollout="complete",
        overrides={"model_name": "m", "num_traj_per_stimulus": 4},
        plan=TargetPlan(odd_types=True),
    )
    await exporter.export_rollout("t", repo_name="r", dest=tmp_path)
    table = pq.read_table(tmp_path)
    rows = batch_to_rows(table)
    assert rows == bread_emulator.trajectories("r", "t")
    odd = [i for i, row in enumerate(rows) if isinstance(row["tokens"], str)]
    assert odd  # kept, as strings, in ``extra``: not dropped, not coerced
    assert table.column("tokens")[odd[0]].as_py() is None
    assert '"tokens":' in table.column("extra")[odd[0]].as_py()
    assert table.column("trajectory_id").to_pylist()[:5] == [0, 1, 2, 3, 0]


@frozen
async def test_manifest_is_written_last_and_describes_the_parts(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=2500, rollout="complete")
    await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    manifest = load_manifest(tmp_path)
    assert manifest is not None
    assert manifest["lines"] == manifest["rows"] == 2500
    assert manifest["job"]["status"] == "complete"
    assert manifest["source"] == {
        "base_url": bread_emulator.url,
        "repo": "r",
        "target": "t",
        "kind": "rollout",
    }
    assert [p["rows"] for p in manifest["parts"]] == [1000, 1000, 500]
    for part in manifest["parts"]:
        data = (tmp_path / part["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        assert len(data) == part["bytes"]
    assert next(f["name"] for f in manifest["schema"]["fields"]) == "row_offset"
    assert manifest["elapsed_s"] >= 0
    assert not (tmp_path / "_journal.jsonl").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".part-")]
    assert leftovers == []


# --- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        Faults(latency=0.002, jitter=0.003),
        Faults(errors={500: 0.2}),
        Faults(errors={502: 0.2}),
        Faults(errors={503: 0.2}, retry_after=0.005, retry_after_format="seconds"),
        Faults(errors={504: 0.1, 408: 0.1}),
        Faults(rate_limit=400, rate_burst=4),
        Faults(drop=0.2),
        Faults(slow_body=4_000_000),
        Faults(page_cap=250),
        Faults(page_cap=7),
        Faults(corrupt=1.0, corrupt_kind="has-more-lies"),
        Faults(
            errors={500: 0.1, 503: 0.1, 429: 0.05},
            drop=0.1,
            page_cap=250,
            latency=0.001,
            jitter=0.002,
            retry_after=0.002,
            retry_after_format="ms",
        ),
    ],
    ids=[
        "latency",
        "500",
        "502-html",
        "503",
        "504-408",
        "429-rate",
        "drop",
        "slow-body",
        "cap-250",
        "cap-7",
        "has-more-lies",
        "combined",
    ],
)
@frozen
async def test_every_fault_still_ends_exact(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path, faults: Faults
) -> None:
    bread_emulator.add_target("r", "t", rows=4321, rollout="complete")
    bread_emulator.set_faults(faults, repo="r", target="t")
    result = await exporter.export_rollout(
        "t", repo_name="r", dest=tmp_path, concurrency=8, rows_per_part=2000
    )
    assert result.rows == 4321
    assert read_rows(tmp_path) == bread_emulator.trajectories("r", "t")
    if faults.page_cap:
        assert result.pages > 4321 // 1000 + 1  # short pages were followed by the rest


@pytest.mark.parametrize(
    ("faults", "error", "message"),
    [
        (Faults(growing_lines=3), DataIntegrityError, "a complete job must not change"),
        (Faults(corrupt=1.0, corrupt_kind="html"), ProtocolError, "not JSON"),
        (Faults(corrupt=1.0, corrupt_kind="wrong-types"), ProtocolError, "should be"),
        (Faults(redirect_to="http://elsewhere.example"), RedirectError, "redirected"),
        (
            Faults(corrupt=1.0, corrupt_kind="overlong", routes=frozenset({"get_rollout_output"})),
            DataIntegrityError,
            "asked for 1000 rows, got 1001",
        ),
        (
            Faults(corrupt=1.0, corrupt_kind="empty", routes=frozenset({"get_rollout_output"})),
            DataIntegrityError,
            "no rows at offset .* the export would have a gap",
        ),
    ],
)
@frozen
async def test_faults_that_must_stop_the_export(
    exporter: BreadClient,
    bread_emulator: Emulator,
    tmp_path: Path,
    faults: Faults,
    error: type[Exception],
    message: str,
) -> None:
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    bread_emulator.set_faults(faults, repo="r", target="t")
    with pytest.raises(error, match=message):
        await exporter.export_rollout("t", repo_name="r", dest=tmp_path)
    assert not (tmp_path / "_manifest.parquet").exists()
    assert not list(tmp_path.glob(".part-*"))  # no half-written part left behind


# --- resume --------------------------------------------------------------------------------


@frozen
async def test_resume_skips_good_parts_and_refetches_bad_ones(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=5000, rollout="complete")
    await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    before = digests(tmp_path)

    bread_emulator.stats.reset()
    again = await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    assert (again.pages, again.parts_reused, again.parts_written) == (0, 5, 0)
    assert digests(tmp_path) == before  # a whole export is left exactly as it is
    assert bread_emulator.stats.count("get_rollout_output") == 0

    # Truncate one part and flip a byte in another: only those two are fetched again.
    part1 = tmp_path / "part-00001.parquet"
    part1.write_bytes(part1.read_bytes()[:100])
    part3 = tmp_path / "part-00003.parquet"
    data = bytearray(part3.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part3.write_bytes(bytes(data))
    bread_emulator.stats.reset()
    fixed = await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    assert (fixed.parts_reused, fixed.parts_written) == (3, 2)
    offsets = sorted(
        r.offset or 0 for r in bread_emulator.stats.records() if r.route == "get_rollout_output"
    )
    assert offsets == [1000, 3000]
    assert read_rows(tmp_path) == bread_emulator.trajectories("r", "t")


async def test_killed_exporter_resumes_fetching_only_missing_parts(tmp_path: Path) -> None:
    # The emulator kills the exporter when its 22nd page request arrives: a moment chosen
    # by a counter, so a busy machine cannot let the export finish first.
    killer = KillAt(22, speed=0)
    with EmulatorThread(killer):
        killer.add_target("r", "t", rows=40_000, rollout="complete")
        dest = tmp_path / "out"
        script = textwrap.dedent(f"""
            import asyncio
            from breadasync import BreadClient
            async def main():
                async with BreadClient() as client:
                    await client.export_rollout("t", repo_name="r", dest={str(dest)!r},
                                                rows_per_part=4000, concurrency=2, window=10)
            asyncio.run(main())
        """)
        env = {**os.environ, "BREAD_API_KEY": killer.api_key, "BREAD_BASE_URL": killer.url or ""}
        child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
        killer.pid = child.pid
        _, stderr = child.communicate(timeout=300)
        assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
        journal = dest / "_journal.jsonl"
        done_parts = {orjson.loads(line)["name"] for line in journal.read_bytes().splitlines()[1:]}
        # 22 pages asked (of 40); at most the part being written (4 pages) and the window
        # (10 pages) are not committed, so 8 pages or more are.
        assert 2 <= len(done_parts) <= 5

        # What a kill in the middle of an atomic write leaves: cleared by the next run.
        for stale in ("._manifest.parquet.tmp-1a2b", "._journal.jsonl.tmp-3c4d"):
            (dest / stale).write_bytes(b"half")
        killer.stats.reset()
        async with BreadClient(killer.api_key, killer.url) as client:
            result = await client.export_rollout("t", repo_name="r", dest=dest, rows_per_part=4000)
        assert not list(dest.glob(".*.tmp-*"))
        assert result.parts_reused == len(done_parts)
        assert result.parts_written == 10 - len(done_parts)
        fetched_parts = {
            f"part-{(r.offset or 0) // 4000:05d}.parquet"
            for r in killer.stats.records()
            if r.route == "get_rollout_output"
        }
        assert fetched_parts.isdisjoint(done_parts)
        assert result.pages == 4 * (10 - len(done_parts))
        assert read_rows(dest) == killer.trajectories("r", "t")


class Gate(LocalDestination):
    """A destination whose first part waits to be committed until the test says so."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.committing = threading.Event()
        self.release = threading.Event()

    def commit_part(self, part: PartFile) -> None:
        self.committing.set()
        self.release.wait(timeout=60)
        super().commit_part(part)


@frozen
async def test_two_exporters_one_folder(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=20_000, rollout="complete")
    gate = Gate(tmp_path)
    errors: list[BaseException] = []

    async def second() -> None:
        # The first exporter is inside its first commit (it holds the lock) until released.
        await anyio.to_thread.run_sync(gate.committing.wait, 60)
        try:
            await exporter.export_rollout("t", repo_name="r", dest=tmp_path)
        except ExportLockedError as exc:
            errors.append(exc)
        finally:
            gate.release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        first = await exporter.export_rollout("t", repo_name="r", dest=gate, concurrency=4)
    assert first.rows == 20_000
    assert len(errors) == 1
    assert "another export is writing to" in str(errors[0])
    assert read_rows(tmp_path) == bread_emulator.trajectories("r", "t")


# --- unfinished jobs -----------------------------------------------------------------------


@frozen
async def test_unfinished_jobs_are_refused_unless_partial_is_allowed(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "running", plan=TargetPlan(stimuli=1000, rollout_seconds=100))
    await exporter.targets.rollout.run("running", repo_name="r", poll=False)
    bread_emulator.clock.advance(25)
    with pytest.raises(UnfinishedJobError, match=r"is running \(250 lines so far\)"):
        await exporter.export_rollout("running", repo_name="r", dest=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    partial = await exporter.export_rollout(
        "running", repo_name="r", dest=tmp_path / "a", allow_partial=True
    )
    assert (partial.rows, partial.partial, partial.status) == (250, True, "running")
    assert read_rows(tmp_path / "a") == bread_emulator.trajectories("r", "running", 0, 250)
    assert (load_manifest(tmp_path / "a") or {})["partial"] is True

    bread_emulator.add_target("r", "failed", rollout="failed", rows=1000)
    with pytest.raises(UnfinishedJobError, match=r"failed .* after 500 lines"):
        await exporter.export_rollout("failed", repo_name="r", dest=tmp_path / "b")
    kept = await exporter.export_rollout(
        "failed", repo_name="r", dest=tmp_path / "b", allow_partial=True
    )
    assert kept.rows == 500

    bread_emulator.add_target("r", "idle", stim="running")
    with pytest.raises(UnfinishedJobError, match="has not been started"):
        await exporter.export_rollout(
            "idle", repo_name="r", dest=tmp_path / "c", allow_partial=True
        )
    with pytest.raises(NotFoundError):
        await exporter.export_rollout("ghost", repo_name="r", dest=tmp_path / "d")


# --- bad destinations ----------------------------------------------------------------------


@frozen
async def test_a_destination_that_is_a_file(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=10, rollout="complete")
    file = tmp_path / "taken"
    file.write_text("my notes")
    with pytest.raises(DestinationError, match="is a file, not a folder"):
        await exporter.export_rollout("t", repo_name="r", dest=file)
    assert file.read_text() == "my notes"
    with pytest.raises(DestinationError, match="a part of the path is a file"):
        await exporter.export_rollout("t", repo_name="r", dest=file / "inside")


@frozen
async def test_a_folder_holding_another_export_is_left_untouched(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "a", rows=1500, rollout="complete")
    bread_emulator.add_target("r", "b", rows=1500, rollout="complete")
    await exporter.export_rollout("a", repo_name="r", dest=tmp_path)
    before = digests(tmp_path)
    with pytest.raises(ExportMismatchError, match="already holds an export of r/a"):
        await exporter.export_rollout("b", repo_name="r", dest=tmp_path)
    with pytest.raises(ExportMismatchError):
        await exporter.export_rollout("b", repo_name="r", dest=tmp_path, resume=False)
    with pytest.raises(ExportMismatchError, match=r"in parts of 10,000 rows \(job \d+\)"):
        await exporter.export_rollout("a", repo_name="r", dest=tmp_path, rows_per_part=500)
    assert digests(tmp_path) == before

    # The same target with more lines now: refused, unless replacing is asked for.
    bread_emulator.add_target("r", "a", rows=2000, rollout="complete")
    with pytest.raises(ExportMismatchError, match="pass resume=False to replace it"):
        await exporter.export_rollout("a", repo_name="r", dest=tmp_path)
    assert digests(tmp_path) == before
    replaced = await exporter.export_rollout("a", repo_name="r", dest=tmp_path, resume=False)
    assert replaced.rows == 2000
    assert read_rows(tmp_path) == bread_emulator.trajectories("r", "a")

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "part-00000.parquet").write_bytes(b"not ours")
    with pytest.raises(ExportMismatchError, match="something else"):
        await exporter.export_rollout("a", repo_name="r", dest=stray)
    assert (stray / "part-00000.parquet").read_bytes() == b"not ours"


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Drop root's power to write anywhere, as a normal user has none (restored after)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@frozen
async def test_no_permission_to_write(exporter: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=10, rollout="complete")
    # Under the system's temporary folder, which every user may reach (pytest's own
    # folders are private to their owner).
    with tempfile.TemporaryDirectory() as base:
        Path(base).chmod(0o755)
        locked = Path(base) / "read-only"
        locked.mkdir()
        locked.chmod(0o555)
        with unprivileged(), pytest.raises(DestinationError, match="no permission to write there"):
            await exporter.export_rollout("t", repo_name="r", dest=locked / "export")
        with unprivileged(), pytest.raises(DestinationError, match="no permission to write there"):
            await exporter.export_rollout("t", repo_name="r", dest=locked)
        assert list(locked.iterdir()) == []


class FullDisk(LocalDestination):
    """A destination whose disk fills up after a few KB (the storage seam, as a test)."""

    def open_part(self, name: str) -> PartFile:
        part = super().open_part(name)
        real_write = part.write

        def write(data: bytes | memoryview) -> int:
            if part.size + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(data)

        part.write = write  # type: ignore[method-assign]
        return part


@frozen
async def test_a_full_disk_is_a_clear_error_and_damages_nothing(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "good", rows=1200, rollout="complete")
    bread_emulator.add_target("r", "big", rows=5000, rollout="complete")
    await exporter.export_rollout("good", repo_name="r", dest=tmp_path / "good")
    before = digests(tmp_path / "good")
    with pytest.raises(DestinationError, match="the disk is full"):
        await exporter.export_rollout("big", repo_name="r", dest=FullDisk(tmp_path / "big"))
    assert not (tmp_path / "big" / "_manifest.parquet").exists()
    assert not list((tmp_path / "big").glob("*.parquet"))
    assert not list((tmp_path / "big").glob(".part-*"))
    assert digests(tmp_path / "good") == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"page_size": 0}, "page_size must be an int within 1..1000"),
        ({"page_size": 1001}, "page_size"),
        ({"concurrency": 0}, "concurrency"),
        ({"rows_per_part": 0}, "rows_per_part"),
        ({"window": 0}, "window"),
        ({"compression": "xz"}, "unknown compression"),
        ({"repo_name": ""}, "repo_name must not be empty"),
        ({"user_id": "a\nb"}, "user_id .* control character"),
    ],
)
async def test_invalid_options_send_nothing(
    exporter: BreadClient,
    bread_emulator: Emulator,
    tmp_path: Path,
    kwargs: dict[str, object],
    message: str,
) -> None:
    kwargs.setdefault("repo_name", "r")
    with pytest.raises(InvalidArgumentError, match=message):
        await exporter.export_rollout("t", dest=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert bread_emulator.stats.count() == 0


# --- many targets --------------------------------------------------------------------------


@frozen
async def test_export_many_into_one_hive_dataset(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    duckdb = pytest.importorskip("duckdb")
    names = {("r1", "alpha"): 1500, ("r1", "beta"): 700, ("r2", "alpha"): 2100}
    for (repo, target), rows in names.items():
        bread_emulator.add_target(repo, target, rows=rows, rollout="complete")
    results = await exporter.export_many(
        [*list(names), ("r2", "ghost")], dest=tmp_path, rows_per_part=1000, concurrency=4
    )
    assert [r.rows for r in results] == [1500, 700, 2100, 0]
    assert isinstance(results[3].error, NotFoundError)
    assert results.rows == 4300
    assert [r.target.target_name for r in results.failures()] == ["ghost"]

    dataset = ds.dataset(tmp_path, format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 4300
    for (repo, target), rows in names.items():
        part = dataset.to_table(filter=(ds.field("repo") == repo) & (ds.field("target") == target))
        part = part.sort_by("row_offset")
        assert part.num_rows == rows
        assert batch_to_rows(part) == bread_emulator.trajectories(repo, target)

    counts = duckdb.sql(
        f"SELECT repo, target, count(*) AS n, max(row_offset) AS last "
        f"FROM read_parquet('{tmp_path}/*/*/*.parquet', hive_partitioning = true) "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert counts == [
        ("r1", "alpha", 1500, 1499),
        ("r1", "beta", 700, 699),
        ("r2", "alpha", 2100, 2099),
    ]


@frozen
async def test_names_cannot_escape_or_collide(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    awkward = ["../../escape", "a/b", "a%2Fb", "x=y", "...", "é 😀", "z" * 250, "z" * 249 + "y"]
    for name in awkward:
        bread_emulator.add_target("repo/../up", name, rows=3, rollout="complete")
    dest = tmp_path / "dataset"
    results = await exporter.export_many(awkward, repo_name="repo/../up", dest=dest)
    assert all(r.ok for r in results)
    folders = {Path(r.dest) for r in results}
    assert len(folders) == len(awkward)  # no collisions
    for folder in folders:
        assert folder.resolve().is_relative_to(dest.resolve())
        assert folder.parent.parent == dest
    assert {p.name for p in tmp_path.iterdir()} == {"dataset"}  # nothing escaped
    table = ds.dataset(dest, format="parquet", partitioning="hive").to_table()
    decoded = set(table.column("target").to_pylist())
    assert {name for name in awkward if len(name) < 100} <= decoded
    assert hive_segment("target", "a/b") == "target=a%2Fb"


# --- streaming batches ---------------------------------------------------------------------


@frozen
async def test_iter_rollout_batches_streams_in_order(
    exporter: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=3456, rollout="complete")
    bread_emulator.set_faults(Faults(page_cap=400), repo="r", target="t")
    rows: list[dict[str, object]] = []
    offsets: list[int] = []
    async with exporter.iter_rollout_batches("t", repo_name="r", page_size=1000) as batches:
        async for batch in batches:
            offsets.extend(batch.column("row_offset").to_pylist())
            rows.extend(batch_to_rows(batch))
    assert offsets == list(range(3456))
    assert rows == bread_emulator.trajectories("r", "t")


@frozen
async def test_leaving_iter_rollout_batches_early_stops_fetching(
    exporter: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=200_000, rollout="complete")
    before = asyncio.all_tasks()
    async with exporter.iter_rollout_batches("t", repo_name="r", concurrency=4) as batches:
        async for batch in batches:
            assert batch.num_rows == 1000
            break
        assert asyncio.all_tasks() - before  # the fetches run inside the block
    sent = exporter.stats.requests
    assert sent < 20  # a window of pages, not 200
    assert exporter.stats.in_flight == 0
    # Structured: no task of the stream outlives its block, so nothing can follow.
    assert asyncio.all_tasks() - before == set()
    assert exporter.stats.requests == sent


@frozen
async def test_iter_rollout_batches_refuses_an_unfinished_job(
    exporter: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rollout="running", rows=100)
    entered = False
    with pytest.raises(UnfinishedJobError):
        async with exporter.iter_rollout_batches("t", repo_name="r"):
            entered = True
    assert not entered  # refused when entered, before any batch is asked for


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"page_size": 0}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"concurrency": 0}, "concurrency"),
        ({"columns": "wide"}, "columns"),
    ],
)
@frozen
async def test_iter_rollout_batches_refuses_bad_options_before_asking(
    exporter: BreadClient, bread_emulator: Emulator, options: dict[str, Any], text: str
) -> None:
    bread_emulator.add_target("r", "t", rollout="complete", rows=100)
    stream = exporter.iter_rollout_batches("t", repo_name="r", **options)
    with pytest.raises(InvalidArgumentError, match=text):
        async with stream:
            pytest.fail("entered with a bad option")
    assert bread_emulator.stats.count() == 0


@frozen
async def test_pages_over_the_size_limit_are_asked_for_with_fewer_rows(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator, tmp_path: Path
) -> None:
    """Rows of long traces make a page of 1000 bigger than ``max_body_bytes``: the export
    and the stream ask for fewer rows a page (halving) and still give every row; a single
    row over the limit is an ``AnswerTooLargeError``."""
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    served = bread_emulator.trajectories("r", "t")
    limit = len(orjson.dumps(served[:1000])) // 3
    client = make_client(max_body_bytes=limit)
    with pytest.raises(AnswerTooLargeError, match=f"over the limit of {limit:,} bytes"):
        await client.targets.rollout.get_output("t", repo_name="r", limit=1000)
    result = await client.export_rollout("t", repo_name="r", dest=tmp_path, decode_processes=0)
    assert result.rows == 3000
    assert read_rows(tmp_path) == served
    async with client.iter_rollout_batches("t", repo_name="r") as batches:
        assert [row async for batch in batches for row in batch_to_rows(batch)] == served
    # Pages of 1000, then 500, then 250 or fewer: never a request per row.
    assert bread_emulator.stats.count("get_rollout_output") < 3 * 3000 / 125

    tiny = make_client(max_body_bytes=1024)
    with pytest.raises(AnswerTooLargeError, match="over the limit of 1,024 bytes"):
        await tiny.export_rollout("t", repo_name="r", dest=tmp_path / "tiny")


class LongRows(Emulator):
    """Rows with ``extra_values`` list items each, and row 1 with a string of ``big_row``
    bytes: pages over the decoder's count of values, or one page over 64 MiB."""

    def __init__(self, *, extra_values: int = 0, big_row: int = 0) -> None:
        super().__init__(speed=0)
        self.extra_values, self.big_row = extra_values, big_row

    def _rows(self, kind: str, state: Any, offset: int, count: int) -> bytes:
        rows = orjson.loads(super()._rows(kind, state, offset, count))
        for i, row in enumerate(rows, offset):
            if self.extra_values:
                row["scores"] = list(range(self.extra_values))
            if self.big_row and i == 1:
                row["trace"] = "x" * self.big_row
        return orjson.dumps(rows)

    def served(self) -> list[dict[str, Any]]:
        rows = self.trajectories("r", "t")
        return orjson.loads(self._rows("rollout", self._repos["r"]["t"], 0, len(rows)))


@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "child"])
async def test_pages_over_the_decoders_count_of_values_are_asked_for_with_fewer_rows(
    tmp_path: Path, processes: int
) -> None:
    """1000 rows of 600 list items each are 600,000 values, over the decoder's 500,000: the
    export asks for fewer rows a page, in threads and in a child, and gives every row."""
    emulator = LongRows(extra_values=600)
    with EmulatorThread(emulator):
        emulator.add_target("r", "t", rows=2000, rollout="complete")
        async with BreadClient(emulator.api_key, emulator.url) as client:
            result = await client.export_rollout(
                "t", repo_name="r", dest=tmp_path, decode_processes=processes
            )
        assert result.rows == 2000
        assert read_rows(tmp_path) == emulator.served()


async def test_a_page_over_64_mib_is_read_when_the_client_allows_it(tmp_path: Path) -> None:
    """``max_body_bytes`` raised past 64 MiB holds for the decoder too, not only the read."""
    emulator = LongRows(big_row=66 * 1024 * 1024)
    with EmulatorThread(emulator):
        emulator.add_target("r", "t", rows=10, rollout="complete")
        limit = 80 * 1024 * 1024
        async with BreadClient(emulator.api_key, emulator.url, max_body_bytes=limit) as client:
            result = await client.export_rollout(
                "t", repo_name="r", dest=tmp_path, decode_processes=0
            )
        assert result.rows == 10
        assert read_rows(tmp_path) == emulator.served()


def test_no_api_key_in_any_export_file(bread_emulator: Emulator, tmp_path: Path) -> None:
    bread_emulator.add_target("r", "t", rows=2000, rollout="complete")

    async def run() -> None:
        async with BreadClient(bread_emulator.api_key, bread_emulator.url) as client:
            await client.export_many(["t"], repo_name="r", dest=tmp_path)

    anyio.run(run)
    key = bread_emulator.api_key.encode()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    assert all(key not in p.read_bytes() for p in files)


@frozen
async def test_one_target_and_a_dataset_never_share_a_folder(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "a", rows=100, rollout="complete")
    await exporter.export_rollout("a", repo_name="r", dest=tmp_path / "single")
    with pytest.raises(ExportMismatchError, match="holds the export of a single target"):
        await exporter.export_many(["a"], repo_name="r", dest=tmp_path / "single")
    await exporter.export_many(["a"], repo_name="r", dest=tmp_path / "dataset")
    with pytest.raises(ExportMismatchError, match="holds a dataset of several targets"):
        await exporter.export_rollout("a", repo_name="r", dest=tmp_path / "dataset")


@frozen
async def test_a_broken_page_echoing_the_key_is_scrubbed(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=2000, rollout="complete")
    bread_emulator.set_faults(
        Faults(corrupt=1.0, corrupt_kind="echo", routes=frozenset({"get_rollout_output"}))
    )
    with pytest.raises(ProtocolError) as caught:
        await exporter.export_rollout("t", repo_name="r", dest=tmp_path)
    assert bread_emulator.api_key not in str(caught.value) + caught.value.excerpt


@frozen
async def test_a_cancelled_export_lets_go_of_its_folder(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=20_000, rollout="complete")
    bread_emulator.set_faults(Faults(latency=0.05), repo="r", target="t")
    finished = False

    async def export() -> None:
        nonlocal finished
        await exporter.export_rollout("t", repo_name="r", dest=tmp_path, concurrency=2)
        finished = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(export)
        # Cancelled mid-export, by what the emulator has served, not by the clock.
        await wait_until(lambda: bread_emulator.stats.count("get_rollout_output") >= 2)
        tg.cancel_scope.cancel()
    assert not finished  # 18 pages of 50 ms each were still to come
    bread_emulator.set_faults(None, repo="r", target="t")
    result = await exporter.export_rollout("t", repo_name="r", dest=tmp_path)  # not locked
    assert result.rows == 20_000


@frozen
async def test_batches_stay_finished(exporter: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=10, rollout="complete")
    async with exporter.iter_rollout_batches("t", repo_name="r") as batches:
        assert [b.num_rows async for b in batches] == [10]
        with pytest.raises(StopAsyncIteration):
            await batches.__anext__()
    with pytest.raises(StopAsyncIteration):
        await batches.__anext__()
