"""The page decoder: every row comes back from the batch exactly as the service sent it, on
every decode path (orjson; Python's ``json`` for integers beyond 64 bits and for text
orjson's key count cannot vouch for), or the page is refused with a typed error."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breadasync import DataIntegrityError, ProtocolError
from breadasync.emulator import RowShape, trajectory_row
from breadasync.export import SCHEMA, SCHEMA_VERSION, batch_to_rows, rows_to_batch
from breadasync.export._decode_process import DecodeProcesses
from breadasync.export._reader import decode_page
from tests.decode_pages import page_body, realistic_page, realistic_row

SEPARATORS = [(",", ":"), (", ", ": "), (" , ", " : ")]
"""Compact (orjson's path), Python's default, and spacing before the colon (which sends the
page to Python's parser)."""


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, types and float bits included (1 is not 1.0, -0.0 not 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def body_of(
    rows: list[dict[str, Any]], offset: int, separators: tuple[str, str], ascii_: bool
) -> bytes:
    page = {"status": "complete", "lines": 10**6, "offset": offset, "limit": 1000}
    page |= {"has_more": True, "output": rows}
    return json.dumps(page, separators=separators, ensure_ascii=ascii_, allow_nan=False).encode()


@pytest.fixture
def processes() -> Iterator[DecodeProcesses]:
    """A child decoder (the decode path in a process), closed after the test."""
    with DecodeProcesses(1) as pool:
        yield pool


def check(
    rows: list[dict[str, Any]], offset: int = 5000, processes: DecodeProcesses | None = None
) -> None:
    """Every path gives back ``rows`` exactly: no early return, nothing skipped (the path
    in a child process too, when ``processes`` is given)."""
    reference = rows_to_batch(rows, offset)
    assert reference.schema == SCHEMA
    assert reference.column("row_offset").to_pylist() == list(range(offset, offset + len(rows)))
    back = batch_to_rows(reference)
    assert len(back) == len(rows)
    for got, sent in zip(back, rows, strict=True):
        assert same(got, sent), (got, sent)
    for separators in SEPARATORS:
        for ascii_ in (False, True):
            body = body_of(rows, offset, separators, ascii_)
            decoded = decode_page(body, "GET", "/p", 200, offset, max(1000, len(rows)))
            assert decoded.batch.equals(reference), (separators, ascii_)
    if processes is not None:
        body = body_of(rows, offset, SEPARATORS[0], False)
        remote = decode_page(body, "GET", "/p", 200, offset, 1000, decoder=processes)
        assert remote.batch.equals(reference)
        assert remote.status == "complete"
        assert remote.lines == 10**6


# --- exact values ------------------------------------------------------------------------


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63, 2**63 + 5, 2**64, 2**64 - 1, -(2**63) - 1, -(2**80), 10**400])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([-0.0, 0.0, 1.0, 1e308, -1e308, 5e-324, 2.0**63])
    | st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
)
KEYS = st.sampled_from(
    [
        *("stimulus", "stimulus_id", "trajectory_id", "response", "model", "temperature"),
        *("tokens", "extra", "offset", "row_offset", "", " ", '"', "\\", ":", '":', '\\":'),
        *("é", "\u2028"),
    ]
) | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
ROWS = st.lists(st.dictionaries(KEYS, JSON_VALUES, max_size=8), max_size=6)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(rows=ROWS)
def test_any_rows_come_back_exactly_on_every_path(
    processes: DecodeProcesses, rows: list[dict[str, Any]]
) -> None:
    check(rows, processes=processes)


SPACES = st.sampled_from(["", " ", "\n", "\t", "\r\n", "  "])


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    row=st.dictionaries(KEYS, JSON_VALUES, min_size=1, max_size=6),
    data=st.data(),
)
def test_a_duplicate_key_is_refused_whatever_the_spacing(
    processes: DecodeProcesses, row: dict[str, Any], data: st.DataObject
) -> None:
    """A row that names one key twice, with any whitespace around any of its colons (JSON
    allows it), is refused on every path: never merged into one value."""
    items = list(row.items())
    twice = data.draw(st.sampled_from(items), label="duplicated")
    items.insert(data.draw(st.integers(0, len(items)), label="at"), twice)
    members = []
    for key, value in items:
        before, after = data.draw(SPACES, label="before"), data.draw(SPACES, label="after")
        members.append(f"{json.dumps(key)}{before}:{after}{json.dumps(value)}")
    head = '{"status":"complete","lines":1000000,"offset":0,"limit":1000,"has_more":true,'
    body = (head + '"output":[{' + ",".join(members) + "}]}").encode()
    for decoder in (None, processes):
        with pytest.raises(ProtocolError, match="a key appears twice"):
            decode_page(body, "GET", "/p", 200, 0, 1000, decoder=decoder)


AWKWARD: list[Any] = [
    2**63 + 5,
    2**63 - 1,
    -(2**63),
    -(2**63) - 1,
    2**64,
    2**64 + 1,
    -(10**30),
    10**4000,
    -0.0,
    1e308,
    5e-324,
    "x" * 300_000,
    [[[[[[["deep"]]]]]]],
    "int on one row",
    True,
    None,
]
FIELDS = ["trajectory_id", "tokens", "temperature", "reward"]


