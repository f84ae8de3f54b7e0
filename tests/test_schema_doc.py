"""docs/SCHEMA.md: its snippets run as written against real exports, and give the rows the
service sent; its column tables list exactly the schemas' columns and types."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from breadasync import BreadClient
from breadasync.emulator import Emulator, EmulatorThread
from breadasync.export import SCHEMA, TYPED_SCHEMA
from tests.test_readers import warm_up

DOC = Path(__file__).resolve().parents[1] / "docs" / "SCHEMA.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.DOTALL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """``out`` (typed), ``out-json`` and ``dataset`` (typed, two targets), as the doc says."""
    root = tmp_path_factory.mktemp("schema-doc")
    emulator = Emulator(speed=0)
    emulator.add_target("r", "t", rows=3000, rollout="complete")
    emulator.add_target("r", "u", rows=500, rollout="complete")
    with EmulatorThread(emulator) as server:

        async def run() -> None:
            async with BreadClient(emulator.api_key, server.url) as client:
                await client.export_rollout("t", repo_name="r", dest=root / "out", columns="typed")
                await client.export_rollout("t", repo_name="r", dest=root / "out-json")
                done = await client.export_many(
                    ["t", "u"], repo_name="r", dest=root / "dataset", columns="typed"
                )
                assert not done.failures()

        asyncio.run(run())
    warm_up(root / "out")
    return root, emulator.trajectories("r", "t")


def run_block(index: int, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(cwd)
    namespace: dict[str, Any] = {}
    exec(BLOCKS[index], namespace)  # noqa: S102 (the doc's own example)
    return namespace


def test_there_are_four_snippets() -> None:
    assert len(BLOCKS) == 4


def expected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    messages = [m for r in rows if isinstance(r.get("messages"), list) for m in r["messages"]]
    rewards = [r["reward"] for r in rows if type(r.get("reward")) is float]
    return {
        "chats": sum(isinstance(r.get("messages"), list) for r in rows),
        "messages": messages,
        "usage": sum(isinstance(r.get("usage"), dict) for r in rows),
        "calls": sum(len(r["tool_calls"]) for r in rows if r.get("tool_calls")),
        "reward": sum(rewards) / len(rewards),
        "finish": sum(isinstance(r.get("finish_reason"), str) for r in rows),
    }


def test_pandas(folder: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, rows = folder
    want = expected(rows)
    got = run_block(0, root, monkeypatch)
    assert len(got["first_question"]) == want["chats"] > 0
    assert len(got["usage"]) == want["usage"] > 0
    assert list(got["usage"].columns) == ["prompt_tokens", "completion_tokens", "total_tokens"]
    assert got["mean_reward"] == pytest.approx(want["reward"])


def test_polars(folder: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, rows = folder
    want = expected(rows)
    got = run_block(1, root, monkeypatch)
    assert got["messages"].select("role", "content").rows(named=True) == want["messages"]
    assert got["usage"].height == want["usage"]
    assert got["calls"].height == want["calls"] > 0
    assert dict(got["per_target"].iter_rows()) == {"t": 3000, "u": 500}


def test_duckdb(folder: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    root, rows = folder
    want = expected(rows)
    got = run_block(2, root, monkeypatch)
    by_offset = sorted(got["messages"], key=lambda m: m[0])  # unnest keeps each row's order
    assert [{"role": m[1], "content": m[2]} for m in by_offset] == want["messages"]
    assert len(got["usage"]) == want["usage"]
    assert len(got["calls"]) == want["calls"]
    assert got["per_target"] == [("t", 3000), ("u", 500)]


def test_the_default_mode(
    folder: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, rows = folder
    want = expected(rows)
    got = run_block(3, root, monkeypatch)
    assert got["rows"] == rows
    assert got["finish"].height == want["finish"] > 0
    by_offset = sorted(got["json_messages"], key=lambda m: m[0])
    assert [{"role": m[1], "content": m[2]} for m in by_offset] == want["messages"]
    assert len(got["extra"]) == sum(
        any(k not in SCHEMA.names or r[k] is None for k in r) for r in rows
    )


def test_the_tables_list_every_column() -> None:
    listed = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", TEXT, re.MULTILINE)
    names = [name for name, _ in listed]
    assert names == [*TYPED_SCHEMA.names[:8], "extra", *TYPED_SCHEMA.names[8:-1]]
    assert set(SCHEMA.names) <= set(names)
