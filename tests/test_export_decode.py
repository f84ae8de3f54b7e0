"""The fast page decoder (Arrow's JSON reader) against the reference one (orjson): the
same rows out, for every kind of awkward page, or a deferral to the reference path."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pyarrow as pa
import pytest

from breadasync.emulator import RowShape, trajectory_row
from breadasync.export import SCHEMA, batch_to_rows, rows_to_batch
from breadasync.export._schema import fast_page_to_batch


def page(rows: list[dict[str, Any]], offset: int = 0, **extra: Any) -> bytes:
    body = {
        "status": "complete",
        "lines": 10**6,
        "offset": offset,
        "limit": 1000,
        "has_more": True,
        "output": rows,
        **extra,
    }
    return orjson.dumps(body)


def exact(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, option=orjson.OPT_SORT_KEYS)


def check(rows: list[dict[str, Any]], *, must_be_fast: bool | None = None) -> None:
    body = page(rows, offset=5000)
    fast = fast_page_to_batch(body, 5000)
    if must_be_fast is not None:
        assert (fast is not None) == must_be_fast
    reference = rows_to_batch(rows, 5000)
    if fast is None:
        return
    assert fast.batch.schema == SCHEMA
    assert fast.batch.column("offset").to_pylist() == list(range(5000, 5000 + len(rows)))
    got = batch_to_rows(fast.batch)
    # Equal as JSON, so an int that came back a float (1 vs 1.0) would show.
    assert [exact(r) for r in got] == [exact(r) for r in rows]
    # The documented columns are the reference's, to the bit.
    for name in SCHEMA.names[:-1]:
        assert fast.batch.column(name).equals(reference.column(name)), name


@pytest.mark.parametrize("dialect", ["docs", "spec"])
def test_emulator_pages(dialect: str) -> None:
    shape = RowShape(model="Qwen/Qwen3-32B", num_traj_per_stimulus=3)
    for start in range(0, 20_000, 1000):
        rows = [trajectory_row("r", "t", i, shape, dialect) for i in range(start, start + 1000)]  # type: ignore[arg-type]
        check(rows)


def test_fast_path_is_taken_for_ordinary_pages() -> None:
    shape = RowShape(model="m")
    check([trajectory_row("r", "t", i, shape) for i in range(1000)], must_be_fast=True)
    check(
        [{"stimulus": "s", "response": "r", "model": "m", "temperature": 1.0, "tokens": 3}],
        must_be_fast=True,
    )


@pytest.mark.parametrize(
    ("rows", "fast"),
    [
        # values of other types than their column: the reference keeps them in ``extra``
        ([{"tokens": "42"}, {"tokens": 7}], False),
        ([{"tokens": True}], False),
        ([{"tokens": 2.0}], False),
        ([{"temperature": "hot"}], False),
        ([{"response": ["a", "b"]}], False),
        ([{"response": "2024-01-01T00:00:00"}], False),  # Arrow would read a timestamp
        # explicit nulls are kept as such
        ([{"tokens": None, "response": "x"}], None),
        ([{"tokens": None}, {"tokens": 3}], True),
        ([{"reward": None}], None),
        ([{"messages": [{"role": "user", "content": None}]}], True),
        # undocumented fields of every shape
        ([{"meta": {"a": 1, "b": [1, 2]}}, {"meta": {"a": 2}}], True),
        ([{"meta": [1, {"c": "d"}]}], None),
        ([{"reward": 1}, {"reward": 0.5}], True),  # int and float mixed: orjson for extra
        ([{"reward": 1.0}], True),  # a whole float may have been an int: orjson for extra
        ([{"reward": 0.25}, {"other": True}], True),
        ([{"created": "2024-01-01"}], True),  # Arrow reads a timestamp: orjson for extra
        ([{"x": 'line\nbreak "quoted" é 😀 \x00 tab\t'}], True),
        ([{"x": {}}, {"x": {"y": []}}], True),
        ([{"x": [1, None, 2]}], True),
        ([{"a": 1, "b": 2}, {"b": 3, "a": 4}], True),
        ([{"stimulus_id": 1, "trajectory_id": 2, "stimulus": "s"}], True),
        ([], True),
    ],
)
def test_awkward_rows(rows: list[dict[str, Any]], fast: bool | None) -> None:
    check(rows, must_be_fast=fast)


def test_integers_beyond_64_bits_match_the_reference() -> None:
    body = (
        b'{"status":"complete","lines":1,"offset":0,"limit":1,"has_more":false,'
        b'"output":[{"n":1180591620717411303424}]}'
    )
    fast = fast_page_to_batch(body, 0)
    assert fast is not None
    reference = rows_to_batch(orjson.loads(body)["output"], 0)
    assert fast.batch.column("extra").equals(reference.column("extra"))


def test_an_integer_temperature_stays_an_integer() -> None:
    rows = [{"temperature": 1, "response": "a"}, {"temperature": 0.5, "response": "b"}]
    check(rows, must_be_fast=False)
    batch = rows_to_batch(rows, 0)
    assert batch.column("temperature").to_pylist() == [None, 0.5]
    assert batch_to_rows(batch) == rows
    assert type(batch_to_rows(batch)[0]["temperature"]) is int


def test_random_rows_round_trip() -> None:
    rng = random.Random(7)
    values: list[Any] = [
        "text",
        "é",
        "",
        0,
        -5,
        3.5,
        -0.125,
        True,
        False,
        None,
        [1, "a"],
        {"k": "v"},
        {"k": None},
        [],
        {},
    ]
    keys = [
        "stimulus",
        "response",
        "model",
        "temperature",
        "tokens",
        "stimulus_id",
        "trajectory_id",
        "reward",
        "messages",
        "finish_reason",
        "extra",
        "offset",
    ]
    for _ in range(300):
        rows = [
            {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 6))}
            for _ in range(rng.randint(1, 8))
        ]
        check(rows)


def test_a_page_that_is_not_a_page_is_deferred() -> None:
    assert fast_page_to_batch(b"<html>", 0) is None
    assert (
        fast_page_to_batch(
            orjson.dumps(
                {
                    "output": {"a": 1},
                    "status": "complete",
                    "offset": 0,
                    "limit": 1,
                    "has_more": False,
                }
            ),
            0,
        )
        is None
    )
    assert fast_page_to_batch(page([{"a": 1}], offset=7), 0) is None  # wrong offset
    assert fast_page_to_batch(page([None, {"a": 1}]), 0) is None  # type: ignore[list-item]
    assert fast_page_to_batch(page([{"a": 1}], lines="many"), 0) is None


def test_extra_keeps_every_other_field_as_json() -> None:
    rows = [{"response": "r", "reward": 0.5, "messages": [{"role": "user", "content": "hi"}]}]
    fast = fast_page_to_batch(page(rows), 0)
    assert fast is not None
    extra = orjson.loads(fast.batch.column("extra")[0].as_py())
    assert extra == {"reward": 0.5, "messages": [{"role": "user", "content": "hi"}]}
    assert fast.batch.column("model").type == pa.dictionary(pa.int32(), pa.string())


def test_an_integer_temperature_is_found_whatever_the_spacing() -> None:
    body = (
        b'{"status": "complete", "lines": 2, "offset": 0, "limit": 2, "has_more": false, '
        b'"output": [{"temperature" : 1, "response": "a"}, {"temperature": 0.5}]}'
    )
    assert fast_page_to_batch(body, 0) is None  # the reference path keeps the int