@pytest.mark.parametrize("value", AWKWARD, ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_awkward_values_are_kept(field: str, value: Any) -> None:
    rows = [{field: value, "response": "a"}, {field: 7, "response": "b"}, {"response": "c"}]
    check(rows)


def test_awkward_values_are_kept_in_a_child_process(processes: DecodeProcesses) -> None:
    for field in FIELDS:
        for value in AWKWARD:
            check([{field: value}, {field: 7}, {"response": "c"}], processes=processes)


@pytest.mark.parametrize(
    "value", [2**64, -(2**63) - 1, 10**30, 2.0**63, -(2.0**63), 1e300], ids=repr
)
def test_big_numbers_deep_inside_a_row_or_beside_the_rows_are_exact(value: Any) -> None:
    # orjson reads such an integer as a float: wherever it sits, the page is reread exactly.
    rows = [{"response": "a", "meta": {"scores": [1, {"x": value}]}}, {"response": "b"}]
    page = {"status": "complete", "lines": 2, "offset": 0, "limit": 1000, "has_more": False}
    body = json.dumps({**page, "output": rows, "note": [value]}).encode()
    decoded = decode_page(body, "GET", "/p", 200, 0, 1000)
    back = batch_to_rows(decoded.batch)
    assert back == rows
    assert type(back[0]["meta"]["scores"][1]["x"]) is type(value)


def test_a_value_that_does_not_fit_its_column_is_in_extra() -> None:
    rows = [{"trajectory_id": 2**63 + 5}, {"trajectory_id": 3}, {"trajectory_id": "4"}]
    batch = rows_to_batch(rows, 0)
    assert batch.column("trajectory_id").to_pylist() == [None, 3, None]
    assert batch.column("extra").to_pylist() == [
        '{"trajectory_id":9223372036854775813}',
        None,
        '{"trajectory_id":"4"}',
    ]
    assert batch_to_rows(batch) == rows


def test_an_integer_temperature_stays_an_integer() -> None:
    rows = [{"temperature": 1, "response": "a"}, {"temperature": 0.5, "response": "b"}]
    check(rows)
    batch = rows_to_batch(rows, 0)
    assert batch.column("temperature").to_pylist() == [None, 0.5]
    assert type(batch_to_rows(batch)[0]["temperature"]) is int


def test_explicit_nulls_are_kept_and_absent_keys_stay_absent() -> None:
    rows = [{"tokens": None, "reward": None}, {"messages": [{"role": "u", "content": None}]}, {}]
    check(rows)
    assert batch_to_rows(rows_to_batch(rows, 0)) == rows


@pytest.mark.parametrize("dialect", ["docs", "spec"])
def test_realistic_pages(dialect: str, processes: DecodeProcesses) -> None:
    for start in (0, 1000, 5000, 9000):
        rows = [realistic_row(i, dialect) for i in range(start, start + 1000)]
        check(rows, offset=start, processes=processes)
        decoded = decode_page(page_body(rows, start), "GET", "/p", 200, start, 1000)
        assert batch_to_rows(decoded.batch) == rows


@pytest.mark.parametrize("dialect", ["docs", "spec"])
def test_emulator_pages(dialect: str, processes: DecodeProcesses) -> None:
    shape = RowShape(model="Qwen/Qwen3-32B", num_traj_per_stimulus=3, odd_types=True)
    for start in (0, 1000):
        rows = [trajectory_row("r", "t", i, shape, dialect) for i in range(start, start + 1000)]  # type: ignore[arg-type]
        check(rows, offset=start, processes=processes)


def test_the_documented_columns_hold_their_values() -> None:
    rows = [realistic_row(i) for i in range(1000)]
    batch = decode_page(realistic_page(0), "GET", "/p", 200, 0, 1000).batch
    assert batch.column("response").to_pylist() == [r["response"] for r in rows]
    assert batch.column("model").type == pa.dictionary(pa.int32(), pa.string())
    extra = [orjson.loads(e) if e else None for e in batch.column("extra").to_pylist()]
    assert extra[1] is None or "response" not in extra[1]
    assert sum(e is not None for e in extra) > 100  # nested fields, nulls: all kept


def test_the_schema_names_no_sql_reserved_word() -> None:
    assert SCHEMA_VERSION == 2
    assert SCHEMA.names[0] == "row_offset"
    assert "offset" not in SCHEMA.names
    assert SCHEMA.metadata == {b"breadasync.schema": b"2", b"breadasync.columns": b"json"}


# --- pages that are not the one asked for --------------------------------------------------


def test_a_page_that_is_not_a_page_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        decode_page(b"<html>", "GET", "/p?offset=0", 200, 0, 10)
    with pytest.raises(ProtocolError, match="output"):
        decode_page(orjson.dumps({"output": {"a": 1}}), "GET", "/p", 200, 0, 10)
    with pytest.raises(DataIntegrityError, match="offset 7"):
        decode_page(page_body([{"a": 1}], 7), "GET", "/p", 200, 0, 10)
    with pytest.raises(DataIntegrityError, match="more rows"):
        decode_page(page_body([{"a": 1}, {"a": 2}], 0), "GET", "/p", 200, 0, 1)
    with pytest.raises(ProtocolError, match="row 0"):
        decode_page(page_body([None], 0), "GET", "/p", 200, 0, 1)  # type: ignore[list-item]
