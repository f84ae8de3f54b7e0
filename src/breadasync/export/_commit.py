"""The commit and resume protocol, on any :class:`~breadasync.export.Destination`.

Order of writes, which every guarantee rests on:

1. ``reconcile``: a destination holding another export (another identity, a dataset of
   several targets) is refused before anything in it changes. Otherwise the journal is
   reset (one atomic write) to this export's identity plus the parts kept, and only then is
   the manifest removed: a crash in between leaves one of them vouching for the parts.
2. Each part is written out of sight, made visible whole (``commit_part``), then recorded
   in the journal.
3. ``commit``: the manifest (identity, parts with rows and SHA-256) is written last: it is
   the commit point. The journal goes after it.

Resume keeps a part only if the manifest or journal of the same identity vouches for it and
its size, footer row count and SHA-256 match; the rest is refetched. The identity is an
opaque dict made by the exporter and compared key by key (:func:`same`).

Every function blocks: the exporter calls them from a worker thread.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from breadasync._errors import DataIntegrityError, ExportMismatchError

from ._dest import Destination, PartSink
from ._manifest import read_manifest, remove_manifest, write_manifest
from ._plan import Part, describe_job
from ._store import JOURNAL, DamagedDocumentError, PartRecord

ROW_GROUP_ROWS = 16_384
"""Rows buffered before a row group is written: big enough for readers, small enough to
keep memory flat."""


def same(found: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether an identity found in the destination is the one wanted."""
    # An export written before column modes existed is a "json" one.
    found = {"columns": "json", **found}
    return all(found.get(key) == value for key, value in wanted.items())


def in_mode(columns: Any) -> str:
    """The column mode in words, where it is not the default."""
    return f", with columns={columns!r}" if columns != "json" else ""


def describe(found: dict[str, Any]) -> str:
    """An identity, in words."""
    return _words(found) or "something else"


def _words(found: dict[str, Any]) -> str | None:
    if not (isinstance(found.get("lines"), int) and isinstance(found.get("rows_per_part"), int)):
        return None
    return (
        f"{found.get('repo')}/{found.get('target')} with {found['lines']:,} lines "
        f"in parts of {found['rows_per_part']:,} rows "
        f"({describe_job(found.get('job'))}){in_mode(found.get('columns', 'json'))}"
    )


