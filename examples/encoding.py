"""How both example apps turn Arrow record batches into response bytes: NDJSON, or an
Arrow IPC stream sent message by message."""

from __future__ import annotations

import json

import orjson
import pyarrow as pa

from breadasync.export import SCHEMA, batch_to_rows

NDJSON = "application/x-ndjson"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
NOT_COMPLETE = "the rollout is not complete; its rows can be streamed once it is"
PAGE_SIZE = 1000
"""Rows per page request of a stream (the most the API gives)."""
WINDOW = 4
"""Per stream, pages in flight and fetched ahead of the client, at most: a slow reader
costs a few MB whatever the job's size (the client's ``max_concurrency`` bounds all streams
together)."""


def ndjson(batch: pa.RecordBatch) -> bytes:
    """The batch's rows as the service sent them, one JSON object a line (CPU-bound: the
    apps run it in a worker thread)."""
    lines = []
    for row in batch_to_rows(batch):
        try:
            lines.append(orjson.dumps(row))
        except orjson.JSONEncodeError:
            # An integer past 64 bits, which orjson refuses and the standard library writes.
            lines.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
    lines.append(b"")
    return b"\n".join(lines)


class ArrowStream:
    """An Arrow IPC stream (what ``pyarrow.ipc.open_stream`` reads), produced chunk by
    chunk: each :meth:`batch` returns the bytes to send for one batch (the schema first),
    :meth:`end` the end-of-stream marker. A stream cut before :meth:`end` reads as broken,
    so a client can tell an interrupted response from a whole one."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None

    def write(self, data: bytes | memoryview) -> int:
        """The writer's sink (pyarrow calls this)."""
        self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        """The writer's sink: nothing is buffered here."""

    @property
    def closed(self) -> bool:
        """The writer's sink: never closed by the writer."""
        return False

    def batch(self, batch: pa.RecordBatch) -> bytes:
        """The bytes of one batch (with the schema before the first)."""
        if self._writer is None:
            self._writer = pa.ipc.new_stream(self, batch.schema)
        self._writer.write_batch(batch)
        return self._take()

    def end(self) -> bytes:
        """The end of the stream (a stream of no batch still has its schema)."""
        if self._writer is None:
            self._writer = pa.ipc.new_stream(self, SCHEMA)
        self._writer.close()
        return self._take()

    def _take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data
