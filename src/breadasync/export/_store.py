"""The local folder destination, and what every destination shares (names, part records).

:class:`LocalDestination` writes each part to a hidden temporary name, fsyncs it and renames
it into place, so a part file that exists is whole; a journal records each part's rows and
SHA-256 as it commits, and the manifest, written last, is the export's commit point. The
object-store destination (``_objstore.FsDestination``) implements the same
:class:`~breadasync.export.Destination` protocol without rename or flock.

Every method blocks (file I/O): the exporter calls them through a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from breadasync._errors import DestinationError, ExportLockedError

MANIFEST = "_manifest.parquet"
"""A row-less Parquet file whose footer holds the manifest (see ``_manifest.py``): polars
reads a folder only when every non-empty file in it is Parquet."""
JOURNAL = "_journal.jsonl"
LOCK = ".lock"
PART_GLOB = "part-*.parquet"


def footer_identity(source: Any) -> dict[str, Any] | None:
    """The export identity a part's footer records (``breadasync.export``), or ``None``."""
    try:
        meta = pq.read_schema(source).metadata or {}
        found = orjson.loads(meta[b"breadasync.export"])
    except Exception:
        return None  # not a part of ours, or unreadable: no identity to go by
    return found if isinstance(found, dict) else None


class DamagedDocumentError(Exception):
    """A bookkeeping document (manifest, journal) exists but cannot be read: empty, cut
    short or not JSON. Internal: the resume protocol turns it into a clear export error."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} is {reason}")
        self.name = name
        self.reason = reason


def parse_document(name: str, raw: bytes) -> Any:
    """``raw`` as JSON, or :class:`DamagedDocumentError` saying how it is damaged."""
    if not raw.strip():
        raise DamagedDocumentError(name, "empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise DamagedDocumentError(name, f"truncated or not JSON ({len(raw):,} bytes)") from None


def parse_journal(raw: bytes) -> list[dict[str, Any]]:
    """A journal's entries; a torn last line (a crash mid-append) is ignored."""
    entries = []
    for line in raw.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            break
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


@dataclass(frozen=True, slots=True)
class PartRecord:
    """A committed part: its file, its rows and the SHA-256 of its bytes."""

    name: str
    start: int
    stop: int
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class PartFile:
    """A part being written: a temporary file that hashes every byte written to it."""

    def __init__(self, final: Path, temp: Path) -> None:
        self.final = final
        self.temp = temp
        self._file = open(temp, "wb")  # noqa: SIM115 (closed by commit or discard)
        self._hash = hashlib.sha256()
        self.size = 0

    # The file-like interface pyarrow's writer uses.
    def write(self, data: bytes | memoryview) -> int:
        """Write and hash ``data``."""
        self._hash.update(data)
        self.size += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        """Bytes written so far."""
        return self.size

    def flush(self) -> None:
        """Flush Python's buffer."""
        self._file.flush()

    @property
    def closed(self) -> bool:
        """Whether the file is closed."""
        return self._file.closed

    def writable(self) -> bool:
        """Always true."""
        return True

    def close(self, *, durable: bool = True) -> None:
        """Close the file; ``durable`` first syncs it to disk (a part about to be committed)."""
        if not self._file.closed:
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
            self._file.close()

    def digest(self) -> str:
        """The SHA-256 of what was written."""
        return self._hash.hexdigest()


def describe_os_error(exc: OSError, what: str, path: str | os.PathLike[str]) -> DestinationError:
    """A :class:`DestinationError` that says what could not be done, where, and why."""
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EACCES: "no permission to write there",
        errno.EPERM: "no permission to write there",
        errno.EROFS: "the file system is read-only",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ENAMETOOLONG: "the path is too long",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return DestinationError(f"cannot {what} {str(path)!r}: {reason}", dest=str(path))