class PartWriter:
    """Writes one part (blocking calls, made from a worker thread).

    Args:
        store: The destination.
        identity: The export's identity, recorded in the part's footer metadata.
        part: The part to write.
        compression: Parquet compression (``"none"`` for none).
        schema: The export's schema (one per column mode, the same in every part).
    """

    def __init__(
        self,
        store: Destination,
        identity: dict[str, Any],
        part: Part,
        compression: str,
        schema: pa.Schema,
    ) -> None:
        self.part = part
        self.rows = 0
        self._store = store
        self._schema = schema
        self._file: PartSink = store.open_part(part.name)
        meta = {
            b"breadasync.export": orjson.dumps(
                {**identity, "start": part.start, "stop": part.stop}
            ),
        }
        try:
            self._writer = pq.ParquetWriter(
                self._file,
                schema.with_metadata({**(schema.metadata or {}), **meta}),
                compression=None if compression == "none" else compression,
            )
        except BaseException:
            store.discard_part(self._file)
            raise
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.committed = False

    def add(self, batches: list[pa.RecordBatch]) -> None:
        """Buffer ``batches``; write a row group once enough rows are buffered."""
        for batch in batches:
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one row group."""
        if self._pending:
            table = pa.Table.from_batches(self._pending, self._schema)
            self._writer.write_table(table, row_group_size=table.num_rows)
            self.rows += self._pending_rows
            self._pending, self._pending_rows = [], 0

    @property
    def done(self) -> bool:
        """Whether every row of the part has arrived."""
        return self.rows + self._pending_rows >= self.part.rows

    def commit(self) -> PartRecord:
        """Finish the part and make it visible whole; its record for the journal."""
        self.flush()
        if self.rows != self.part.rows:
            raise DataIntegrityError(
                f"part {self.part.name} got {self.rows:,} rows instead of {self.part.rows:,}"
            )
        self._writer.close()
        self._store.commit_part(self._file)
        self.committed = True
        # Arrow's allocator keeps freed blocks for reuse; hand them back between parts so a
        # long export's footprint stays flat.
        pa.default_memory_pool().release_unused()
        return PartRecord(
            self.part.name,
            self.part.start,
            self.part.stop,
            self.rows,
            self._file.size,
            self._file.digest(),
        )

    def discard(self) -> None:
        """Abandon the part: nothing appears under its final name."""
        with contextlib.suppress(Exception):  # the part is abandoned anyway
            self._writer.close()
        self._store.discard_part(self._file)


def _damaged(store: Destination, exc: DamagedDocumentError) -> ExportMismatchError:
    return ExportMismatchError(
        f"{store.display!r} holds a damaged {exc.name} ({exc.reason}), so the export in it "
        "cannot be resumed; pass resume=False (--no-resume on the command line) to replace it",
        dest=store.display,
    )


def reconcile(
    store: Destination,
    parts: list[Part],
    wanted: dict[str, Any],
    *,
    resume: bool,
    what: str,
) -> tuple[list[PartRecord], list[Part], bool]:
    """Decide which stored parts to keep and which to fetch; start (or continue) the
    journal. Returns the kept records, the parts to fetch, and whether the destination
    already holds this export, whole and committed.

    Args:
        store: The destination (its lock held).
        parts: The export's parts, in order.
        wanted: The export's identity (``repo`` and ``target`` name the target).
        resume: Keep verified parts (else replace an earlier export of the same target).
        what: The export in words, for errors (``"r/t with 10 lines in parts of 5 rows"``).

    Raises:
        ExportMismatchError: The destination holds another export, a dataset, or (with
            ``resume``) a damaged manifest; nothing in it was changed.
    """
    shown = store.display
    if store.holds_dataset():
        raise ExportMismatchError(
            f"{shown!r} holds a dataset of several targets (repo=... folders); export one "
            "target into a folder of its own, or use export_many on this one",
            dest=shown,
        )
    damaged = False
    try:
        manifest = read_manifest(store)
    except DamagedDocumentError as exc:
        if resume:
            raise _damaged(store, exc) from None
        manifest, damaged = None, True  # resume=False: the caller asked to replace it
    journal = store.read_journal()
    found: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    if isinstance(manifest, dict):
        found = manifest.get("identity") if isinstance(manifest.get("identity"), dict) else {}
        records = manifest.get("parts") or []
    elif journal:
        found, records = journal[0], journal[1:]
    elif names := store.part_names():
        found = {}
        if damaged:
            # No manifest to go by: the parts' footers say whose they are, so a damaged
            # manifest never lets resume=False replace another target's export.
            footer = store.part_identity(min(names))
            if footer is not None and _same_target(footer, wanted):
                found = None
    is_same = found is not None and same(found, wanted)
    if found is not None and not is_same:
        same_target = _same_target(found, wanted)
        if not (same_target and not resume):
            raise ExportMismatchError(
                f"{shown!r} already holds an export of {describe(found)}, not of "
                # The job named too: a re-run has the same lines and parts.
                f"{_words(wanted) or what}; "
                "it was left untouched. Choose another folder"
                + (", or pass resume=False to replace it" if same_target else ""),
                dest=shown,
            )
    store.remove_stale()
    keep: list[PartRecord] = []
    if resume and is_same:
        by_name = {p.name: p for p in parts}
        for entry in records:
            try:
                record = PartRecord(**entry)
            except TypeError:
                continue
            part = by_name.get(record.name)
            if part is None or (record.start, record.stop) != (part.start, part.stop):
                continue
            if store.verify_part(record) is None:
                keep.append(record)
    kept = {r.name for r in keep}
    todo = [p for p in parts if p.name not in kept]
    if not todo and is_same and isinstance(manifest, dict):
        if journal:
            store.remove(JOURNAL)  # left by a run that died right after its manifest
        return keep, todo, True  # a whole, verified export: leave its parts as they are
    # The journal first (atomically), then the manifest goes: a crash in between leaves
    # one of them vouching for the parts, never neither. The manifest vouches for a whole
    # export, so it must not stand beside a part being rewritten.
    store.reset_journal({**wanted, "started": datetime.now(UTC).isoformat()})
    for record in keep:
        store.append_journal(record.to_dict())
    remove_manifest(store)
    for name in store.part_names() - kept - {p.name for p in parts}:
        store.remove(name)  # parts of an earlier, replaced layout
    return keep, todo, False


def _same_target(one: dict[str, Any], other: dict[str, Any]) -> bool:
    return (one.get("repo"), one.get("target")) == (other.get("repo"), other.get("target"))


def commit(store: Destination, manifest: dict[str, Any], schema: pa.Schema) -> None:
    """Write the manifest (in a row-less Parquet file of ``schema``: see
    :mod:`breadasync.export._manifest`), the commit point, then drop the journal it
    supersedes."""
    check = getattr(store, "check_lease", None)
    if check is not None:
        check()  # a lease taken over meanwhile: do not commit over another exporter
    write_manifest(store, manifest, schema)
    store.remove(JOURNAL)


def refuse_single_export(root: Destination) -> None:
    """Refuse a dataset root that holds the export of a single target.

    Raises:
        ExportMismatchError: It does (a damaged manifest counts).
    """
    try:
        single = read_manifest(root) is not None
    except DamagedDocumentError:
        single = True
    if single or root.read_journal() or root.part_names():
        raise ExportMismatchError(
            f"{root.display!r} holds the export of a single target; a dataset of several "
            "targets (repo=R/target=T/ folders) needs a folder of its own",
            dest=root.display,
        )
