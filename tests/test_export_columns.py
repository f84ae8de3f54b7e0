"""Typed nested columns (``columns="typed"``, issue 11 item 3): one declared schema, exact
round trips in both modes, misfits in ``extra``; the exporter, the CLI and the child
decoder all honour the mode."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breadasync import BreadClient, ExportMismatchError, InvalidArgumentError
from breadasync.emulator import Emulator
from breadasync.emulator._data import RowShape, trajectory_row
from breadasync.export import (
    SCHEMA,
    TYPED_SCHEMA,
    ExportOptions,
    batch_to_rows,
    load_manifest,
    rows_to_batch,
    schema_for,
)
from breadasync.export._decode import loads_exact
from breadasync.export._decode_process import DecodeProcesses
from breadasync.export._reader import decode_page
from breadasync.export._schema import TYPED_FIELDS, TYPED_NAMES
from tests.test_cli import run
from tests.test_export_decode import JSON_SCALARS, JSON_VALUES, KEYS, SEPARATORS, body_of, same

frozen = pytest.mark.bread_emulator(speed=0)
MODES = ("json", "typed")


@pytest.fixture
def processes() -> Iterator[DecodeProcesses]:
    with DecodeProcesses(1) as pool:
        yield pool


def fits(name: str, value: Any) -> bool:
    return next(f for n, _, f, _, _ in TYPED_FIELDS if n == name)(value)


def check(
    rows: list[dict[str, Any]], offset: int = 0, processes: DecodeProcesses | None = None
) -> None:
    """Both modes give ``rows`` back exactly, on every decode path; in typed mode every
    value that fits its column is in the column and not in ``extra``, and every other
    value is in ``extra``."""
    for mode in MODES:
        batch = rows_to_batch(rows, offset, columns=mode)
        assert batch.schema.equals(schema_for(mode), check_metadata=True)
        back = batch_to_rows(batch)
        assert len(back) == len(rows)
        for got, sent in zip(back, rows, strict=True):
            assert same(got, sent), (mode, got, sent)
        for separators in SEPARATORS[:2]:
            body = body_of(rows, offset, separators, False)
            decoded = decode_page(body, "GET", "/p", 200, offset, 1000, columns=mode)
            assert decoded.batch.equals(batch), (mode, separators)
        if processes is not None:
            body = body_of(rows, offset, SEPARATORS[0], False)
            remote = decode_page(
                body, "GET", "/p", 200, offset, 1000, decoder=processes, columns=mode
            )
            assert remote.batch.equals(batch), mode
    typed = rows_to_batch(rows, offset, columns="typed")
    extras = [loads_exact(e) if e else {} for e in typed.column("extra").to_pylist()]
    for name in TYPED_NAMES:
        column = typed.column(name).to_pylist()
        for i, row in enumerate(rows):
            if name in row and row[name] is not None and fits(name, row[name]):
                assert column[i] is not None, (name, row[name])
                assert name not in extras[i]
            else:
                assert column[i] is None
                assert (name in extras[i]) == (name in row)


# --- values near each column's shape: the ones that fit, and every way of not fitting -------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
NOT_STR = (
    st.none()
    | st.integers()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.just([])
)


def near_dict(required: dict[str, st.SearchStrategy[Any]], wrong: st.SearchStrategy[Any]) -> Any:
    """Dicts with exactly the ``required`` keys, or one key missing, one of the wrong type,
    or one key more."""
    exact = st.fixed_dictionaries(required)
    missing = exact.flatmap(
        lambda d: st.sampled_from(sorted(d)).map(lambda k: {x: v for x, v in d.items() if x != k})
    )
    retyped = st.tuples(exact, st.sampled_from(sorted(required)), wrong).map(
        lambda t: {**t[0], t[1]: t[2]}
    )
    more = st.tuples(exact, KEYS, JSON_SCALARS).map(lambda t: {**t[0], t[1]: t[2]})
    return exact | exact | missing | retyped | more


MESSAGE = near_dict({"role": TEXT, "content": TEXT}, NOT_STR)
USAGE = near_dict(
    {"prompt_tokens": INT64, "completion_tokens": INT64, "total_tokens": INT64},
    st.sampled_from([2**63, -(2**63) - 1, 1.0, "3", True, None]),
)
FUNCTION = near_dict({"name": TEXT, "arguments": JSON_VALUES}, NOT_STR)
TOOL_CALL = near_dict({"id": TEXT, "type": TEXT, "function": FUNCTION}, NOT_STR)
NEAR: dict[str, st.SearchStrategy[Any]] = {
    "messages": st.lists(MESSAGE, max_size=3) | MESSAGE,
    "usage": USAGE | st.lists(INT64, max_size=3),
    "finish_reason": TEXT | NOT_STR,
    "reward": st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([-0.0, 0.0, 1.0, 5e-324, 1e308])
    | st.integers()
    | st.booleans()
    | st.none()
    | TEXT,
    "tool_calls": st.lists(TOOL_CALL, max_size=3) | TOOL_CALL,
}
ROW = st.fixed_dictionaries(
    {}, optional={name: strategy | JSON_VALUES for name, strategy in NEAR.items()}
).flatmap(
    lambda typed: st.dictionaries(KEYS, JSON_VALUES, max_size=4).map(lambda other: other | typed)
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(rows=st.lists(ROW, max_size=6))
def test_any_rows_come_back_exactly_in_both_modes(
    processes: DecodeProcesses, rows: list[dict[str, Any]]
) -> None:
    check(rows, offset=7000, processes=processes)


def test_the_generated_rows_reach_both_outcomes() -> None:
    """The strategy is not vacuous: it makes values that fit every column and values that
    do not (checked on a fixed sample of it)."""
    seen: dict[tuple[str, bool], int] = {}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(row=ROW)
    def collect(row: dict[str, Any]) -> None:
        for name in TYPED_NAMES & row.keys():
            key = (name, row[name] is not None and fits(name, row[name]))
            seen[key] = seen.get(key, 0) + 1

    collect()
    assert {(name, ok) for name in TYPED_NAMES for ok in (True, False)} <= seen.keys()


def test_values_at_the_edges() -> None:
    rows: list[dict[str, Any]] = [
        {"reward": 1},  # an int: kept as the int it was
        {"reward": -0.0, "finish_reason": ""},
        {"reward": None, "finish_reason": None, "usage": None},  # explicit nulls
        {"usage": {"prompt_tokens": 2**63, "completion_tokens": 1, "total_tokens": 1}},
        {"usage": {"prompt_tokens": True, "completion_tokens": 1, "total_tokens": 1}},
        {"usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        {"messages": []},
        {"messages": [{"role": "assistant", "content": None}]},
        {"messages": [{"role": "user", "content": "hi", "name": "ada"}]},
        {"tool_calls": []},
        {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
        {
            "tool_calls": [
                {
                    "id": "c",
                    "type": "function",
                    "function": {"name": "f", "arguments": {"n": 2**70, "x": -0.0, "s": "é"}},
                },
                {"id": "d", "type": "function", "function": {"name": "g", "arguments": '{"a":1}'}},
                {"id": "e", "type": "function", "function": {"name": "h", "arguments": None}},
            ]
        },
        {"messages": "not a list", "usage": [1, 2, 3], "tool_calls": {"id": "x"}},
        {},
    ]
    check(rows)
    batch = rows_to_batch(rows, 0, columns="typed")
    assert batch.column("reward").to_pylist()[:3] == [None, -0.0, None]
    assert batch.column("extra")[0].as_py() == '{"reward":1}'
    assert batch.column("extra")[2].as_py() == '{"reward":null,"finish_reason":null,"usage":null}'
    calls = batch.column("tool_calls")[11].as_py()
    assert [c["function"]["arguments"] for c in calls] == [
        '{"n":1180591620717411303424,"x":-0.0,"s":"é"}',
        '"{\\"a\\":1}"',
        "null",
    ]
    assert batch.column("messages")[6].as_py() == []
    assert batch.column("extra")[13].as_py() is None


@pytest.mark.parametrize("dialect", ["docs", "spec"])
def test_emulator_rows_fill_the_typed_columns(dialect: str, processes: DecodeProcesses) -> None:
    shape = RowShape(model="Qwen/Qwen3-32B", num_traj_per_stimulus=3, odd_types=True)
    seen: set[str] = set()
    for start in (0, 1000, 2000, 3000):
        rows = [trajectory_row("r", "t", i, shape, dialect) for i in range(start, start + 1000)]  # type: ignore[arg-type]
        check(rows, offset=start, processes=processes if start == 1000 else None)
        batch = rows_to_batch(rows, start, columns="typed")
        seen |= {name for name in TYPED_NAMES if batch.column(name).null_count < len(rows)}
        # The service's undocumented fields all have their columns' shapes: only explicit
        # nulls and the odd ``tokens`` strings are left in ``extra``.
        for text in batch.column("extra").to_pylist():
            if text is not None:
                left = orjson.loads(text)
                assert all(left[k] is None for k in left.keys() & TYPED_NAMES), left
                assert left.keys() <= TYPED_NAMES | {"tokens"}, left
    assert seen == TYPED_NAMES


def test_a_bad_column_mode_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="columns must be 'json' or 'typed'"):
        ExportOptions(columns="arrow")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        rows_to_batch([], 0, columns="Typed")  # type: ignore[arg-type]


# --- the exporter ---------------------------------------------------------------------------


@pytest.fixture
def exporter(make_client: Callable[..., BreadClient]) -> BreadClient:
    return make_client()


@frozen
async def test_a_typed_export_has_one_schema_in_every_part(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=3500, rollout="complete")
    result = await exporter.export_rollout(
        "t", repo_name="r", dest=tmp_path, rows_per_part=1000, columns="typed"
    )
    assert result.parts_written == 4
    for file in result.files:
        # The first part has no tool_calls (they come after row 1,000): same schema anyway.
        assert pq.read_schema(file).remove_metadata() == TYPED_SCHEMA.remove_metadata()
    table = pq.read_table(tmp_path)
    assert batch_to_rows(table) == bread_emulator.trajectories("r", "t")
    assert table.column("tool_calls").null_count < table.num_rows
    manifest = load_manifest(tmp_path)
    assert manifest is not None
    assert manifest["identity"]["columns"] == manifest["schema"]["columns"] == "typed"
    assert [f["name"] for f in manifest["schema"]["fields"]] == TYPED_SCHEMA.names


@frozen
async def test_the_batch_stream_honours_the_mode(
    exporter: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=1500, rollout="complete")
    async with exporter.iter_rollout_batches("t", repo_name="r", columns="typed") as batches:
        got = [batch async for batch in batches]
    assert all(b.schema.equals(TYPED_SCHEMA) for b in got)
    assert batch_to_rows(pa.Table.from_batches(got)) == bread_emulator.trajectories("r", "t")


@frozen
async def test_an_export_in_the_other_mode_is_not_mixed_in(
    exporter: BreadClient, bread_emulator: Emulator, tmp_path: Path
) -> None:
    bread_emulator.add_target("r", "t", rows=1200, rollout="complete")
    await exporter.export_rollout("t", repo_name="r", dest=tmp_path, rows_per_part=500)
    with pytest.raises(ExportMismatchError, match="with columns='typed'; it was left untouched"):
        await exporter.export_rollout(
            "t", repo_name="r", dest=tmp_path, rows_per_part=500, columns="typed"
        )
    assert pq.read_schema(tmp_path / "part-00000.parquet").names == SCHEMA.names
    result = await exporter.export_rollout(
        "t", repo_name="r", dest=tmp_path, rows_per_part=500, columns="typed", resume=False
    )
    assert (result.parts_written, result.parts_reused) == (3, 0)
    assert pq.read_table(tmp_path).schema.names == TYPED_SCHEMA.names
    again = await exporter.export_rollout(
        "t", repo_name="r", dest=tmp_path, rows_per_part=500, columns="typed"
    )
    assert (again.parts_written, again.pages) == (0, 0)


@frozen
def test_the_cli_flag(bread_emulator: Emulator, tmp_path: Path) -> None:
    bread_emulator.add_target("r", "t", rows=1100, rollout="complete")
    done = run(
        "export",
        "t",
        "--repo",
        "r",
        "--out",
        str(tmp_path),
        "--columns",
        "typed",
        "--json",
        emulator=bread_emulator,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 1100
    folder = tmp_path / "repo=r" / "target=t"
    assert pq.read_table(folder).schema.names == TYPED_SCHEMA.names
    bad = run(
        "export",
        "t",
        "--repo",
        "r",
        "--out",
        str(tmp_path),
        "--columns",
        "arrow",
        emulator=bread_emulator,
    )
    assert bad.returncode == 2
    assert "invalid choice: 'arrow'" in bad.stderr
