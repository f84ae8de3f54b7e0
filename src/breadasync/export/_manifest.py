"""The manifest, an export's commit point, stored where every reader of the folder copes.

A reader handed the folder must see the parts and nothing else it chokes on. pyarrow,
pandas, DuckDB's Hive reader and Spark skip ``_``- and ``.``-prefixed files, but polars
(``read_parquet``/``scan_parquet`` on a folder) takes every non-empty file below it and
refuses a folder whose files do not all end in ``.parquet``. So the manifest is
``_manifest.parquet``: a Parquet file of the export's own schema with no rows, the manifest
as JSON in its footer's key-value metadata (key ``breadasync.manifest``). Readers that see
it read zero rows of the same columns; readers that skip ``_`` files never open it.

An export written before this layout has ``_manifest.json``; it is still read (so such an
export resumes) and removed when the export next commits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ._dest import Destination
from ._store import MANIFEST, DamagedDocumentError, LocalDestination

MANIFEST_KEY: Final = b"breadasync.manifest"
"""The footer metadata key that holds the manifest's JSON."""

LEGACY_MANIFEST: Final = "_manifest.json"
"""Where exports before the polars-readable layout kept their manifest."""


def encode_manifest(manifest: dict[str, Any], schema: pa.Schema) -> bytes:
    """``manifest`` as the bytes of a row-less Parquet file of ``schema``."""
    meta = {**(schema.metadata or {}), MANIFEST_KEY: orjson.dumps(manifest)}
    sink = pa.BufferOutputStream()
    pq.write_table(schema.with_metadata(meta).empty_table(), sink, compression="zstd")
    return bytes(sink.getvalue().to_pybytes())


def decode_manifest(raw: bytes) -> dict[str, Any] | None:
    """The manifest in ``raw`` (a file written by :func:`encode_manifest`), or ``None``."""
    try:
        meta = pq.read_metadata(pa.BufferReader(raw)).metadata or {}
        data = orjson.loads(meta[MANIFEST_KEY])
    except (pa.ArrowException, KeyError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(store: Destination) -> dict[str, Any] | None:
    """The manifest of the export in ``store`` (either layout), or ``None``.

    Raises:
        DamagedDocumentError: A manifest is there but empty, cut short or unreadable.
    """
    raw = store.read_bytes(MANIFEST)
    if raw is not None:
        manifest = decode_manifest(raw)
        if manifest is None:
            reason = "empty" if not raw.strip() else "truncated or not a manifest"
            raise DamagedDocumentError(MANIFEST, reason)
        return manifest
    legacy = store.read_json(LEGACY_MANIFEST)
    return legacy if isinstance(legacy, dict) else None


def write_manifest(store: Destination, manifest: dict[str, Any], schema: pa.Schema) -> None:
    """Commit ``manifest`` atomically (and drop a legacy ``_manifest.json``)."""
    store.write_bytes(MANIFEST, encode_manifest(manifest, schema))
    store.remove(LEGACY_MANIFEST)


def remove_manifest(store: Destination) -> None:
    """Remove the manifest, in either layout."""
    store.remove(MANIFEST)
    store.remove(LEGACY_MANIFEST)


def load_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of the export in ``folder`` (one target's folder), or ``None`` if it
    has none (not exported, or not committed yet)."""
    return read_manifest(LocalDestination(folder))
