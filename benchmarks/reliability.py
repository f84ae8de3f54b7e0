"""Run the hostile-world tests and write the figures they report to RELIABILITY.md.

python -m benchmarks.reliability
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import HERE, machine, table

OUT = HERE.parent / "RELIABILITY.md"


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        sink = Path(work) / "figures.jsonl"
        env = {**os.environ, "BREADASYNC_RELIABILITY_FIGURES": str(sink)}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/test_hostile.py"],
            cwd=HERE.parent,
            env=env,
            timeout=1800,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit("the hostile-world tests failed; RELIABILITY.md is left as it was")
        figures = [json.loads(line) for line in sink.read_text().splitlines()]
    rows = [
        [
            f["scenario"],
            f"{f['faults']:,}",
            f"{f['retries']:,}",
            f["verified"],
            "" if f["seconds"] is None else f"{f['seconds']} s",
        ]
        for f in figures
    ]
    OUT.write_text(
        "# Reliability\n\n"
        "What `tests/test_hostile.py` put breadasync through, against the emulator on "
        f"loopback, and what came out; written by `benchmarks/reliability.py` on {machine()}."
        " Every run of the test suite repeats these checks (the figures vary a little: "
        "faults are drawn at random).\n\n"
        + table(["scenario", "faults injected", "requests retried", "verified", "time"], rows)
        + "\n\nAlso checked on every run: any name (hypothesis: any Unicode, `/`, `..`, `%`, "
        "`?`, `#`, empty, very long) reaches its own path or is refused before sending; "
        "limits and offsets likewise; no name can write outside the dataset folder or "
        "collide; the API key appears in no log record of the whole run, no exception, repr, "
        "manifest or Parquet file; no test leaves a file, socket, task or session open "
        "(ResourceWarning and unraisable exceptions fail the run); an aiohttp backend whose "
        "requests are cancelled mid-flight leaks nothing.\n"
    )
    print(OUT.read_text())


if __name__ == "__main__":
    main()
