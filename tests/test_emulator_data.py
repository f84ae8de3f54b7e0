"""Deterministic data, the clock, plans, scenarios and the ways to serve an emulator."""

from __future__ import annotations

import socket
import time

import aiohttp
import orjson
import pytest

from breadasync.emulator import (
    Clock,
    Emulator,
    EmulatorServer,
    EmulatorThread,
    Profile,
    RowShape,
    TargetPlan,
    trajectory_row,
)

SHAPE = RowShape(model="Qwen/Qwen3-32B", temperature=0.7, num_traj_per_stimulus=5)
SIMPLE = RowShape(
    model="Qwen/Qwen3-32B", temperature=0.7, num_traj_per_stimulus=5, profile="simple"
)
REAL = RowShape(model="Qwen/Qwen3-32B", temperature=0.7)


def test_rows_are_a_pure_function_of_their_inputs() -> None:
    first = [trajectory_row("repo", "target", i, SHAPE) for i in range(200)]
    again = [trajectory_row("repo", "target", i, SHAPE) for i in range(200)]
    assert first == again
    other = [trajectory_row("repo", "other", i, SHAPE) for i in range(200)]
    assert first != other


def test_simple_profile_rows_carry_friendly_awkwardness() -> None:
    rows = [trajectory_row("repo", "target", i, SIMPLE) for i in range(5000)]
    sizes = [len(orjson.dumps(r)) for r in rows]
    assert 800 <= sum(sizes) / len(sizes) <= 1500  # about 1.1 KB a row
    assert max(sizes) > 20_000  # some tens of KB
    texts = [r["response"] for r in rows]
    assert any("\n" in t for t in texts)
    assert any('"' in t for t in texts)
    assert any("🤔" in t or "🚀" in t for t in texts)
    assert any("日本語" in t for t in texts)
    assert all(r["model"] == "Qwen/Qwen3-32B" and r["temperature"] == 0.7 for r in rows)
    assert all(isinstance(r["tokens"], int) for r in rows)
    extras = {k for r in rows for k in r} - {
        "stimulus",
        "response",
        "model",
        "temperature",
        "tokens",
    }
    assert extras == {"messages", "reward", "finish_reason"}
    assert all(r["stimulus"].endswith(f"(#{i // 5})") for i, r in enumerate(rows))


def test_spec_rows_number_stimuli_and_trajectories() -> None:
    rows = [trajectory_row("repo", "target", i, SHAPE, "spec") for i in range(12)]
    assert [(r["stimulus_id"], r["trajectory_id"]) for r in rows][:6] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (0, 4),
        (1, 0),
    ]
    assert all("stimulus" not in r and "model" not in r for r in rows)


@pytest.mark.parametrize("profile", ["realistic", "simple"])
def test_odd_types_put_strings_in_number_fields(profile: Profile) -> None:
    odd = RowShape(model="m", odd_types=True, profile=profile)
    rows = [trajectory_row("repo", "target", i, odd) for i in range(2000)]
    assert any(isinstance(r["tokens"], str) for r in rows)


REAL_ROWS = [trajectory_row("repo", "target", i, REAL) for i in range(20_000)]


def test_realistic_profile_is_the_default() -> None:
    assert RowShape().profile == "realistic"
    assert Emulator().profile == "realistic"
    assert REAL_ROWS[:50] == [
        trajectory_row("repo", "target", i, RowShape(model="Qwen/Qwen3-32B", temperature=0.7))
        for i in range(50)
    ]


@pytest.mark.parametrize("page", range(20))
def test_every_realistic_page_is_awkward(page: int) -> None:
    rows = REAL_ROWS[page * 1000 : (page + 1) * 1000]
    texts = "".join(r["response"] for r in rows)
    for needle in ("\n", "\r\n", "\t", '"', "\\", "\\n", "\u2028", "\ufeff", "日本語", "Ответ"):
        assert needle in texts, needle
    for emoji in ("👨\u200d👩", "🇯🇵", "👍🏽"):  # a ZWJ sequence, a flag, a skin tone
        assert emoji in texts
    extra = [r for r in rows if set(r) - {"stimulus", "response", "model", "temperature", "tokens"}]
    assert 100 <= len(extra) <= 190  # about 1 row in 7
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert None in rewards
    assert 0.1 <= rewards.count(None) / len(rewards) <= 0.45  # about a quarter
    assert any(isinstance(r.get("messages"), list) for r in rows)
    assert any(isinstance(r.get("usage"), dict) for r in rows)
    assert {0.0, 1.0, 0.7} <= {r["temperature"] for r in rows}
    assert all(isinstance(r["temperature"], float) for r in rows)


