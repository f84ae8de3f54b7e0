"""The Arrow schema of exported trajectories, and the lossless conversion of rows to it.

Columns: ``row_offset`` (the row's position in the job's output, 0..lines-1; not
``offset``, a SQL reserved word), then the fields the docs and the spec name, then
``extra``: every other field of the row as JSON text.

A documented column holds a row's value only when the value has the column's type (and, for
an integer, fits in 64 bits); a value of another type (``"tokens": "42"``), an integer
beyond int64 or an explicit ``null`` goes into ``extra`` under its own key instead, so
nothing is dropped or silently coerced, and :func:`batch_to_rows` gives back rows equal to
the ones the service sent: the same keys, the same values, integers of any size, ``-0.0``
and the floats' exact bits. Key order inside a row is not kept: the documented fields come
back first, in the schema's order, then the others in the order the service sent them.
``extra`` is re-serialised JSON (compact, numbers spelled the shortest exact way), not the
service's bytes.

Two column modes (:data:`ColumnMode`). ``"json"`` (the default, :data:`SCHEMA`) keeps every
undocumented field in ``extra``. ``"typed"`` (:data:`TYPED_SCHEMA`) also gives the
undocumented fields a newer service sends (:data:`TYPED_FIELDS`: ``messages``, ``usage``,
``finish_reason``, ``reward``, ``tool_calls``) typed columns, declared up front so every
part and every page of an export has the same schema, whether or not a field has appeared
yet. The rule is the documented columns' rule: a value that does not have its column's
exact shape (a ``usage`` with a fourth key, a message with a ``null`` content, an integer
``reward``), an explicit ``null`` and any other field stay in ``extra``, so
:func:`batch_to_rows` gives back what the service sent in both modes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Literal

import pyarrow as pa

from breadasync._errors import InvalidArgumentError

from ._decode import dumps_exact, loads_exact

SCHEMA_VERSION: Final = 2
"""2: the row's position is ``row_offset`` (it was ``offset`` in 1)."""

ROW_OFFSET: Final = "row_offset"
"""The name of the column that holds each row's position in the job's output."""


DOCUMENTED: Final[tuple[tuple[str, pa.DataType, type], ...]] = (
    ("stimulus", pa.string(), str),
    ("stimulus_id", pa.int64(), int),  # exact types: a bool is not an int here
    ("trajectory_id", pa.int64(), int),
    ("response", pa.large_string(), str),
    ("model", pa.dictionary(pa.int32(), pa.string()), str),
    ("temperature", pa.float64(), float),  # an int is kept as the int it was, in ``extra``
    ("tokens", pa.int64(), int),
)
"""The fields the docs (``stimulus``, ``response``, ``model``, ``temperature``, ``tokens``)
and the spec (``stimulus_id``, ``trajectory_id``) name, with their column types."""

DOCUMENTED_NAMES: Final = frozenset(name for name, _, _ in DOCUMENTED)

ColumnMode = Literal["json", "typed"]
"""How undocumented fields are stored: ``"json"`` (as JSON text in ``extra``) or
``"typed"`` (the known ones in typed columns, see :data:`TYPED_FIELDS`)."""

COLUMN_MODES: Final[tuple[ColumnMode, ...]] = ("json", "typed")

_INT64: Final[tuple[int, int]] = (-(2**63), 2**63 - 1)
_NONE: Final = type(None)

MESSAGES_TYPE: Final = pa.list_(
    pa.struct([pa.field("role", pa.string()), pa.field("content", pa.large_string())])
)
USAGE_TYPE: Final = pa.struct(
    [
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("total_tokens", pa.int64()),
    ]
)
TOOL_CALLS_TYPE: Final = pa.list_(
    pa.struct(
        [
            pa.field("id", pa.string()),
            pa.field("type", pa.string()),
            pa.field(
                "function",
                pa.struct(
                    [pa.field("name", pa.string()), pa.field("arguments", pa.large_string())]
                ),
            ),
        ]
    )
)
"""``function.arguments`` holds the JSON text of whatever the service sent there (an object
in the realistic profile, a string of JSON in OpenAI's API): any value fits, exactly."""

