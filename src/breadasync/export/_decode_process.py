"""Decoding pages in child processes, so the work holds no GIL of the exporting process.

Every step of an exact decode (orjson, the checks, Arrow arrays built from Python values)
holds the GIL, so decoding threads cannot use a second core. A :class:`DecodeProcesses`
keeps a few child Python processes that decode pages with the same code
(:func:`breadasync.export._reader.decode_page`) and send each batch back as Arrow IPC; this
process only moves bytes through pipes (which releases the GIL). A child that dies (it
cannot, by the decoder's checks, but a process boundary is the last line) costs the pages
it held (at most :data:`PIPELINE_DEPTH`) a :class:`~breadasync.ProtocolError`, and the next
page gets a new child.
"""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, Final

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

import pyarrow as pa

from breadasync._errors import AnswerTooLargeError, DataIntegrityError, ProtocolError

from ._decode import DEFAULT_LIMITS, DecodeLimits

_LENGTH: Final = struct.Struct("<Q")
_CHILD_MODULE: Final = "breadasync.export._decode_child"


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError
    return data


def send_frame(stream: IO[bytes], *parts: bytes) -> None:
    """Writes ``parts`` as one frame: their count, then each part with its length."""
    stream.write(_LENGTH.pack(len(parts)))
    for part in parts:
        stream.write(_LENGTH.pack(len(part)))
        stream.write(part)
    stream.flush()