def test_realistic_sizes_and_rare_fields() -> None:
    sizes = [len(r["response"].encode()) for r in REAL_ROWS]
    big = [s for s in sizes if s > 40_000]
    assert 20 <= len(big) <= 70  # about 1 in 500
    assert all(45_000 <= s <= 55_000 for s in big)
    assert 8 <= sizes.count(0) <= 40  # about 1 in 1,000
    tools = [i for i, r in enumerate(REAL_ROWS) if "tool_calls" in r]
    assert 5 <= len(tools) <= 30  # about 1 in 1,400
    assert min(tools) >= 1000  # never on the first page: a schema inferred from it misses them
    call = REAL_ROWS[tools[0]]["tool_calls"][0]
    assert isinstance(call["function"]["arguments"], dict)


def test_realistic_spec_rows_number_stimuli_and_trajectories() -> None:
    shape = RowShape(model="m", num_traj_per_stimulus=3)
    rows = [trajectory_row("repo", "target", i, shape, "spec") for i in range(9)]
    assert [(r["stimulus_id"], r["trajectory_id"]) for r in rows][:4] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
    ]
    assert all("stimulus" not in r and "model" not in r for r in rows)


def test_generations_differ_and_generation_zero_is_stable() -> None:
    first = REAL_ROWS[:1000]
    again = [trajectory_row("repo", "target", i, REAL, generation=0) for i in range(1000)]
    rerun = [trajectory_row("repo", "target", i, REAL, generation=1) for i in range(1000)]
    assert first == again
    assert all(a != b for a, b in zip(first, rerun, strict=True))
    assert [r["stimulus"] for r in first] == [r["stimulus"] for r in rerun]  # same stimuli


def test_clock_speed_and_advance() -> None:
    clock = Clock(speed=0)
    assert clock.now() == 0
    clock.advance(5)
    assert clock.now() == 5
    clock.speed = 1000
    start = clock.now()
    time.sleep(0.01)  # let real time pass; nothing to synchronise with
    assert clock.now() - start >= 9
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    with pytest.raises(ValueError, match=">= 0"):
        Clock(speed=-1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stimuli": -1}, "stimuli"),
        ({"rollout_seconds": -1}, "rollout_seconds"),
        ({"fail_at": 1.5}, "fail_at"),
        ({"fail": "bake"}, "fail"),
    ],
)
def test_invalid_plans_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TargetPlan(**kwargs)  # type: ignore[arg-type]


def test_add_target_refuses_what_the_api_would() -> None:
    emulator = Emulator()
    with pytest.raises(ValueError, match="invalid target name"):
        emulator.add_target("r", "a\x00b")
    with pytest.raises(ValueError, match="not a multiple"):
        emulator.add_target(
            "r", "t", rows=7, overrides={"model_name": "m", "num_traj_per_stimulus": 2}
        )
    with pytest.raises(ValueError, match="after a complete stim"):
        emulator.add_target("r", "t", stim="running", rollout="running")
    with pytest.raises(ValueError, match="invalid overrides"):
        emulator.add_target("r", "t", overrides={"temperature": 9})
    with pytest.raises(ValueError, match="template"):
        emulator.add_target("r", "t", template="ghost")
    with pytest.raises(KeyError, match="no target"):
        emulator.set_faults(None, repo="r", target="ghost")
    with pytest.raises(ValueError, match="dialect"):
        Emulator(dialect="yaml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="api_key"):
        Emulator(api_key="has space")


def test_scenarios() -> None:
    emulator = Emulator.from_scenario(
        {
            "speed": 0,
            "plan": {"rollout_seconds": 3},
            "faults": {"errors": {"503": 0.5}},
            "targets": [{"repo": "r", "target": "t", "rows": 30, "rollout": "complete"}],
        }
    )
    assert emulator.job("r", "t").lines == 30
    assert emulator.plan.rollout_seconds == 3
    with pytest.raises(ValueError, match="unknown scenario key"):
        Emulator.from_scenario({"sped": 2})
    with pytest.raises(ValueError, match="unknown target key"):
        Emulator.from_scenario({"targets": [{"repo": "r", "target": "t", "row": 3}]})


async def test_in_process_server_on_the_running_loop() -> None:
    emulator = Emulator()
    emulator.add_target("r", "t", rows=3, rollout="complete")
    async with EmulatorServer(emulator) as server, aiohttp.ClientSession() as session:
        assert server.url == emulator.url
        headers = {"Authorization": f"Bearer {emulator.api_key}"}
        async with session.get(
            server.url + "/v1/repo/r/targets/t/rollout", headers=headers
        ) as resp:
            assert (await resp.json())["lines"] == 3
    assert emulator.url is None
    with pytest.raises(RuntimeError, match="not serving"):
        _ = server.url


def test_thread_server_reports_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        thread = EmulatorThread(Emulator(), port=busy.getsockname()[1])
        with pytest.raises(OSError, match="address already in use"):
            thread.start()


def test_fixture_factory_starts_several(bread_emulator_factory) -> None:  # type: ignore[no-untyped-def]
    docs = bread_emulator_factory()
    spec = bread_emulator_factory(dialect="spec")
    assert docs.url != spec.url
    assert (docs.dialect, spec.dialect) == ("docs", "spec")
