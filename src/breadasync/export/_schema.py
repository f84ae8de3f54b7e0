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
"""

from __future__ import annotations

from typing import Any, Final

import pyarrow as pa

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

SCHEMA: Final = pa.schema(
    [pa.field(ROW_OFFSET, pa.int64(), nullable=False)]
    + [pa.field(name, kind) for name, kind, _ in DOCUMENTED]
    + [pa.field("extra", pa.large_string())],
    metadata={b"breadasync.schema": str(SCHEMA_VERSION).encode()},
)
"""The schema of every exported part."""


_INT64: Final[tuple[int, int]] = (-(2**63), 2**63 - 1)
_NONE: Final = type(None)


def rows_to_batch(rows: list[dict[str, Any]], offset: int) -> pa.RecordBatch:
    """Rows ``offset``, ``offset+1``... as a record batch of :data:`SCHEMA`, exactly."""
    count = len(rows)
    columns: list[pa.Array] = [pa.array(range(offset, offset + count), pa.int64())]
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
            columns.append(pa.array(values, pa.string()).dictionary_encode())
        else:
            columns.append(pa.array(values, kind))
    extras: list[bytes | None] = [None] * count
    for i, row in enumerate(rows):
        also = misfits.get(i)
        if also or not row.keys() <= DOCUMENTED_NAMES:
            extras[i] = _extra(row, also)
    columns.append(pa.array(extras, pa.large_binary()).cast(pa.large_string()))
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def _fits(values: list[Any], types: set[type]) -> bool:
    """Whether every int among ``values`` fits in int64."""
    ints = [v for v in values if v is not None] if _NONE in types else values
    return not ints or (_INT64[0] <= min(ints) and max(ints) <= _INT64[1])


def _extra(row: dict[str, Any], also: list[str] | None) -> bytes:
    """The row's ``extra`` value: its undocumented fields and the documented ones in
    ``also`` (which the columns cannot hold), as JSON, in the row's own key order."""
    return dumps_exact(
        {k: v for k, v in row.items() if k not in DOCUMENTED_NAMES or (also and k in also)}
    )


def batch_to_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """The rows of an exported batch or table, as the service sent them (the inverse of
    :func:`rows_to_batch`, ``row_offset`` left out; key order: see the module's notes)."""
    data = batch.to_pydict()
    names = [name for name, _, _ in DOCUMENTED]
    rows = []
    for i in range(batch.num_rows):
        row = {name: data[name][i] for name in names if data[name][i] is not None}
        extra = data["extra"][i]
        if extra is not None:
            row.update(loads_exact(extra))
        rows.append(row)
    return rows
