"""Issue 17 item 3: the API key appears in no byte the command line produces.

Every command runs with the key in every spelling the CLI accepts (``--api-key K``,
``--api-key=K``, ``BREAD_API_KEY``), succeeds, fails, and is interrupted; then stdout,
stderr, every log record and every written file are searched for the key. Abbreviated
spellings (``--api-k K``, ``--api-ke=K``) are refused, and their refusal does not echo it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from breadasync import cli
from breadasync.emulator import Emulator, Faults

KEY = "sk-live-Cli7Secret-4f9a2c81d3"
SCRIPT = Path(sys.executable).with_name("breadasync")
SPELLINGS = {
    "flag": ["--api-key", KEY],
    "equals": [f"--api-key={KEY}"],
    "env": [],
}


class _Records(logging.Handler):
    """Every record of breadasync's and aiohttp's loggers, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + repr(record.args) + repr(record.__dict__)
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


@pytest.fixture
def records() -> Iterator[_Records]:
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("breadasync", "aiohttp")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def no_key_in_files(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def commands(base: str, out: Path) -> list[list[str]]:
    """Every command that talks to the service, succeeding (``t``) and failing (``ghost``,
    an unreachable service, usage mistakes), verbose so their logs are written too."""
    service = ["--base-url", base, "-vv"]
    dead = ["--base-url", "http://127.0.0.1:9", "--max-retries", "0"]
    return [
        ["status", "--repo", "r", "t", *service],
        ["status", "--repo", "r", "ghost", "--json", *service],
        ["status", "--repo", "r", "t", *dead],
        ["rollout", "--repo", "r", "t", "--no-wait", *service],
        ["rollout", "--repo", "r", "ghost", "--json", *service],
        ["targets", "list", "--repo", "r", *service],
        ["targets", "list", "--repo", "ghost", "--json", *service],
        ["targets", "list", "--repo", "r", *dead, "--json"],
        ["export", "--repo", "r", "t", "--out", str(out / "one"), *service],
        ["export", "--repo", "r", "t", "--out", str(out / "two"), "--json", *service],
        ["export", "--repo", "r", "ghost", "--out", str(out / "three"), *service],
        ["export", "--repo", "r", "--all", "--out", str(out / "dry"), "--dry-run", *service],
        ["export", "--repo", "r", "t", "--out", str(out / "four"), "--page-size", "5000"],
        ["export", "--repo", "r", "t", "--out", str(out / "five"), "--bogus", "--json"],
        ["completion", "bash"],
    ]


@pytest.mark.bread_emulator(speed=0, api_key=KEY)
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_the_key_is_in_no_output_log_or_file(
    spelling: str,
    bread_emulator: Emulator,
    records: _Records,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    bread_emulator.add_target("r", "t", rows=300, rollout="complete")
    monkeypatch.delenv("BREAD_API_KEY", raising=False)
    if spelling == "env":
        monkeypatch.setenv("BREAD_API_KEY", KEY)
    codes = []
    for argv in commands(bread_emulator.url or "", tmp_path):
        # The key goes where the command allows it (not after 'completion', which takes none).
        given = SPELLINGS[spelling] if argv[0] != "completion" else []
        codes.append(cli.main([*argv, *given]))
        captured = capsys.readouterr()
        assert KEY not in captured.out + captured.err, argv
    assert codes == [0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 2, 2, 0]
    assert (tmp_path / "one" / "repo=r" / "target=t" / "_manifest.parquet").exists()

    # Interrupted: the hint repeats the command line, with the key hidden.
    async def interrupted(args: object, ui: object) -> int:
        raise KeyboardInterrupt

    for name in ("export", "status", "rollout", "targets list"):
        monkeypatch.setitem(cli.COMMANDS, name, interrupted)
    for argv in commands(bread_emulator.url or "", tmp_path)[:12]:
        assert cli.main([*argv, *SPELLINGS[spelling]]) == 130
        captured = capsys.readouterr()
        assert KEY not in captured.out + captured.err, argv
        if spelling != "env" and argv[0] == "export":
            assert "***" in captured.err

    assert records.lines  # -vv did log: the search below searched something
    assert not [line for line in records.lines if KEY in line]
    no_key_in_files(tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["--api-k", KEY],
        [f"--api-ke={KEY}"],
        ["--api", KEY],
        ["--a", KEY],
        [f"--api-key-file={KEY}"],
    ],
)
def test_abbreviated_key_options_are_refused_without_echoing_the_key(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for json in ([], ["--json"]):
        code = cli.main(["export", "--repo", "r", "t", "--out", "o", *argv, *json])
        captured = capsys.readouterr()
        assert code == 2
        assert "unrecognized argument: --" in captured.err
        assert KEY not in captured.out + captured.err


def _interrupt(argv: list[str], env: dict[str, str], ready: Callable[[], bool]) -> tuple[str, str]:
    """Run the console script, SIGINT it once ``ready()`` holds; its stdout and stderr."""
    child = subprocess.Popen(
        [str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        for _ in range(3000):  # bounded: ~60 s
            if child.poll() is not None or ready():
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0.02)  # polling another process's progress, bounded
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, err
    return out, err


@pytest.mark.bread_emulator(speed=0, api_key=KEY)
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_a_real_ctrl_c_shows_no_key(
    spelling: str, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=20_000, rollout="complete")
    bread_emulator.set_faults(Faults(latency=0.3), repo="r", target="t")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BREAD_")}
    if spelling == "env":
        env["BREAD_API_KEY"] = KEY
    out = tmp_path / "out"
    argv = ["export", "--repo", "r", "t", "--out", str(out), "--rows-per-part", "2000"]
    argv += ["--concurrency", "2", "--base-url", bread_emulator.url or "", "-v"]
    argv += SPELLINGS[spelling]
    served = bread_emulator.stats.count("get_rollout_output")
    stdout, stderr = _interrupt(
        argv, env, lambda: bread_emulator.stats.count("get_rollout_output") > served + 2
    )
    assert "interrupted: " in stderr
    assert "Run the same command again to resume: breadasync export" in stderr
    assert KEY not in stdout + stderr
    no_key_in_files(tmp_path)

    json_out, json_err = _interrupt(
        [*argv, "--json"],
        env,
        lambda: bread_emulator.stats.count("get_rollout_output") > served + 6,
    )
    interrupted = orjson.loads(json_out)
    assert (interrupted["exit_code"], interrupted["error"]["type"]) == (130, "interrupted")
    assert interrupted["rows_committed"] + interrupted["rows_to_refetch"] == 20_000
    assert KEY not in json_out + json_err
    no_key_in_files(tmp_path)


def test_a_key_with_surrounding_whitespace_is_hidden_as_sent() -> None:
    """``BREAD_API_KEY`` read from a file keeps its newline; the client strips it, so the
    copy a service echoes is the stripped one."""
    from breadasync.cli._args import Scrub, secrets_in

    secrets = secrets_in([], {"BREAD_API_KEY": f"  {KEY}\n"})
    assert Scrub(secrets)(f"echoed: Bearer {KEY}.") == "echoed: Bearer ***."
