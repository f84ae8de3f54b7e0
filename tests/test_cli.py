"""The ``breadasync`` console script, run for real in subprocesses against the emulator."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import orjson
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from breadasync.emulator import Emulator, Faults, RowShape, TargetPlan, trajectory_row
from breadasync.export import batch_to_rows

SCRIPT = Path(sys.executable).with_name("breadasync")
README = Path(__file__).resolve().parents[1] / "README.md"


def cli_env(emulator: Emulator | None = None, **extra: str) -> dict[str, str]:
    """This environment without BREAD_* settings, then those of ``emulator``, if any."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BREAD_")}
    if emulator is not None:
        env.update(BREAD_API_KEY=emulator.api_key, BREAD_BASE_URL=emulator.url or "")
    env.update(extra)
    return env


def run(
    *args: str,
    emulator: Emulator | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    full_env = cli_env(emulator, **(env or {}))
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return orjson.loads(done.stdout)


def one_error_line(done: subprocess.CompletedProcess[str], command: str, text: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"breadasync {command}: error: ")
    assert text in lines[0]
    assert "Traceback" not in done.stderr


# --- the README's main job -------------------------------------------------------------------


def test_readme_main_command_runs_the_demo_and_writes_exact_parquet(tmp_path: Path) -> None:
    block = README.read_text().split("<!-- main-command -->")[1].split("<!-- /main-command -->")[0]
    command = re.search(r"```sh\n(.+)\n```", block, re.DOTALL)
    assert command is not None
    last = command.group(1).strip().split("&&")[-1].strip()
    assert last == ".venv/bin/breadasync demo"  # the rest installs; this env has it already

    done = run("demo", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Started the embedded Bread emulator" in done.stderr
    assert "rows from 6 targets" in done.stdout
    assert "duckdb.sql" in done.stdout

    from breadasync.cli import DEMO_REPO, DEMO_TARGETS

    dataset = ds.dataset(tmp_path / "bread-demo", format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == sum(s * per for s, per in DEMO_TARGETS.values())
    for name, (stimuli, per) in DEMO_TARGETS.items():
        part = dataset.to_table(filter=ds.field("target") == name).sort_by("row_offset")
        shape = RowShape(model="Qwen/Qwen3-32B", temperature=0.8, num_traj_per_stimulus=per)
        expected = [trajectory_row(DEMO_REPO, name, i, shape) for i in range(stimuli * per)]
        assert batch_to_rows(part) == expected, name

    # A second demo runs new jobs: their export replaces the first (rows of two jobs are
    # never mixed), with the same rows, as the emulator's rows depend on the config only.
    again = run("demo", "--json", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = as_json(again)
    assert all(t["parts_reused"] == 0 for t in summary["targets"])
    assert ds.dataset(tmp_path / "bread-demo", format="parquet").count_rows() == table.num_rows


# --- rollout and status ------------------------------------------------------------------


@pytest.mark.bread_emulator(speed=200)
def test_rollout_command(bread_emulator: Emulator) -> None:
    for name in ("a", "b"):
        bread_emulator.add_target("r", name, plan=TargetPlan(stimuli=20, rollout_seconds=30))
    done = run("rollout", "--repo", "r", "a", "b", "--json", emulator=bread_emulator)
    assert done.returncode == 0, done.stderr
    result = as_json(done)
    assert [t["outcome"] for t in result["targets"]] == ["complete", "complete"]
    assert result["summary"]["lines"] == 40
    assert done.stderr == ""  # no progress when stderr is not a terminal

    bread_emulator.add_target("r", "bad", plan=TargetPlan(fail="rollout", stimuli=10))
    mixed = run("rollout", "--repo", "r", "a", "bad", "ghost", emulator=bread_emulator)
    assert mixed.returncode == 1
    assert "r/ghost" in mixed.stdout
    assert "3 targets: 1 complete, 1 failed, 1 errored" in mixed.stdout
    as_data = run("rollout", "--repo", "r", "a", "bad", "ghost", "--json", emulator=bread_emulator)
    assert as_data.returncode == 1
    outcomes = {t["target"]: (t["outcome"], t["error"]) for t in as_json(as_data)["targets"]}
    assert outcomes["a"] == ("complete", None)
    assert outcomes["bad"][0] == "failed"
    assert "simulated failure" in outcomes["bad"][1]
    assert outcomes["ghost"][0] == "error"
    assert "404 Not Found: Target not found" in outcomes["ghost"][1]

    bread_emulator.add_target("r", "slow", plan=TargetPlan(rollout_seconds=10**6))
    started = run("rollout", "--repo", "r", "slow", "--no-wait", "--json", emulator=bread_emulator)
    assert started.returncode == 0
    assert as_json(started)["targets"][0]["outcome"] == "started"
    timed = run(
        "rollout", "--repo", "r", "slow", "--timeout", "0.5", "--json", emulator=bread_emulator
    )
    assert timed.returncode == 1
    assert as_json(timed)["targets"][0]["outcome"] == "timeout"


@pytest.mark.bread_emulator(speed=0)
def test_request_timeout_bounds_each_attempt(bread_emulator: Emulator) -> None:
    """A service that answers in 5 s, an attempt bound of 0.3 s and one retry: the target's
    error says so, instead of a wait of minutes at the default bounds."""
    bread_emulator.add_target("r", "slow", rows=30, rollout="complete")
    bread_emulator.set_faults(Faults(latency=5), repo="r", target="slow")
    argv = ("status", "--repo", "r", "slow", "--max-retries", "1", "--json")
    done = run(*argv, "--request-timeout", "0.3", emulator=bread_emulator)
    assert done.returncode == 1, done.stderr
    [entry] = as_json(done)["targets"]
    assert "no complete answer within the timeout" in entry["error"]
    assert "attempt 0.3 s" in entry["error"]
    assert "gave up after 2 attempts" in entry["error"]
    bad = run(*argv, "--request-timeout", "0", emulator=bread_emulator)
    assert bad.returncode == 2
    assert "'0' must be > 0" in bad.stderr


def test_status_command(bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "done", rows=30, rollout="complete")
    bread_emulator.add_target("r", "idle")
    done = run("status", "--repo", "r", "done", "idle", "--json", emulator=bread_emulator)
    assert done.returncode == 0, done.stderr
    assert as_json(done)["targets"] == [
        {
            "repo": "r",
            "target": "done",
            "stim": "complete",
            "stim_lines": 30,
            "rollout": "complete",
            "lines": 30,
            "progress_percent": 100.0,
            "error": None,
        },
        {
            "repo": "r",
            "target": "idle",
            "stim": "complete",
            "stim_lines": 10,
            "rollout": "not_started",
            "lines": 0,
            "progress_percent": None,
            "error": None,
        },
    ]
    table = run("status", "--repo", "r", "done", "ghost", emulator=bread_emulator)
    assert table.returncode == 1
    assert "r/done" in table.stdout
    assert "Target not found" in table.stdout
    before = bread_emulator.stats.count()
    for argv in (("--repo", "", "done"), ("--repo", "r", "done", "..")):
        bad = run("status", *argv, emulator=bread_emulator)
        assert bad.returncode == 2, bad.stderr  # a usage error, as for rollout and export
        assert bad.stderr.count("\n") == 1
    assert bread_emulator.stats.count() == before  # nothing was asked


# --- export --------------------------------------------------------------------------------


@pytest.mark.bread_emulator(speed=0)
def test_export_one_and_many(bread_emulator: Emulator, tmp_path: Path) -> None:
    bread_emulator.add_target("r", "a", rows=2500, rollout="complete")
    bread_emulator.add_target("r", "b", rows=1200, rollout="complete")
    one = run(
        "export",
        "--repo",
        "r",
        "--target",
        "a",
        "--out",
        str(tmp_path / "one"),
        "--json",
        "--page-size",
        "700",
        "--concurrency",
        "3",
        emulator=bread_emulator,
    )
    assert one.returncode == 0, one.stderr
    result = as_json(one)
    assert result["rows"] == 2500
    folder = tmp_path / "one" / "repo=r" / "target=a"  # the dataset layout, even for one
    assert [Path(f).parent for f in result["targets"][0]["files"]] == [folder]
    assert batch_to_rows(pq.read_table(folder)) == bread_emulator.trajectories("r", "a")

    many = run(
        "export",
        "--repo",
        "r",
        "--target",
        "a",
        "--target",
        "b",
        "--out",
        str(tmp_path / "many"),
        emulator=bread_emulator,
    )
    assert many.returncode == 0, many.stderr
    assert f"3,700 rows in {tmp_path / 'many'}" in many.stdout
    assert (tmp_path / "many" / "repo=r" / "target=b" / "_manifest.parquet").exists()


@pytest.mark.bread_emulator(speed=0)
def test_export_user_errors_are_one_clear_line(bread_emulator: Emulator, tmp_path: Path) -> None:
    bread_emulator.add_target("r", "running", rollout="running", rows=100)
    bread_emulator.add_target("r", "done", rows=10, rollout="complete")
    out = str(tmp_path / "out")
    cases = [
        (["--target", "ghost"], 1, "404 Not Found: Target not found"),
        (["--target", "running"], 1, "--allow-partial on the command line"),
    ]
    for extra, code, text in cases:
        done = run("export", "--repo", "r", "--out", out, *extra, emulator=bread_emulator)
        assert done.returncode == code
        one_error_line(done, "export", text)
    file = tmp_path / "a-file"
    file.write_text("x")
    done = run(
        "export", "--repo", "r", "--target", "done", "--out", str(file), emulator=bread_emulator
    )
    assert done.returncode == 1
    one_error_line(done, "export", "is a file, not a folder")
    assert file.read_text() == "x"

    no_key = run(
        "export",
        "--repo",
        "r",
        "--target",
        "done",
        "--out",
        out,
        env={"BREAD_BASE_URL": bread_emulator.url or ""},
    )
    assert no_key.returncode == 2
    one_error_line(no_key, "export", "set the BREAD_API_KEY environment variable")
    bad_url = run(
        "export",
        "--repo",
        "r",
        "--target",
        "done",
        "--out",
        out,
        "--base-url",
        "bapi.example",
        "--api-key",
        "k",
    )
    assert bad_url.returncode == 2
    one_error_line(bad_url, "export", "must be an http(s) URL")
    dead = run(
        "status",
        "--repo",
        "r",
        "x",
        "--base-url",
        "http://127.0.0.1:9",
        "--api-key",
        "k",
        "--json",
        "--max-retries",
        "1",
    )
    assert dead.returncode == 1
    error = as_json(dead)["targets"][0]["error"]
    assert "cannot connect to http://127.0.0.1:9" in error
    assert "gave up after 2 attempts" in error
    bad_arg = run("export", "--repo", "r", "--target", "done", "--out", out, "--page-size", "1001")
    assert bad_arg.returncode == 2
    assert "not within 1..1000" in bad_arg.stderr


@pytest.mark.bread_emulator(speed=0)
def test_export_to_a_folder_without_write_permission(
    bread_emulator: Emulator,
) -> None:
    bread_emulator.add_target("r", "done", rows=10, rollout="complete")
    with tempfile.TemporaryDirectory() as base:
        Path(base).chmod(0o755)
        locked = Path(base) / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        argv = ["export", "--repo", "r", "--target", "done", "--out", str(locked / "x")]
        if os.geteuid() == 0:
            # Root writes anywhere: run the command as a normal user would (the interpreter
            # itself lives where only root may read, so its modules load before the drop).
            code = (
                "import os, sys, shutil, breadasync.cli, breadasync.cli._commands, "
                "breadasync.cli._export, breadasync._client, breadasync._aiohttp_transport, "
                "breadasync.export, breadasync.export._exporter, breadasync.export._commit, "
                "breadasync.export._manifest, breadasync.export._dest, "
                "breadasync.export._objstore, pyarrow.parquet, pyarrow.json, pyarrow.fs, "
                "pyarrow.compute; os.seteuid(65534); "
                f"sys.exit(breadasync.cli.main({argv!r}))"
            )
            env = cli_env(bread_emulator)
            done = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
        else:
            done = run(*argv, emulator=bread_emulator)
        assert done.returncode == 1, done.stderr
        one_error_line(done, "export", "no permission to write there")


@pytest.mark.bread_emulator(speed=0)
def test_ctrl_c_mid_export_then_resume(bread_emulator: Emulator, tmp_path: Path) -> None:
    bread_emulator.add_target("r", "t", rows=60_000, rollout="complete")
    bread_emulator.set_faults(Faults(latency=0.4), repo="r", target="t")
    out = tmp_path / "out"
    env = cli_env(BREAD_BASE_URL=bread_emulator.url or "")
    argv = [
        str(SCRIPT),
        "export",
        "--repo",
        "r",
        "--target",
        "t",
        "--out",
        str(out),
        "--concurrency",
        "2",
        "--rows-per-part",
        "5000",
        "--api-key",  # on the command line: the resume hint must not show it
        bread_emulator.api_key,
    ]
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    folder = out / "repo=r" / "target=t"
    journal = folder / "_journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 1 + 1:
            break
        time.sleep(0.02)  # polling a file another process writes; bounded by the deadline
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not (folder / "_manifest.parquet").exists()
    assert not list(folder.glob(".part-*"))
    kept = len(journal.read_bytes().splitlines()) - 1
    assert kept >= 1
    # The numbers are what the folder holds once the export has stopped.
    assert (
        f"interrupted: {kept} part(s) with {kept * 5000:,} rows are committed and will be "
        f"kept; {60_000 - kept * 5000:,} rows will be fetched again. Run the same command "
        "again to resume: breadasync export" in stderr
    )
    assert "--api-key '***'" in stderr
    assert bread_emulator.api_key not in stderr

    bread_emulator.set_faults(None, repo="r", target="t")
    again = run(
        "export",
        "--repo",
        "r",
        "--target",
        "t",
        "--out",
        str(out),
        "--json",
        "--rows-per-part",
        "5000",
        emulator=bread_emulator,
    )
    assert again.returncode == 0, again.stderr
    result = as_json(again)["targets"][0]
    assert result["parts_reused"] == kept
    assert batch_to_rows(pq.read_table(folder)) == bread_emulator.trajectories("r", "t")
    # A run that resumes says so in its table, not only in --json.
    table = run(
        "export",
        "--repo",
        "r",
        "t",
        "--out",
        str(out),
        "--rows-per-part",
        "5000",
        emulator=bread_emulator,
    )
    assert table.returncode == 0, table.stderr
    assert "reused" in table.stdout.splitlines()[1]  # the table's header
    assert "(resumed: 12 part(s) kept from an earlier run)" in table.stdout


# --- output modes --------------------------------------------------------------------------


@pytest.mark.bread_emulator(speed=0)
def test_verbose_logs_retries_and_never_the_key(bread_emulator: Emulator, tmp_path: Path) -> None:
    bread_emulator.add_target("r", "t", rows=10, rollout="complete")
    bread_emulator.set_faults(
        Faults(errors={503: 1.0}, retry_after=0.01, retry_after_format="ms", max_faults=2)
    )
    done = run("status", "--repo", "r", "t", "-v", emulator=bread_emulator)
    assert done.returncode == 0, done.stderr
    assert "GET /v1/repo/r/targets/t/stim -> 503 (attempt 1); retrying in" in done.stderr
    assert bread_emulator.api_key not in done.stderr + done.stdout


@pytest.mark.bread_emulator(speed=0)
def test_progress_is_drawn_on_a_terminal_and_not_with_quiet(
    bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=20_000, rollout="complete")
    env = cli_env(bread_emulator, COLUMNS="120")
    for quiet, expect_bar in ((False, True), (True, False)):
        main, replica = pty.openpty()
        try:
            argv = [
                str(SCRIPT),
                "export",
                "--repo",
                "r",
                "--target",
                "t",
                "--out",
                str(tmp_path / f"out-{quiet}"),
            ] + (["--quiet"] if quiet else [])
            child = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=replica, env=env, timeout=120, check=False
            )
            os.close(replica)
            replica = -1
            drawn = b""
            while True:
                try:
                    chunk = os.read(main, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                drawn += chunk
        finally:
            os.close(main)
            if replica != -1:
                os.close(replica)
        assert child.returncode == 0
        assert (b"rows/s" in drawn) is expect_bar


def test_interrupted_hint_repeats_the_command_main_was_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from breadasync import cli

    async def interrupted(args: object, ui: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "export", interrupted)
    out = str(tmp_path / "out")
    argv = ["export", "--repo", "r", "--target", "t", "--out", out, "--api-key", "sk-secret-1"]
    assert cli.main(argv) == 130
    stderr = capsys.readouterr().err
    # Called in-process (a script, a test), the hint must be main's argv, not sys.argv; and
    # nothing ran, so nothing is said to be kept.
    assert stderr.startswith("breadasync: interrupted: no part was committed yet. ")
    assert f"breadasync export --repo r --target t --out {out} --api-key '***'" in stderr
    assert "sk-secret-1" not in stderr


@pytest.mark.bread_emulator(speed=0)
def test_ctrl_c_before_any_part_is_written_promises_nothing(
    bread_emulator: Emulator, tmp_path: Path
) -> None:
    # One part of 60,000 rows: it cannot be committed before its 60 pages are in, and the
    # signal comes after 2 of them (each page takes 0.5 s, two at a time).
    bread_emulator.add_target("r", "t", rows=60_000, rollout="complete")
    bread_emulator.set_faults(Faults(latency=0.5), repo="r", target="t")
    out = tmp_path / "out"
    argv = [str(SCRIPT), "export", "--repo", "r", "t", "--out", str(out), "--concurrency", "2"]
    child = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(bread_emulator),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if bread_emulator.stats.count("get_rollout_output") >= 2:
            break
        time.sleep(0.02)  # polling another process's progress; bounded by the deadline
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert stderr.startswith(
        "breadasync: interrupted: no part was committed yet: all 60,000 rows will be fetched "
        "again. Run the same command again to resume: breadasync export --repo r t"
    )
    assert "kept" not in stderr
    assert not list((out / "repo=r" / "target=t").glob("*.parquet"))


class _Interrupting(types.ModuleType):
    """A module whose first use raises KeyboardInterrupt: Ctrl-C while it loads."""

    def __getattr__(self, name: str) -> Any:
        raise KeyboardInterrupt


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_ctrl_c_while_the_command_loads_is_the_usual_one_line(
    json_flag: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from breadasync.cli import EXIT_INTERRUPTED, main

    monkeypatch.setitem(sys.modules, "breadasync.cli._output", _Interrupting("stub"))
    monkeypatch.setenv("BREAD_API_KEY", "sk-loading-secret")
    try:
        code = main(["status", "t1", "--repo", "r", *json_flag])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while loading escaped main() (it would stop this whole run)")
    out, err = capsys.readouterr()
    assert code == EXIT_INTERRUPTED == 130
    assert err == "breadasync: interrupted\n"
    if json_flag:
        document = orjson.loads(out)
        assert document["exit_code"] == 130
        assert document["error"] == {"type": "interrupted", "message": "interrupted"}
    else:
        assert out == ""
