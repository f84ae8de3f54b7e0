"""Jobs as the world runs them: jobs that say little, re-runs with a new identity, and the
profile switches (Emulator, target, scenario, control API, CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from breadasync.emulator import Emulator, RowShape, TargetPlan, trajectory_row
from tests.conftest import RawApi

T = "/v1/repo/r/targets"
frozen = pytest.mark.bread_emulator(speed=0)


def _plan(progress: str) -> TargetPlan:
    return TargetPlan(stimuli=100, rollout_seconds=10, progress=progress)  # type: ignore[arg-type]


@frozen
async def test_jobs_that_say_little(api: RawApi, bread_emulator: Emulator) -> None:
    for mode in ("full", "lines", "final"):
        bread_emulator.add_target("r", mode, plan=_plan(mode), rollout="running")
    bread_emulator.clock.advance(5)
    full = (await api.get(T + "/full/rollout")).json()
    lines = (await api.get(T + "/lines/rollout")).json()
    final = (await api.get(T + "/final/rollout")).json()
    assert (full["status"], full["lines"], full["progress_percent"]) == ("running", 50, 50.0)
    assert (lines["status"], lines["lines"]) == ("running", 50)
    assert "progress_percent" not in lines
    assert (final["status"], final["lines"]) == ("running", 0)
    assert "progress_percent" not in final
    page = (await api.get(T + "/final/rollout/output", params={"limit": "10"})).json()
    assert page["output"] == []
    assert page["has_more"] is False
    bread_emulator.clock.advance(5)
    for mode in ("full", "lines", "final"):
        done = (await api.get(T + f"/{mode}/rollout")).json()
        assert (done["status"], done["lines"]) == ("complete", 100)


@pytest.mark.bread_emulator(speed=0, dialect="spec")
async def test_jobs_that_say_little_have_no_total_in_the_spec_dialect(
    api: RawApi, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "full", plan=_plan("full"), rollout="running")
    bread_emulator.add_target("r", "lines", plan=_plan("lines"), rollout="running")
    assert (await api.get(T + "/full/rollout")).json()["total_expected"] == 100
    assert "total_expected" not in (await api.get(T + "/lines/rollout")).json()


def test_the_realistic_profile_mixes_reporting_per_target_deterministically() -> None:
    emulator = Emulator(speed=0)
    simple = Emulator(speed=0, profile="simple")
    names = [f"t{i}" for i in range(30)]
    modes = []
    for name in names:
        emulator.add_target("r", name, rollout="running")
        simple.add_target("r", name, rollout="running")
        modes.append(emulator.progress_mode("r", name))
        assert simple.progress_mode("r", name) == "full"
    assert set(modes) == {"full", "lines", "final"}
    again = Emulator(speed=0)
    for name in names:
        again.add_target("r", name)
    assert [again.progress_mode("r", n) for n in names] == modes


@frozen
async def test_rerun_is_a_new_job_with_new_rows(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    before = (await api.get(T + "/t/rollout/output", params={"limit": "1000"})).json()
    first_job = before["job_id"]
    view = bread_emulator.rerun("r", "t")
    assert view.job_id != first_job
    assert (view.status, view.lines, view.generation) == ("complete", 3000, 1)
    after = (await api.get(T + "/t/rollout/output", params={"limit": "1000"})).json()
    assert after["job_id"] == view.job_id
    assert after["lines"] == before["lines"] == 3000
    assert all(a != b for a, b in zip(before["output"], after["output"], strict=True))
    assert after["output"] == bread_emulator.trajectories("r", "t", 0, 1000)
    assert before["output"] == bread_emulator.trajectories("r", "t", 0, 1000, generation=0)
    shape = RowShape(model="Qwen/Qwen3-32B")
    assert before["output"][7] == trajectory_row("r", "t", 7, shape)  # generation 0 as ever
    assert after["output"][7] == trajectory_row("r", "t", 7, shape, generation=1)
    assert bread_emulator.stats.jobs_started("rollout", target="t") == 1


@frozen
async def test_rerun_with_other_lines_or_config(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    view = bread_emulator.rerun("r", "t", lines=2000, overrides={"model_name": "other/model"})
    assert (view.status, view.lines) == ("complete", 2000)
    page = (await api.get(T + "/t/rollout/output", params={"limit": "5"})).json()
    assert {row["model"] for row in page["output"]} == {"other/model"}
    assert page["parameters"]["model_name"] == "other/model"
    running = bread_emulator.rerun("r", "t", rollout="running")
    assert running.status == "running"
    assert running.generation == 2
    with pytest.raises(ValueError, match="not a multiple"):
        bread_emulator.rerun("r", "t", lines=-1)
    with pytest.raises(KeyError, match="no target"):
        bread_emulator.rerun("r", "ghost")


@frozen
async def test_control_api_reruns_and_overloads(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=10, rollout="complete")
    old = (await api.get(T + "/t/rollout")).json()["job_id"]
    reply = await api.post("/_emulator/rerun", json={"repo": "r", "target": "t", "lines": 20})
    assert reply.status == 200, reply.body
    new = reply.json()
    assert new["job_id"] != old
    assert (new["generation"], new["lines"], new["status"]) == (1, 20, "complete")
    bad = await api.post("/_emulator/rerun", json={"repo": "r", "target": "t", "line": 2})
    assert bad.status == 400
    reply = await api.post("/_emulator/overload", json={"seconds": 3, "retry_after": None})
    assert reply.status == 200
    down = await api.get(T + "/t/rollout")
    assert down.status == 503
    assert "Retry-After" not in down.headers
    bread_emulator.clock.advance(3)
    assert (await api.get(T + "/t/rollout")).status == 200
    health = (await api.get("/_emulator/health")).json()
    assert health["profile"] == "realistic"


def test_profile_switches() -> None:
    emulator = Emulator.from_scenario(
        {
            "profile": "simple",
            "speed": 0,
            "targets": [
                {"repo": "r", "target": "s", "rows": 20, "rollout": "complete"},
                {
                    "repo": "r",
                    "target": "real",
                    "rows": 20,
                    "rollout": "complete",
                    "profile": "realistic",
                    "plan": {"progress": "lines"},
                },
            ],
        }
    )
    assert emulator.profile == "simple"
    simple_shape = RowShape(model="Qwen/Qwen3-32B", profile="simple")
    assert emulator.trajectories("r", "s", 0, 20) == [
        trajectory_row("r", "s", i, simple_shape) for i in range(20)
    ]
    assert emulator.trajectories("r", "real", 0, 20) == [
        trajectory_row("r", "real", i, RowShape(model="Qwen/Qwen3-32B")) for i in range(20)
    ]
    assert emulator.progress_mode("r", "real") == "lines"
    with pytest.raises(ValueError, match="profile"):
        Emulator(profile="friendly")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="profile"):
        emulator.add_target("r", "x", profile="nice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="progress"):
        TargetPlan(progress="some")  # type: ignore[arg-type]


@pytest.mark.bread_emulator(profile="simple", speed=0)
async def test_the_marker_takes_a_profile(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=5, rollout="complete")
    page = (await api.get(T + "/t/rollout/output")).json()
    shape = RowShape(model="Qwen/Qwen3-32B", profile="simple")
    assert page["output"] == [trajectory_row("r", "t", i, shape) for i in range(5)]


def test_cli_takes_a_profile(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("breadasync")
    proc = subprocess.Popen(
        [str(script), "emulator", "--port", "0", "--json", "--profile", "simple"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        import urllib.request

        with urllib.request.urlopen(info["url"] + "/_emulator/health", timeout=30) as resp:  # noqa: S310
            assert orjson.loads(resp.read())["profile"] == "simple"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
