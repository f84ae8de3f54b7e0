"""The destination seam: the :class:`Destination` protocol and what ``dest=`` may be.

The exporter talks only to a :class:`Destination`; :func:`resolve_destination` turns what
a caller gives (a path, a URI, a ``(pyarrow.fs.FileSystem, path)`` pair, an fsspec
filesystem pair, or a destination) into one. This module and ``_objstore`` are the only
places that know about object stores.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeAlias, runtime_checkable

from breadasync._errors import InvalidArgumentError

from ._store import LocalDestination, PartRecord

URI_SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "abfs", "abfss": "abfs"}
"""Schemes handed to ``pyarrow.fs.FileSystem.from_uri`` (``file://`` is a local folder)."""
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


@runtime_checkable
class PartSink(Protocol):
    """A part being written: the file-like object pyarrow's Parquet writer writes to."""

    size: int

    def write(self, data: bytes | memoryview) -> int:
        """Write (and hash) ``data``."""

    def tell(self) -> int:
        """Bytes written so far."""

    def flush(self) -> None:
        """Flush buffers."""

    @property
    def closed(self) -> bool:
        """Whether it is closed."""

    def writable(self) -> bool:
        """Always true."""

    def close(self) -> None:
        """Finish writing."""

    def digest(self) -> str:
        """The SHA-256 of what was written."""


@runtime_checkable
class Destination(Protocol):
    """Where one target's export goes: the interface the exporter and the resume protocol
    use. Every method may block; the exporter calls them from a worker thread.

    Implementations: :class:`~breadasync.export.LocalDestination` (a folder: temporary
    files, fsync, rename, flock) and :class:`~breadasync.export.FsDestination` (any
    ``pyarrow.fs`` filesystem: hidden temporary objects, a move, a lease object).
    """

    @property
    def display(self) -> str:
        """The destination as shown in results and errors (never with credentials)."""

    def uri(self, name: str) -> str:
        """Where ``name`` is, as shown to the user."""

    def child(self, *segments: str) -> Destination:
        """The destination ``segments`` below this one."""

    def prepare(self) -> None:
        """Check it can be written (and create it where folders exist)."""

    def locked(self) -> AbstractContextManager[None]:
        """Hold it exclusively: a second exporter fails at once."""

    def holds_dataset(self) -> bool:
        """Whether it holds a dataset of several targets (``repo=...``)."""

    def read_json(self, name: str) -> Any:
        """The JSON document ``name``, ``None`` if missing; ``DamagedDocumentError`` if
        it is empty or not JSON."""

    def write_json(self, name: str, data: Any) -> None:
        """Write ``name`` whole or not at all."""

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of document ``name``, ``None`` if missing."""

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write document ``name`` whole or not at all."""

    def remove(self, name: str) -> None:
        """Delete ``name`` if it exists."""

    def read_journal(self) -> list[dict[str, Any]]:
        """The journal's entries."""

    def append_journal(self, entry: dict[str, Any]) -> None:
        """Add one entry to the journal, durably."""

    def reset_journal(self, header: dict[str, Any]) -> None:
        """Replace the journal by one holding ``header``."""

    def part_names(self) -> set[str]:
        """The names of the part files present."""

    def open_part(self, name: str) -> Any:
        """Start writing part ``name`` out of sight; returns a :class:`PartSink`."""

    def commit_part(self, part: Any) -> None:
        """Make a whole part (from :meth:`open_part`) visible under its final name."""

    def discard_part(self, part: Any) -> None:
        """Drop an unfinished part (from :meth:`open_part`)."""

    def remove_stale(self) -> None:
        """Remove what a killed exporter left out of sight."""

    def verify_part(self, record: PartRecord) -> str | None:
        """Why the stored part does not match ``record``, or ``None``."""

    def part_identity(self, name: str) -> dict[str, Any] | None:
        """The export identity in part ``name``'s footer, or ``None`` if unreadable."""


DestinationLike: TypeAlias = "str | os.PathLike[str] | Destination | tuple[Any, str]"
"""What ``dest=`` accepts: a path, a URI, a destination, or a ``(filesystem, path)``
pair (a ``pyarrow.fs.FileSystem`` or an fsspec filesystem)."""


def resolve_destination(dest: Any) -> Destination:
    """The :class:`Destination` for ``dest`` (see :data:`DestinationLike`).

    Nothing is sent anywhere, except that pyarrow may ask S3 for a bucket's region when
    neither ``?region=`` nor an endpoint is given.

    Raises:
        InvalidArgumentError: An unknown or unsupported scheme, or a malformed URI or pair.
    """
    if isinstance(dest, Destination):
        return dest
    if isinstance(dest, tuple):
        return _from_pair(dest)
    if isinstance(dest, os.PathLike):
        return _local(os.fspath(dest))
    if not isinstance(dest, str):
        raise InvalidArgumentError(
            f"dest must be a path, a URI, or a (filesystem, path) pair, not {type(dest).__name__}"
        )
    match = _SCHEME.match(dest)
    if match is None:
        return _local(dest)
    scheme = match.group(1).lower()
    shown = dest.split("?", 1)[0]
    if not dest[match.end() :].startswith("//"):
        raise InvalidArgumentError(
            f"{shown!r} is neither a URI (scheme://...) nor a plain path; write "
            f"{scheme}://... for a store, or ./{shown} for a local folder"
        )
    if scheme == "file":
        return _from_uri(dest, scheme, shown)
    if scheme not in URI_SCHEMES:
        supported = ", ".join(f"{name}://" for name in sorted({*URI_SCHEMES, "file"}))
        raise InvalidArgumentError(
            f"unknown destination scheme {scheme + '://'!r} in {shown!r}; supported: "
            f"{supported}, a local path, or a (pyarrow.fs.FileSystem, path) pair"
        )
    return _from_uri(dest, scheme, shown)


def _local(path: str | bytes) -> LocalDestination:
    """A local folder; ``~`` means the home folder, as in a shell (and pandas)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path.strip():
        raise InvalidArgumentError(
            "dest must not be empty: name a folder (write '.' for the current one)"
        )
    if "\x00" in path:
        raise InvalidArgumentError(f"dest {path!r} holds a NUL character, which no path may")
    return LocalDestination(os.path.expanduser(path))


def _from_uri(uri: str, scheme: str, shown: str) -> Destination:
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowNotImplementedError, NotImplementedError) as exc:
        raise InvalidArgumentError(
            f"cannot write to {shown!r}: this pyarrow has no {scheme}:// support "
            f"({' '.join(str(exc).split())[:200]})"
        ) from None
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise InvalidArgumentError(
            f"cannot use {shown!r}: {' '.join(str(exc).split())[:200]}"
        ) from None
    return _from_filesystem(fs, path, scheme)


def _from_pair(pair: tuple[Any, ...]) -> Destination:
    import pyarrow.fs as pafs

    if len(pair) != 2 or not isinstance(pair[1], str):
        raise InvalidArgumentError("dest as a pair must be (filesystem, path), path a str")
    fs, path = pair
    if not isinstance(fs, pafs.FileSystem):
        if not _is_fsspec(fs):
            raise InvalidArgumentError(
                f"dest's filesystem must be a pyarrow.fs.FileSystem or an fsspec "
                f"filesystem, not {type(fs).__name__}"
            )
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return _from_filesystem(fs, path, None)


def _from_filesystem(fs: Any, path: str, scheme: str | None) -> Destination:
    import pyarrow.fs as pafs

    from ._objstore import FsDestination

    if isinstance(fs, pafs.LocalFileSystem):
        # The local folder keeps its stronger tools (fsync, rename, flock), and its checks.
        return _local(path)
    if not path.strip("/"):
        raise InvalidArgumentError("dest needs a bucket (and a prefix), not the store's root")
    return FsDestination(fs, path, scheme=scheme)


def _is_fsspec(fs: Any) -> bool:
    return any(cls.__module__.startswith("fsspec.") for cls in type(fs).__mro__)
