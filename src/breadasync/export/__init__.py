"""The bulk exporter: rollout output to Parquet, in parallel, exact and resumable.

Use it through the client (``client.export_rollout``, ``client.export_many``,
``client.iter_rollout_batches``); this package holds the pieces: the schema and its
lossless row conversion, the page decoder and its limits, the export plan, the range reader
and the destination seam
(:class:`Destination`, with a local folder and a ``pyarrow.fs`` implementation).
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from breadasync._lazy import lazy_names as _lazy_names

if _TYPE_CHECKING:
    from ._decode import DEFAULT_LIMITS, DecodeLimits
    from ._decode_process import DecodeProcesses
    from ._dest import Destination, DestinationLike, resolve_destination
    from ._manifest import MANIFEST_KEY, load_manifest
    from ._many import hive_segment
    from ._objstore import FsDestination
    from ._options import ExportOptions, ExportProgress, ExportResult, ExportResults
    from ._plan import ExportPlan, Part
    from ._schema import (
        SCHEMA,
        SCHEMA_VERSION,
        TYPED_SCHEMA,
        ColumnMode,
        batch_to_rows,
        rows_to_batch,
        schema_for,
    )
    from ._store import LocalDestination, PartRecord

_LAZY = {
    **dict.fromkeys(("DEFAULT_LIMITS", "DecodeLimits"), "._decode"),
    "DecodeProcesses": "._decode_process",
    **dict.fromkeys(("Destination", "DestinationLike", "resolve_destination"), "._dest"),
    **dict.fromkeys(("MANIFEST_KEY", "load_manifest"), "._manifest"),
    "hive_segment": "._many",
    "FsDestination": "._objstore",
    **dict.fromkeys(
        ("ExportOptions", "ExportProgress", "ExportResult", "ExportResults"), "._options"
    ),
    **dict.fromkeys(("ExportPlan", "Part"), "._plan"),
    **dict.fromkeys(
        (
            "SCHEMA",
            "SCHEMA_VERSION",
            "TYPED_SCHEMA",
            "ColumnMode",
            "batch_to_rows",
            "rows_to_batch",
            "schema_for",
        ),
        "._schema",
    ),
    **dict.fromkeys(("LocalDestination", "PartRecord"), "._store"),
}
"""Names loaded on first use (PEP 562): a decoding child process imports the decoder
alone, not the exporter and the client behind it."""


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)

__all__ = [
    "DEFAULT_LIMITS",
    "MANIFEST_KEY",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TYPED_SCHEMA",
    "ColumnMode",
    "DecodeLimits",
    "DecodeProcesses",
    "Destination",
    "DestinationLike",
    "ExportOptions",
    "ExportPlan",
    "ExportProgress",
    "ExportResult",
    "ExportResults",
    "FsDestination",
    "LocalDestination",
    "Part",
    "PartRecord",
    "batch_to_rows",
    "hive_segment",
    "load_manifest",
    "resolve_destination",
    "rows_to_batch",
    "schema_for",
]
