"""The Arrow schema of exported trajectories, and the lossless conversion of rows to it.

Columns: ``offset`` (the row's position in the job's output, 0..lines-1), then the fields
the docs and the spec name, then ``extra``: every other field of the row as JSON text.

A documented column holds a row's value only when the value has the column's type; a
value of another type (``"tokens": "42"``) or an explicit ``null`` goes into ``extra``
under its own key instead, so nothing is dropped or silently coerced, and
:func:`batch_to_rows` gives back rows equal to the ones the service sent.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
import pyarrow as pa

SCHEMA_VERSION: Final = 1

_STRING = (str,)
_INT = (int,)  # bool is excluded by checking the exact type
_NUMBER = (float, int)

DOCUMENTED: Final[tuple[tuple[str, pa.DataType, tuple[type, ...]], ...]] = (
    ("stimulus", pa.string(), _STRING),
    ("stimulus_id", pa.int64(), _INT),
    ("trajectory_id", pa.int64(), _INT),
    ("response", pa.large_string(), _STRING),
    ("model", pa.dictionary(pa.int32(), pa.string()), _STRING),
    ("temperature", pa.float64(), _NUMBER),
    ("tokens", pa.int64(), _INT),
)
"""The fields the docs (``stimulus``, ``response``, ``model``, ``temperature``, ``tokens``)
and the spec (``stimulus_id``, ``trajectory_id``) name, with their column types."""

DOCUMENTED_NAMES: Final = frozenset(name for name, _, _ in DOCUMENTED)

SCHEMA: Final = pa.schema(
    [pa.field("offset", pa.int64(), nullable=False)]
    + [pa.field(name, kind) for name, kind, _ in DOCUMENTED]
    + [pa.field("extra", pa.large_string())],
    metadata={b"breadasync.schema": str(SCHEMA_VERSION).encode()},
)
"""The schema of every exported part."""


def rows_to_batch(rows: list[dict[str, Any]], offset: int) -> pa.RecordBatch:
    """Rows ``offset``, ``offset+1``... as a record batch of :data:`SCHEMA`."""
    count = len(rows)
    columns: list[pa.Array] = [pa.array(range(offset, offset + count), pa.int64())]
    misfits: dict[int, list[str]] = {}
    for name, kind, accepted in DOCUMENTED:
        values = [row.get(name) for row in rows]
        for i, value in enumerate(values):
            if value is None:
                if name in rows[i]:  # an explicit null is kept, in ``extra``
                    misfits.setdefault(i, []).append(name)
            elif type(value) not in accepted:
                misfits.setdefault(i, []).append(name)
                values[i] = None
        if name == "model":
            columns.append(pa.array(values, pa.string()).dictionary_encode())
        else:
            columns.append(pa.array(values, kind))
    extras: list[bytes | None] = []
    for i, row in enumerate(rows):
        keys = row.keys() - DOCUMENTED_NAMES
        kept = misfits.get(i)
        if not keys and not kept:
            extras.append(None)
            continue
        # Keep the row's own key order, for a faithful round trip.
        wanted = keys.union(kept) if kept else keys
        extras.append(orjson.dumps({k: v for k, v in row.items() if k in wanted}))
    columns.append(pa.array(extras, pa.large_binary()).cast(pa.large_string()))
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def batch_to_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """The rows of an exported batch or table, as the service sent them (the inverse of
    :func:`rows_to_batch`, ``offset`` left out)."""
    data = batch.to_pydict()
    names = [name for name, _, _ in DOCUMENTED]
    rows = []
    for i in range(batch.num_rows):
        row = {name: data[name][i] for name in names if data[name][i] is not None}
        extra = data["extra"][i]
        if extra is not None:
            row.update(orjson.loads(extra))
        rows.append(row)
    return rows