class LocalDestination:
    """A local folder that receives one target's export."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LocalDestination({str(self.path)!r})"

    @property
    def display(self) -> str:
        """The folder, as shown in results and errors."""
        return str(self.path)

    def uri(self, name: str) -> str:
        """The path of ``name`` in the folder."""
        return str(self.path / name)

    def child(self, *segments: str) -> LocalDestination:
        """The sub-folder ``segments`` (a Hive dataset's ``repo=R/target=T``)."""
        return LocalDestination(self.path.joinpath(*segments))

    def holds_dataset(self) -> bool:
        """Whether the folder holds a dataset of several targets (``repo=...`` folders)."""
        return any(self.path.glob("repo=*"))

    def prepare(self) -> None:
        """Create the folder if needed; refuse a path that is a file or not writable."""
        try:
            if self.path.exists() and not self.path.is_dir():
                raise DestinationError(
                    f"the destination {str(self.path)!r} is a file, not a folder; choose a "
                    "folder path (it is created if missing)",
                    dest=str(self.path),
                )
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise describe_os_error(exc, "create the folder", self.path) from exc
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise DestinationError(
                f"cannot write to {str(self.path)!r}: no permission to write there",
                dest=str(self.path),
            )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock: a second exporter fails at once instead of interleaving.

        The lock is the OS's (``flock``), so a killed exporter never leaves it behind.
        """
        lock_path = self.path / LOCK
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise describe_os_error(exc, "write", lock_path) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise ExportLockedError(
                    f"another export is writing to {str(self.path)!r} (process {holder}); "
                    "wait for it to finish, or export to another folder",
                    dest=str(self.path),
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def read_json(self, name: str) -> Any:
        """The JSON document ``name`` of the folder, or ``None`` if it is missing.

        Raises:
            DamagedDocumentError: It exists but is empty, cut short or unreadable.
        """
        try:
            raw = (self.path / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DamagedDocumentError(name, f"unreadable ({exc.strerror})") from None
        return parse_document(name, raw)

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of file ``name`` of the folder, or ``None`` if missing or unreadable."""
        try:
            return (self.path / name).read_bytes()
        except OSError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically."""
        self._write_atomic(name, data)

    def write_json(self, name: str, data: Any) -> None:
        """Write ``name`` atomically."""
        self._write_atomic(name, orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def remove(self, name: str) -> None:
        """Delete ``name`` if it exists."""
        try:
            (self.path / name).unlink(missing_ok=True)
        except OSError as exc:
            raise describe_os_error(exc, "remove", self.path / name) from exc

    def read_journal(self) -> list[dict[str, Any]]:
        """The journal's entries; a torn last line (a crash mid-append) is ignored."""
        try:
            raw = (self.path / JOURNAL).read_bytes()
        except OSError:
            return []
        return parse_journal(raw)

    def append_journal(self, entry: dict[str, Any]) -> None:
        """Append one entry to the journal, durably."""
        path = self.path / JOURNAL
        try:
            with open(path, "ab") as file:
                file.write(orjson.dumps(entry) + b"\n")
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            raise describe_os_error(exc, "write", path) from exc

    def reset_journal(self, header: dict[str, Any]) -> None:
        """Start a new journal with ``header`` as its first entry, atomically: a crash
        leaves the old journal or the new one, never none."""
        self._write_atomic(JOURNAL, orjson.dumps(header) + b"\n")

    def part_names(self) -> set[str]:
        """The part files present (committed or not vouched for)."""
        return {p.name for p in self.path.glob(PART_GLOB)}

    def open_part(self, name: str) -> PartFile:
        """Start writing part ``name`` under a hidden temporary name."""
        temp = self.path / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            return PartFile(self.path / name, temp)
        except OSError as exc:
            raise describe_os_error(exc, "write", temp) from exc

    def commit_part(self, part: PartFile) -> None:
        """Make a fully written part visible under its final name."""
        try:
            part.close()
            os.replace(part.temp, part.final)
            self._sync_folder()
        except OSError as exc:
            self.discard_part(part)
            raise describe_os_error(exc, "write", part.final) from exc

    def discard_part(self, part: PartFile) -> None:
        """Drop an unfinished part (no need to make it durable first)."""
        with contextlib.suppress(OSError):
            part.close(durable=False)
        with contextlib.suppress(OSError):
            part.temp.unlink(missing_ok=True)

    def remove_stale(self) -> None:
        """Remove temporary files a killed exporter left behind (the lock is held): of
        parts, and of the manifest and journal written atomically."""
        for pattern in (".part-*.parquet.tmp-*", f".{MANIFEST}.tmp-*", f".{JOURNAL}.tmp-*"):
            for stale in self.path.glob(pattern):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def verify_part(self, record: PartRecord) -> str | None:
        """Why the part on disk does not match ``record``, or ``None`` if it does."""
        path = self.path / record.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        if size != record.bytes:
            return f"{size:,} bytes instead of {record.bytes:,}"
        try:
            rows = pq.read_metadata(path).num_rows
        except Exception as exc:
            return f"not a readable Parquet file ({type(exc).__name__})"
        if rows != record.rows:
            return f"{rows:,} rows in its footer instead of {record.rows:,}"
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256")
        if digest.hexdigest() != record.sha256:
            return "its checksum differs"
        return None

    def part_identity(self, name: str) -> dict[str, Any] | None:
        """The export identity in part ``name``'s footer, or ``None`` if unreadable."""
        return footer_identity(self.path / name)

    def _write_atomic(self, name: str, data: bytes) -> None:
        # A temporary file, synced, then renamed over ``name``: readers see the old
        # file or the new one, whole.
        final = self.path / name
        temp = self.path / f".{name}.tmp-{secrets.token_hex(4)}"
        try:
            with open(temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, final)
            self._sync_folder()
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise describe_os_error(exc, "write", final) from exc

    def _sync_folder(self) -> None:
        # A rename is durable only once the folder itself is synced.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
