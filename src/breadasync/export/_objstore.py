"""The object-store destination: any ``pyarrow.fs`` filesystem (S3, GCS, Azure, fsspec).

Object stores have neither rename nor flock, so the local folder's guarantees are restated:

- **No half-written part under a final name.** A part is uploaded to a hidden name
  (``.part-00000.parquet.tmp-...``; readers such as ``pyarrow.dataset``, DuckDB and polars
  skip names starting with ``.`` or ``_``) and moved to its final name only once whole. On
  S3 the move is a server-side copy plus a delete: no part bytes pass through this process
  twice. (Arrow completes an S3 upload when its stream is dropped, even after an error, so
  writing straight to the final name could publish a truncated part.)
- **The manifest is the commit point**, written last in one PUT (all-or-nothing on S3, GCS
  and Azure; a temporary object and a move elsewhere). The journal is rewritten whole (one
  small PUT) after each part, as there is no append.
- **Resume** trusts a part only when the journal or manifest vouches for it and its size,
  footer row count and SHA-256 match: the whole object is read back once.
- **One writer per prefix: a lease**, ``_lease.json``, holding an owner (host, process, a
  random token) and an expiry, renewed by a thread while the export runs. pyarrow.fs has no
  conditional writes, so the lease is taken by read, write, read back. It guarantees that a
  second exporter started while a live one holds an unexpired lease fails at once, that a
  lease left by a killed exporter on the same host is taken over at once (its process is
  gone) and one from another host once it has expired, and that an exporter which finds its
  lease taken over fails before writing its manifest. It does NOT guarantee mutual exclusion
  for two exporters that start within one round trip of each other (both may read "free"
  before either writes), nor against clocks skewed by more than the lease time.
- **Stray objects** (temporary parts of a killed run) are removed by the next run holding
  the lease; meanwhile readers skip them by name. An upload killed mid-way may also leave an
  incomplete multipart upload, invisible to readers; a bucket lifecycle rule
  (AbortIncompleteMultipartUpload) reclaims its storage.

Every method blocks (network I/O): the exporter calls them through a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from breadasync._errors import DestinationError, ExportLockedError

from ._store import (
    JOURNAL,
    MANIFEST,
    PartRecord,
    footer_identity,
    parse_document,
    parse_journal,
)

LEASE = "_lease.json"
OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
"""pyarrow filesystem types whose single-request writes are all-or-nothing."""
READ_CHUNK = 8 << 20


def describe_store_error(exc: BaseException, what: str, where: str) -> DestinationError:
    """A one-line :class:`DestinationError` for a failed store call: what, where and why
    (with a hint for the usual credential and bucket mistakes)."""
    text = " ".join(str(exc).split())
    hints = (
        ("InvalidAccessKeyId", "the access key is not known to the store; check the credentials"),
        ("SignatureDoesNotMatch", "the secret key is wrong; check the credentials"),
        ("ACCESS_DENIED", "access denied; check the credentials and their permissions"),
        ("AccessDenied", "access denied; check the credentials and their permissions"),
        ("NoSuchBucket", "the bucket does not exist"),
        ("NO_SUCH_BUCKET", "the bucket does not exist"),
        ("Unable to connect", "the store cannot be reached; check the endpoint and network"),
        ("Couldn't connect", "the store cannot be reached; check the endpoint and network"),
    )
    reason = next((hint for key, hint in hints if key in text), text[:300] or type(exc).__name__)
    return DestinationError(f"cannot {what} {where!r}: {reason}", dest=where)


class StorePart:
    """A part being uploaded under a hidden name; hashes every byte written to it."""

    def __init__(self, fs: pafs.FileSystem, final: str, temp: str) -> None:
        self.final = final
        self.temp = temp
        self._fs = fs
        # Arrow streams the upload in chunks (multipart on S3): the part is never held whole.
        self._stream = fs.open_output_stream(temp)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        """Upload and hash ``data``."""
        self._hash.update(data)
        self.size += len(data)
        try:
            self._stream.write(data)
        except (OSError, ValueError) as exc:
            raise describe_store_error(exc, "write", self.final) from exc
        return len(data)

    def tell(self) -> int:
        """Bytes written so far."""
        return self.size

    def flush(self) -> None:
        """Nothing to do: the stream uploads as its buffer fills."""

    @property
    def closed(self) -> bool:
        """Whether the upload is finished."""
        return bool(self._stream.closed)

    def writable(self) -> bool:
        """Always true."""
        return True

    def close(self, *, durable: bool = True) -> None:
        """Finish the upload of the temporary object (``durable`` is implied)."""
        if not self._stream.closed:
            self._stream.close()

    def digest(self) -> str:
        """The SHA-256 of what was written."""
        return self._hash.hexdigest()


class FsDestination:
    """A prefix of a ``pyarrow.fs`` filesystem that receives one target's export.

    Args:
        fs: The filesystem (``S3FileSystem``, ``GcsFileSystem``, ``AzureFileSystem``, or
            ``PyFileSystem(FSSpecHandler(...))``).
        path: The prefix inside it (``bucket/prefix`` on S3).
        scheme: For display: the URI scheme the prefix was given with.
    """

    lease_seconds: float = 60.0
    """How long a lease lasts unless renewed (renewed every third of it)."""

    def __init__(self, fs: pafs.FileSystem, path: str, *, scheme: str | None = None) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self._scheme = scheme or fs.type_name
        self._atomic_put = fs.type_name in OBJECT_STORES
        self._journal: list[bytes] = []
        self._lease_token: str | None = None
        self._lease_lost: str | None = None

    def __repr__(self) -> str:
        return f"FsDestination({self.display!r})"

    @property
    def display(self) -> str:
        """``scheme://path``, without URI options (which may hold credentials)."""
        return f"{self._scheme}://{self.path}"

    def uri(self, name: str) -> str:
        """The URI of ``name`` under the prefix."""
        return f"{self.display}/{name}"

    def child(self, *segments: str) -> FsDestination:
        """The sub-prefix ``segments`` (a Hive dataset's ``repo=R/target=T``)."""
        return FsDestination(self.fs, "/".join([self.path, *segments]), scheme=self._scheme)

    def _key(self, name: str) -> str:
        return f"{self.path}/{name}"

    # --- checks and listing ------------------------------------------------------------

    def prepare(self) -> None:
        """Check the prefix can be used (bucket exists, credentials work, not an object)."""
        bucket = self.path.split("/", 1)[0]
        try:
            # On a store, the bucket's existence (and the credentials) first: a clear
            # message for the most common mistake.
            if self._atomic_put and self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise DestinationError(
                    f"cannot write to {self.display!r}: the bucket {bucket!r} does not "
                    "exist (or these credentials cannot see it)",
                    dest=self.display,
                )
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.File:
                raise DestinationError(
                    f"the destination {self.display!r} is an object, not a prefix; choose a "
                    "prefix (a 'folder' path)",
                    dest=self.display,
                )
            if not self._atomic_put:
                self.fs.create_dir(self.path, recursive=True)
        except DestinationError:
            raise
        except (OSError, ValueError) as exc:
            raise describe_store_error(exc, "write to", self.display) from exc

    def _names(self) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        try:
            return list(self.fs.get_file_info(selector))
        except (OSError, ValueError) as exc:
            raise describe_store_error(exc, "list", self.display) from exc

    def holds_dataset(self) -> bool:
        """Whether the prefix holds a dataset of several targets (``repo=...``)."""
        return any(info.base_name.startswith("repo=") for info in self._names())

    def part_names(self) -> set[str]:
        """The part objects present (committed or not vouched for)."""
        return {
            info.base_name
            for info in self._names()
            if info.type == pafs.FileType.File
            and info.base_name.startswith("part-")
            and info.base_name.endswith(".parquet")
        }

    # --- the lease ---------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the prefix's lease (see the module docstring for what it guarantees)."""
        token = secrets.token_hex(8)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": token}
        held = self._read_lease()
        if held is not None and not self._lease_is_free(held):
            raise self._locked_error(held)
        self._write_lease(owner)
        held = self._read_lease()
        if held is None or held.get("token") != token:
            raise self._locked_error(held or {})  # lost a race with another exporter
        self._lease_token, self._lease_lost = token, None
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(owner, stop), name="breadasync-lease", daemon=True
        )
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            self._lease_token = None
            with contextlib.suppress(OSError, DestinationError):
                current = self._read_lease()
                if current is not None and current.get("token") == token:
                    self.fs.delete_file(self._key(LEASE))

    def check_lease(self) -> None:
        """Fail if this exporter's lease was taken over (called before the commit point)."""
        if self._lease_token is None:
            return
        held = self._read_lease()
        if self._lease_lost is None and (held is None or held.get("token") != self._lease_token):
            self._lease_lost = "it was taken over"
        if self._lease_lost is not None:
            raise ExportLockedError(
                f"lost the lease on {self.display!r} ({self._lease_lost}): another export may "
                "be writing there; nothing was committed by this one",
                dest=self.display,
            )

    def _renew(self, owner: dict[str, Any], stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 3):
            try:
                held = self._read_lease()
                if held is None or held.get("token") != owner["token"]:
                    self._lease_lost = "it was taken over"
                    return
                self._write_lease(owner)
            except (OSError, DestinationError):
                continue  # the store is having a bad moment: the next renewal may work

    def _lease_is_free(self, held: dict[str, Any]) -> bool:
        expires = held.get("expires")
        if not isinstance(expires, int | float) or expires <= time.time():
            return True
        # A lease of a process of this host that is gone (killed): take it over at once.
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            return not _process_alive(held["pid"])
        return False

    def _locked_error(self, held: dict[str, Any]) -> ExportLockedError:
        expires = held.get("expires")
        until = (
            time.strftime(" until %H:%M:%S UTC", time.gmtime(expires))
            if isinstance(expires, int | float)
            else ""
        )
        return ExportLockedError(
            f"another export is writing to {self.display!r} (host {held.get('host', '?')}, "
            f"process {held.get('pid', '?')}; its lease runs{until or ' on'}); wait for it to "
            "finish, or export to another prefix",
            dest=self.display,
        )

    def _read_lease(self) -> dict[str, Any] | None:
        try:
            held = self._get(LEASE)
        except ValueError:
            return {}  # a damaged lease: treated as expired
        if held is None:
            return None
        try:
            parsed = orjson.loads(held)
        except orjson.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    def _write_lease(self, owner: dict[str, Any]) -> None:
        lease = {**owner, "expires": time.time() + self.lease_seconds}
        self._put(LEASE, orjson.dumps(lease))

    # --- documents -----------------------------------------------------------------------

    def _get(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._key(name)) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            if "NOT_FOUND" in str(exc) or "NoSuchKey" in str(exc):
                return None
            raise describe_store_error(exc, "read", self.uri(name)) from exc

    def _put(self, name: str, data: bytes) -> None:
        # One PUT is all-or-nothing on object stores; elsewhere a temporary object, moved.
        final = self._key(name)
        target = final if self._atomic_put else self._key(f".{name}.tmp-{secrets.token_hex(4)}")
        try:
            with self.fs.open_output_stream(target) as stream:
                stream.write(data)
            if target != final:
                self._move(target, final)
        except (OSError, ValueError) as exc:
            raise describe_store_error(exc, "write", self.uri(name)) from exc

    def _move(self, source: str, final: str) -> None:
        try:
            self.fs.move(source, final)
        except NotImplementedError:
            self.fs.copy_file(source, final)
            self.fs.delete_file(source)

    def read_json(self, name: str) -> Any:
        """The JSON document ``name``, or ``None`` if it is missing.

        Raises:
            DamagedDocumentError: It exists but is empty or not JSON.
        """
        raw = self._get(name)
        return None if raw is None else parse_document(name, raw)

    def write_json(self, name: str, data: Any) -> None:
        """Write ``name`` whole or not at all."""
        self._put(name, orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of document ``name``, or ``None`` if it is missing."""
        return self._get(name)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` whole or not at all."""
        self._put(name, data)

    def remove(self, name: str) -> None:
        """Delete ``name`` if it exists."""
        try:
            self.fs.delete_file(self._key(name))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            if "NOT_FOUND" not in str(exc) and "NoSuchKey" not in str(exc):
                raise describe_store_error(exc, "remove", self.uri(name)) from exc

    def read_journal(self) -> list[dict[str, Any]]:
        """The journal's entries (a torn last line is ignored)."""
        raw = self._get(JOURNAL)
        entries = parse_journal(raw or b"")
        self._journal = [orjson.dumps(entry) for entry in entries]
        return entries

    def append_journal(self, entry: dict[str, Any]) -> None:
        """Add one entry: the journal object is rewritten whole (no append on a store)."""
        self._journal.append(orjson.dumps(entry))
        self._put(JOURNAL, b"".join(line + b"\n" for line in self._journal))

    def reset_journal(self, header: dict[str, Any]) -> None:
        """Start a new journal with ``header`` as its first entry, in one write."""
        self._journal = [orjson.dumps(header)]
        self._put(JOURNAL, self._journal[0] + b"\n")

    # --- parts ---------------------------------------------------------------------------

    def open_part(self, name: str) -> StorePart:
        """Start uploading part ``name`` under a hidden temporary name."""
        temp = self._key(f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return StorePart(self.fs, self._key(name), temp)
        except (OSError, ValueError) as exc:
            raise describe_store_error(exc, "write", self.uri(name)) from exc

    def commit_part(self, part: StorePart) -> None:
        """Finish the upload, then move the whole part to its final name."""
        try:
            part.close()
            self._move(part.temp, part.final)
        except (OSError, ValueError) as exc:
            self.discard_part(part)
            raise describe_store_error(exc, "write", f"{self._scheme}://{part.final}") from exc

    def discard_part(self, part: StorePart) -> None:
        """Drop an unfinished part: its temporary object never gets a final name."""
        with contextlib.suppress(OSError, ValueError):
            part.close()
        with contextlib.suppress(OSError, ValueError):
            self.fs.delete_file(part.temp)

    def remove_stale(self) -> None:
        """Remove temporary objects a killed exporter left behind (the lease is held)."""
        for info in self._names():
            name = info.base_name
            stale_part = name.startswith(".part-") and ".parquet.tmp-" in name
            temps = (f".{LEASE}.tmp-", f".{JOURNAL}.tmp-", f".{MANIFEST}.tmp-")
            if stale_part or name.startswith(temps):
                with contextlib.suppress(OSError, ValueError):
                    self.fs.delete_file(info.path)

    def verify_part(self, record: PartRecord) -> str | None:
        """Why the stored part does not match ``record``, or ``None`` if it does.

        Size (one HEAD), footer rows (ranged reads), then the SHA-256 of every byte: a store's
        own checksum is not exact enough (an S3 ETag of a multipart upload is not a digest of
        the object) nor exposed by pyarrow.fs.
        """
        key = self._key(record.name)
        try:
            info = self.fs.get_file_info(key)
        except (OSError, ValueError) as exc:
            return f"unreadable ({' '.join(str(exc).split())[:120]})"
        if info.type != pafs.FileType.File:
            return "missing"
        if info.size != record.bytes:
            return f"{info.size:,} bytes instead of {record.bytes:,}"
        try:
            with self.fs.open_input_file(key) as file:
                rows = pq.read_metadata(file).num_rows
        except Exception as exc:
            return f"not a readable Parquet file ({type(exc).__name__})"
        if rows != record.rows:
            return f"{rows:,} rows in its footer instead of {record.rows:,}"
        digest = hashlib.sha256()
        try:
            with self.fs.open_input_stream(key) as stream:
                while chunk := stream.read(READ_CHUNK):
                    digest.update(chunk)
        except (OSError, ValueError) as exc:
            return f"unreadable ({' '.join(str(exc).split())[:120]})"
        if digest.hexdigest() != record.sha256:
            return "its checksum differs"
        return None

    def part_identity(self, name: str) -> dict[str, Any] | None:
        """The export identity in part ``name``'s footer, or ``None`` if unreadable."""
        try:
            with self.fs.open_input_file(self._key(name)) as file:
                return footer_identity(file)
        except (OSError, ValueError):
            return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
