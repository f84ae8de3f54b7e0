"""``breadasync emulator``: the real console script, in a subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("breadasync")
HANG = 60
"""Seconds a process or request may take before the test calls it hung: a hang guard only
(a busy 2-core machine can take many seconds to start a Python process), no claim of speed."""


def _get(url: str, key: str | None = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url)  # noqa: S310 (a loopback http URL the test built)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=HANG) as resp:  # noqa: S310 (same URL)
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def run_emulator() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=HANG)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def start(procs: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(SCRIPT), "emulator", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    procs.append(proc)
    return proc


def test_emulator_command_serves_a_scenario_and_stops_on_sigint(
    tmp_path: Path, run_emulator: list[subprocess.Popen[str]]
) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(
        'dialect = "spec"\nspeed = 0\n'
        '[[targets]]\nrepo = "r"\ntarget = "t"\nrows = 42\nrollout = "complete"\n'
        "[targets.faults]\npage_cap = 10\n"
    )
    proc = start(
        run_emulator,
        "--port",
        "0",
        "--json",
        "--scenario",
        str(scenario),
        "--api-key",
        "cli-test-key",
    )
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    assert info["api_key"] is None  # the key the user chose is not printed back
    assert info["dialect"] == "spec"
    assert info["url"].startswith("http://127.0.0.1:")
    status, body = _get(info["url"] + "/v1/repo/r/targets/t/rollout", "cli-test-key")
    assert (status, body["status"], body["lines"]) == (200, "complete", 42)
    status, page = _get(
        info["url"] + "/v1/repo/r/targets/t/rollout/output?limit=1000", "cli-test-key"
    )
    assert len(page["output"]) == 10  # type: ignore[arg-type]
    assert _get(info["url"] + "/v1/repo/r/targets/t", "wrong")[0] == 401
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=HANG) == 0


def test_emulator_command_prints_url_and_key_for_people(
    run_emulator: list[subprocess.Popen[str]],
) -> None:
    proc = start(run_emulator, "--port", "0")
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(4)]
    assert lines[0].startswith("Bread emulator (docs dialect) listening on http://127.0.0.1:")
    assert lines[1].startswith("  export BREAD_BASE_URL=http://127.0.0.1:")
    assert lines[2].startswith("  export BREAD_API_KEY=emu-")  # a random key is shown
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=HANG) == 0


def test_bad_scenario_is_a_clear_error(
    tmp_path: Path, run_emulator: list[subprocess.Popen[str]]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"targets": [{"repo": "r"}]}')
    for scenario, message in [
        (bad, "needs 'repo' and 'target'"),
        (tmp_path / "missing.json", "cannot read scenario file"),
    ]:
        proc = start(run_emulator, "--port", "0", "--scenario", str(scenario))
        assert proc.wait(timeout=HANG) == 2
        assert proc.stderr is not None
        assert message in proc.stderr.read()
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    proc = start(run_emulator, "--port", "0", "--scenario", str(broken))
    assert proc.wait(timeout=HANG) == 2
    assert proc.stderr is not None
    assert "is not valid JSON" in proc.stderr.read()


def test_port_in_use_is_a_clear_error(run_emulator: list[subprocess.Popen[str]]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start(run_emulator, "--port", str(port))
        assert proc.wait(timeout=HANG) == 1
        assert proc.stderr is not None
        assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr.read()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "not within 0..65535"),
        (["--speed", "-1"], "must be >= 0"),
        (["--dialect", "yaml"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    done = subprocess.run(
        [str(SCRIPT), "emulator", *args], capture_output=True, text=True, timeout=HANG, check=False
    )
    assert done.returncode == 2
    assert message in done.stderr
