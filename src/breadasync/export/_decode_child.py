"""The child process of :class:`~breadasync.export._decode_process.DecodeProcesses`:
``python -m breadasync.export._decode_child '[max_body_bytes, max_depth, max_values]'``."""

from __future__ import annotations

import json
import sys
from typing import Any

import pyarrow as pa

from ._decode import DecodeLimits
from ._decode_process import serve
from ._reader import decode_page
from ._schema import check_columns


def main() -> None:
    """Decodes pages from stdin to stdout until stdin closes."""
    max_body_bytes, max_depth, max_values = json.loads(sys.argv[1])
    limits = DecodeLimits(max_body_bytes, max_depth, max_values)

    def decode(
        body: bytes, method: str, path: str, status: int, offset: int, limit: int, columns: Any
    ) -> tuple[pa.RecordBatch, int | None, Any, int | str | None]:
        check_columns(columns)
        page = decode_page(
            body, method, path, status, offset, limit, limits=limits, columns=columns
        )
        return page.batch, page.lines, str(page.status), page.job_id

    serve(sys.stdin.buffer, sys.stdout.buffer, decode)


if __name__ == "__main__":
    main()
