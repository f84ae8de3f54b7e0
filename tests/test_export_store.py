"""The destination seam: what ``dest=`` may be, and damaged bookkeeping in a local folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from breadasync import BreadClient, ExportMismatchError, InvalidArgumentError, RetryPolicy
from breadasync.cli import main as cli_main
from breadasync.emulator import Emulator
from breadasync.export import (
    Destination,
    FsDestination,
    LocalDestination,
    batch_to_rows,
    resolve_destination,
)

frozen = pytest.mark.bread_emulator(speed=0)


@pytest.fixture
def exporter(make_client: Callable[..., BreadClient]) -> BreadClient:
    return make_client(retry=RetryPolicy(max_retries=10, initial_backoff=0.002, max_backoff=0.02))


# --- resolving dest ------------------------------------------------------------------------


def test_local_forms_resolve_to_a_local_folder(tmp_path: Path) -> None:
    for given in (
        str(tmp_path / "a"),
        tmp_path / "a",
        f"file://{tmp_path / 'a'}",
        (pafs.LocalFileSystem(), str(tmp_path / "a")),
    ):
        store = resolve_destination(given)
        assert isinstance(store, LocalDestination), given
        assert store.display == str(tmp_path / "a")
    assert resolve_destination("relative/out").display == "relative/out"
    same = LocalDestination(tmp_path)
    assert resolve_destination(same) is same


def test_both_implementations_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(LocalDestination(tmp_path), Destination)
    memory = FsDestination(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "x/y")
    assert isinstance(memory, Destination)
    assert memory.child("repo=r", "target=t").display == "subtree://x/y/repo=r/target=t"
    assert memory.uri("part-00000.parquet") == "subtree://x/y/part-00000.parquet"


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("ftp://host/x", "unknown destination scheme 'ftp://'"),
        ("S3:/bucket/x", "neither a URI"),
        ("s3:bucket", "neither a URI"),
        (("not a filesystem", "x"), "pyarrow.fs.FileSystem or an fsspec filesystem"),
        ((pafs.LocalFileSystem(), 3), "pair must be"),
        (42, "dest must be a path, a URI"),
        ("", "dest must not be empty"),
        ("  ", "dest must not be empty"),
        ("out\x00put", "NUL character"),
        (Path("out\x00put"), "NUL character"),
    ],
)
def test_bad_forms_are_one_line_errors(dest: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        resolve_destination(dest)
    assert "\n" not in str(caught.value)


def test_a_tilde_is_the_home_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for dest in ("~/exports/x", Path("~/exports/x")):
        found = resolve_destination(dest)
        assert isinstance(found, LocalDestination)
        assert found.path == tmp_path / "exports" / "x"


@frozen
async def test_a_file_uri_and_a_filesystem_pair_export_to_disk(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=1200, rollout="complete")
    one = await exporter.export_rollout(
        "t", repo_name="r", dest=f"file://{tmp_path / 'u'}", rows_per_part=1000
    )
    assert one.dest == str(tmp_path / "u")
    assert one.files == [str(tmp_path / "u" / f"part-0000{i}.parquet") for i in range(2)]
    assert batch_to_rows(pq.read_table(tmp_path / "u")) == bread_emulator.trajectories("r", "t")
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    two = await exporter.export_rollout("t", repo_name="r", dest=(sub, "v"), rows_per_part=1000)
    assert two.dest == "subtree://v"
    assert batch_to_rows(pq.read_table(tmp_path / "v")) == bread_emulator.trajectories("r", "t")
    assert not list((tmp_path / "v").glob(".*"))  # no temporary file, lease or journal left
    again = await exporter.export_rollout("t", repo_name="r", dest=(sub, "v"), rows_per_part=1000)
    assert (again.parts_reused, again.parts_written) == (2, 0)


# --- a damaged manifest (issue 17) ---------------------------------------------------------


@frozen
@pytest.mark.parametrize("damage", ["empty", "truncated", "blank"])
async def test_a_damaged_manifest_is_named_and_resume_false_recovers(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path, damage: str
) -> None:
    bread_emulator.add_target("r", "t", rows=1500, rollout="complete")
    await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    manifest = tmp_path / "_manifest.parquet"
    whole = manifest.read_bytes()
    manifest.write_bytes(
        {"empty": b"", "truncated": whole[: len(whole) // 3], "blank": b"  \n"}[damage]
    )
    reason = "truncated" if damage == "truncated" else "empty"
    with pytest.raises(
        ExportMismatchError, match=rf"damaged _manifest.parquet \({reason}"
    ) as caught:
        await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=1000)
    assert "resume=False" in str(caught.value)
    assert "--no-resume" in str(caught.value)
    result = await exporter.export_rollout(
        "t", repo_name="r", dest=tmp_path, rows_per_part=1000, resume=False
    )
    assert result.parts_written == 2
    assert manifest.read_bytes() != b""
    assert batch_to_rows(pq.read_table(tmp_path)) == bread_emulator.trajectories("r", "t")


@frozen
def test_cli_no_resume_recovers_a_damaged_manifest(
    bread_emulator: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bread_emulator.add_target("r", "t", rows=500, rollout="complete")
    argv = [
        *("export", "--repo", "r", "--target", "t", "--out", str(tmp_path)),
        *("--base-url", bread_emulator.url or "", "--api-key", bread_emulator.api_key),
    ]
    assert cli_main(argv) == 0
    folder = tmp_path / "repo=r" / "target=t"
    (folder / "_manifest.parquet").write_bytes(b"")
    capsys.readouterr()
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "damaged _manifest.parquet (empty)" in err
    assert err.strip().count("\n") == 0
    assert cli_main([*argv, "--no-resume"]) == 0
    assert batch_to_rows(pq.read_table(folder)) == bread_emulator.trajectories("r", "t")


@frozen
async def test_a_damaged_manifest_at_a_dataset_root_is_not_taken_for_a_dataset(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=10, rollout="complete")
    (tmp_path / "_manifest.parquet").write_bytes(b"{")
    with pytest.raises(ExportMismatchError, match="holds the export of a single target"):
        await exporter.export_many(["t"], repo_name="r", dest=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_manifest.parquet"]


@frozen
async def test_resume_false_never_replaces_another_targets_export_with_a_damaged_manifest(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "a", rows=1500, rollout="complete")
    bread_emulator.add_target("r", "b", rows=10, rollout="complete")
    await exporter.export_rollout("a", repo_name="r", dest=tmp_path, rows_per_part=1000)
    (tmp_path / "_manifest.parquet").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    with pytest.raises(ExportMismatchError, match="already holds an export"):
        await exporter.export_rollout("b", repo_name="r", dest=tmp_path, resume=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    assert after == before
