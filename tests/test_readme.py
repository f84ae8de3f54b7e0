"""The README's Python examples run, as written, against the emulator."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from breadasync.emulator import Emulator, TargetPlan

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def block(containing: str) -> str:
    found = [b for b in BLOCKS if containing in b]
    assert len(found) == 1, f"expected one README example with {containing!r}"
    return found[0]


async def run_async(code: str) -> dict[str, Any]:
    """Run an example that uses ``await`` at its top level, as a notebook would."""
    namespace: dict[str, Any] = {}
    body = "from breadasync import BreadClient\n" + code
    source = f"async def _example():\n{textwrap.indent(body, '    ')}\n    return locals()"
    exec(source, namespace)  # noqa: S102 (the README's own example)
    result: dict[str, Any] = await namespace["_example"]()
    return result


@pytest.fixture
def service(bread_emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Emulator:
    bread_emulator.clock.speed = 100
    plan = TargetPlan(stimuli=50, rollout_seconds=20)
    bread_emulator.add_target("my_repo", "coding_target", plan=plan, rollout="complete")
    for name in ("t1", "t2"):
        bread_emulator.add_target("my_repo", name, plan=plan)
    bread_emulator.add_target("my_repo", "t3", plan=TargetPlan(stimuli=50, fail="rollout"))
    monkeypatch.setenv("BREAD_API_KEY", bread_emulator.api_key)
    monkeypatch.setenv("BREAD_BASE_URL", bread_emulator.url or "")
    monkeypatch.chdir(tmp_path)
    return bread_emulator


@pytest.mark.parametrize("dialect", ["docs", "spec"])
async def test_the_first_example_works_from_scratch(
    bread_emulator_factory: Callable[..., Emulator],
    dialect: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A fresh emulator, no target in it, jobs a hundred times faster than the defaults.
    emulator = bread_emulator_factory(speed=100, dialect=dialect)
    monkeypatch.setenv("BREAD_API_KEY", emulator.api_key)
    monkeypatch.setenv("BREAD_BASE_URL", emulator.url or "")
    monkeypatch.chdir(tmp_path)
    script = block("asyncio.run(main())").replace("asyncio.run(main())", "")
    for _ in range(2):  # and again, as the README says it can be
        namespace: dict[str, Any] = {}
        exec(script, namespace)  # noqa: S102 (the README's own example)
        await namespace["main"]()
        out = capsys.readouterr().out.splitlines()
        # 10 stimuli (a target without generators), 2 trajectories each
        assert out == [
            "Qwen/Qwen3-32B complete 10 complete 20",
            "5 True",
            "20 rows in 1 Parquet file(s) in first_target/",
        ]
    assert emulator.stats.jobs_started("stim") == emulator.stats.jobs_started("rollout") == 1
    assert (tmp_path / "first_target" / "_manifest.parquet").exists()


async def test_the_python_examples(
    service: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = await run_async(block("rollout_many"))
    summary = found["results"].summary()
    assert (summary.complete, summary.failed) == (2, 1)
    assert "3 targets: 2 complete, 1 failed" in capsys.readouterr().out

    await run_async(block("as_completed"))
    assert capsys.readouterr().out.count("my_repo/t") == 3

    found = await run_async(block("export_many"))
    assert found["one"].rows == 50
    assert found["many"].rows == 100  # t3 failed: its result holds the error
    assert (tmp_path / "dataset" / "repo=my_repo" / "target=t1" / "_manifest.parquet").exists()

    namespace = {}
    await asyncio.to_thread(exec, block("import duckdb"), namespace)
    assert namespace["table"].num_rows == 100

    await run_async(block("iter_rollout_batches"))
    assert capsys.readouterr().out.splitlines()[-1].startswith("50 0")


async def test_the_web_backend_example(service: Emulator) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(block("web.Application()"), namespace)  # noqa: S102
    app: web.Application = namespace["app"]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/status/coding_target") as resp,
        ):
            assert resp.status == 200
            assert await resp.json() == {"status": "complete", "lines": 50}
    finally:
        await runner.cleanup()


def test_the_pytest_example(tmp_path: Path) -> None:
    test_file = tmp_path / "test_users_own.py"
    test_file.write_text(block("import pytest"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(test_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("BREAD_")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