def read_frame(stream: IO[bytes]) -> list[bytes]:
    """Reads one frame written by :func:`send_frame` (``EOFError`` at the end)."""
    (count,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
    parts = []
    for _ in range(count):
        (size,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
        parts.append(_read_exactly(stream, size))
    return parts


PIPELINE_DEPTH: Final = 2
"""Pages a child holds at once. With two, the next page is already in its pipe when it
finishes one, so it does not sit idle while this process's thread wakes up (it needs the
GIL), reads the batch back and writes the next page through the pipe."""

_PIPE_BYTES: Final = 1024 * 1024
"""Pipe buffers asked for (Linux's unprivileged maximum): a whole page or batch fits, so
one write is one wake-up of the other side, not sixteen of 64 KiB."""


def _widen(stream: IO[bytes] | None) -> None:
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if stream is None or setsize is None:
        return
    with contextlib.suppress(OSError):  # a lower system limit: the default still works
        fcntl.fcntl(stream.fileno(), setsize, _PIPE_BYTES)


class _Child:
    """One child process, holding up to :data:`PIPELINE_DEPTH` pages; it answers them in
    the order they were sent."""

    def __init__(self, limits: DecodeLimits) -> None:
        settings = json.dumps([limits.max_body_bytes, limits.max_depth, limits.max_values])
        # Our own interpreter and module, with numbers as arguments: nothing untrusted.
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", _CHILD_MODULE, settings],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        _widen(self.process.stdin)
        _widen(self.process.stdout)
        self.pending = 0
        """Pages sent or about to be (guarded by the pool's lock)."""
        self.broken = False
        """Whether a pipe to it failed: it takes no more pages."""
        self._sending = threading.Lock()
        self._turns = threading.Condition()
        self._queue: deque[object] = deque()

    def decode(
        self,
        body: bytes,
        method: str,
        path: str,
        status: int,
        offset: int,
        limit: int,
        columns: str,
    ) -> tuple[pa.RecordBatch, int | None, str, int | str | None]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        meta = json.dumps([method, path, status, offset, limit, columns]).encode()
        ticket = object()
        try:
            with self._sending:
                with self._turns:
                    self._queue.append(ticket)
                send_frame(stdin, meta, body)
            with self._turns:
                # Answers come back in the order pages went in.
                self._turns.wait_for(lambda: self._queue[0] is ticket)
            kind, head, payload = read_frame(stdout)
        except (EOFError, OSError, ValueError):
            self.broken = True
            self.close()
            code = self.process.returncode
            raise ProtocolError(
                f"{method} {path} -> {status}: the decoding process ended (exit status "
                f"{code}) while reading this page",
                method=method,
                path=path,
                status=status,
            ) from None
        finally:
            with self._turns:
                self._queue.remove(ticket)
                self._turns.notify_all()
        if kind == b"ok":
            lines, state, job_id = json.loads(head)
            batch = pa.ipc.open_stream(payload).read_next_batch()
            return batch, lines, state, job_id
        name, message, excerpt, retryable = json.loads(head)
        if name == "DataIntegrityError":
            raise DataIntegrityError(message)
        if name in ("ProtocolError", "AnswerTooLargeError"):
            raise (AnswerTooLargeError if name == "AnswerTooLargeError" else ProtocolError)(
                message,
                method=method,
                path=path,
                status=status,
                excerpt=excerpt,
                retryable=retryable,
            )
        raise RuntimeError(f"the decoding process failed on {method} {path}: {message}")

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                # Closing flushes what is left, into a pipe a dead child no longer reads.
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class DecodeProcesses:
    """A pool of ``processes`` child processes that decode pages; use it as a context
    manager (or call :meth:`close`), so no child outlives it.

    Children start on first use; each holds up to :data:`PIPELINE_DEPTH` pages, so up to
    ``processes * PIPELINE_DEPTH`` calls of :meth:`decode` proceed at once. :meth:`decode`
    blocks: call it from a worker thread.
    """

    def __init__(self, processes: int = 1, *, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        self._size = processes
        self._limits = limits
        self._children: list[_Child] = []
        self._started = 0
        self._lock = threading.Lock()
        self._free = threading.Semaphore(processes * PIPELINE_DEPTH)
        self._closed = False

    def decode(
        self,
        body: bytes,
        method: str,
        path: str,
        status: int,
        offset: int,
        limit: int,
        *,
        columns: str = "json",
    ) -> tuple[pa.RecordBatch, int | None, str, int | str | None]:
        """``(batch, lines, status, job_id)`` of one page, decoded in a child process, in the
        column mode ``columns``.

        Raises:
            ProtocolError, DataIntegrityError: as :func:`decode_page` would.
        """
        with self._free:
            child = self._take()
            try:
                return child.decode(body, method, path, status, offset, limit, columns)
            finally:
                self._give_back(child)

    def _take(self) -> _Child:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoding processes are closed")
            usable = [child for child in self._children if not child.broken]
            idle = [child for child in usable if child.pending == 0]
            if not idle and len(usable) < self._size:
                # A new child before a second page for a busy one: each core first.
                child = _Child(self._limits)
                self._children.append(child)
                self._started += 1
            else:
                # The semaphore guarantees a child with room.
                child = min(usable, key=lambda c: c.pending)
            child.pending += 1
            return child

    def _give_back(self, child: _Child) -> None:
        with self._lock:
            child.pending -= 1
            drop = child.broken and child.pending == 0 and child in self._children
            if drop:
                self._children.remove(child)
        if drop:
            child.close()

    def close(self) -> None:
        """Stops every child (each ends when its input closes)."""
        with self._lock:
            self._closed = True
            children, self._children = self._children, []
        for child in children:
            child.close()

    def __enter__(self) -> DecodeProcesses:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def serve(stdin: IO[bytes], stdout: IO[bytes], decode: Callable[..., Any]) -> None:
    """The child's loop: a page in, a batch (or an error) out, until the input ends."""
    while True:
        try:
            meta, body = read_frame(stdin)
        except EOFError:
            return
        method, path, status, offset, limit, columns = json.loads(meta)
        try:
            batch, lines, state, job_id = decode(body, method, path, status, offset, limit, columns)
        except (ProtocolError, DataIntegrityError) as exc:
            excerpt = getattr(exc, "excerpt", "")
            retryable = getattr(exc, "retryable", False)
            head = json.dumps([type(exc).__name__, str(exc), excerpt, retryable]).encode()
            send_frame(stdout, b"error", head, b"")
            continue
        except Exception as exc:  # a bug: reported, and the child goes on
            head = json.dumps(["internal", repr(exc), "", False]).encode()
            send_frame(stdout, b"error", head, b"")
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        head = json.dumps([lines, state, job_id]).encode()
        send_frame(stdout, b"ok", head, sink.getvalue().to_pybytes())