_USAGE_KEYS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")


def _is_int64(value: Any) -> bool:
    return type(value) is int and _INT64[0] <= value <= _INT64[1]


def _fits_messages(value: Any) -> bool:
    if type(value) is not list:
        return False
    for message in value:
        if (
            type(message) is not dict
            or len(message) != 2
            or type(message.get("role")) is not str
            or type(message.get("content")) is not str
        ):
            return False
    return True


def _fits_usage(value: Any) -> bool:
    return (
        type(value) is dict
        and len(value) == len(_USAGE_KEYS)
        and all(_is_int64(value.get(key)) for key in _USAGE_KEYS)
    )


def _fits_tool_calls(value: Any) -> bool:
    if type(value) is not list:
        return False
    for call in value:
        if (
            type(call) is not dict
            or len(call) != 3
            or type(call.get("id")) is not str
            or type(call.get("type")) is not str
        ):
            return False
        function = call.get("function")
        if (
            type(function) is not dict
            or len(function) != 2
            or type(function.get("name")) is not str
            or "arguments" not in function
        ):
            return False
    return True


def _tool_calls_to_arrow(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": call["id"],
            "type": call["type"],
            "function": {
                "name": call["function"]["name"],
                "arguments": dumps_exact(call["function"]["arguments"]).decode(),
            },
        }
        for call in value
    ]


def _tool_calls_from_arrow(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": call["id"],
            "type": call["type"],
            "function": {
                "name": call["function"]["name"],
                "arguments": loads_exact(call["function"]["arguments"]),
            },
        }
        for call in value
    ]


_Convert = Callable[[Any], Any] | None

TYPED_FIELDS: Final[
    tuple[tuple[str, pa.DataType, Callable[[Any], bool], _Convert, _Convert], ...]
] = (
    ("messages", MESSAGES_TYPE, _fits_messages, None, None),
    ("usage", USAGE_TYPE, _fits_usage, None, None),
    ("finish_reason", pa.string(), lambda v: type(v) is str, None, None),
    ("reward", pa.float64(), lambda v: type(v) is float, None, None),
    ("tool_calls", TOOL_CALLS_TYPE, _fits_tool_calls, _tool_calls_to_arrow, _tool_calls_from_arrow),
)
"""The undocumented fields that ``columns="typed"`` stores in columns: name, column type,
the exact shape a value must have to go there, and the conversions to and from the column
(``None``: the value as it is)."""

TYPED_NAMES: Final = frozenset(name for name, *_ in TYPED_FIELDS)
_COLUMNED: Final = DOCUMENTED_NAMES | TYPED_NAMES


def _schema(columns: ColumnMode) -> pa.Schema:
    typed = [pa.field(name, kind) for name, kind, *_ in TYPED_FIELDS] if columns == "typed" else []
    return pa.schema(
        [pa.field(ROW_OFFSET, pa.int64(), nullable=False)]
        + [pa.field(name, kind) for name, kind, _ in DOCUMENTED]
        + typed
        + [pa.field("extra", pa.large_string())],
        metadata={
            b"breadasync.schema": str(SCHEMA_VERSION).encode(),
            b"breadasync.columns": columns.encode(),
        },
    )


SCHEMA: Final = _schema("json")
"""The schema of every exported part in the default column mode (``"json"``)."""

TYPED_SCHEMA: Final = _schema("typed")
"""The schema of every exported part with ``columns="typed"``: :data:`SCHEMA`'s columns
with those of :data:`TYPED_FIELDS` before ``extra``."""


def schema_for(columns: ColumnMode) -> pa.Schema:
    """The export schema of a column mode."""
    check_columns(columns)
    return TYPED_SCHEMA if columns == "typed" else SCHEMA


def check_columns(columns: Any) -> None:
    """Raise :class:`~breadasync.InvalidArgumentError` unless ``columns`` is a column mode."""
    if columns not in COLUMN_MODES:
        raise InvalidArgumentError(f"columns must be 'json' or 'typed', not {columns!r}")


def rows_to_batch(
    rows: list[dict[str, Any]], offset: int, *, columns: ColumnMode = "json"
) -> pa.RecordBatch:
    """Rows ``offset``, ``offset+1``... as a record batch of :func:`schema_for`
    ``(columns)``, exactly."""
    schema = schema_for(columns)
    count = len(rows)
    arrays: list[pa.Array] = [pa.array(range(offset, offset + count), pa.int64())]
    misfits: dict[int, list[str]] = {}
    for name, kind, accepted in DOCUMENTED:
        values: list[Any] = [row.get(name) for row in rows]
        types = set(map(type, values))
        if _NONE in types:
            # None is an absent key or an explicit null; the second is kept, in ``extra``.
            for i, value in enumerate(values):
                if value is None and name in rows[i]:
                    misfits.setdefault(i, []).append(name)
        if not types <= {accepted, _NONE} or (accepted is int and not _fits(values, types)):
            for i, value in enumerate(values):
                if value is not None and (
                    type(value) is not accepted or (accepted is int and not _fits([value], types))
                ):
                    misfits.setdefault(i, []).append(name)
                    values[i] = None
        if name == "model":
            arrays.append(pa.array(values, pa.string()).dictionary_encode())
        else:
            arrays.append(pa.array(values, kind))
    names = DOCUMENTED_NAMES
    if columns == "typed":
        names = _COLUMNED
        for name, kind, fits, to_arrow, _ in TYPED_FIELDS:
            # Most rows carry none of these fields: visit only those that do.
            present = [i for i, row in enumerate(rows) if name in row]
            if not present:
                arrays.append(pa.nulls(count, kind))
                continue
            column: list[Any] = [None] * count
            for i in present:
                value = rows[i][name]
                if value is None or not fits(value):
                    misfits.setdefault(i, []).append(name)  # an explicit null, or a misfit
                else:
                    column[i] = value if to_arrow is None else to_arrow(value)
            arrays.append(pa.array(column, kind))
    extras: list[bytes | None] = [None] * count
    for i, row in enumerate(rows):
        also = misfits.get(i)
        if also or not row.keys() <= names:
            extras[i] = _extra(row, also, names)
    arrays.append(pa.array(extras, pa.large_binary()).cast(pa.large_string()))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _fits(values: list[Any], types: set[type]) -> bool:
    """Whether every int among ``values`` fits in int64."""
    ints = [v for v in values if v is not None] if _NONE in types else values
    return not ints or (_INT64[0] <= min(ints) and max(ints) <= _INT64[1])


def _extra(row: dict[str, Any], also: list[str] | None, names: frozenset[str]) -> bytes:
    """The row's ``extra`` value: its fields without a column (``names``) and those in
    ``also`` (which their columns cannot hold), as JSON, in the row's own key order."""
    return dumps_exact({k: v for k, v in row.items() if k not in names or (also and k in also)})


def batch_to_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """The rows of an exported batch or table, as the service sent them (the inverse of
    :func:`rows_to_batch` in either column mode, told by the columns present;
    ``row_offset`` left out; key order: see the module's notes)."""
    data = batch.to_pydict()
    names = [name for name, _, _ in DOCUMENTED]
    typed = [
        (name, convert) for name, _, _, _, convert in TYPED_FIELDS if name in batch.schema.names
    ]
    rows = []
    for i in range(batch.num_rows):
        row = {name: data[name][i] for name in names if data[name][i] is not None}
        for name, convert in typed:
            value = data[name][i]
            if value is not None:
                row[name] = value if convert is None else convert(value)
        extra = data["extra"][i]
        if extra is not None:
            row.update(loads_exact(extra))
        rows.append(row)
    return rows
