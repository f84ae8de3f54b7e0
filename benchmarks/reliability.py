"""Run the hostile-world tests and write what they tried, and how it ended, to RELIABILITY.md.

python -m benchmarks.reliability [--no-soak]

The tests append their figures to a file this script names (``BREADASYNC_RELIABILITY_FIGURES``,
see ``tests/conftest.py``): the scale scenarios of ``tests/test_hostile.py``, one row per
hostile answer of ``tests/test_hostile_bodies.py`` (what was served, what must happen, what
the API and the CLI did, the resume, CPU seconds), and every test's outcome. Nothing in the
report is written by hand: a case that failed shows as failed (and the script exits 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks._common import HERE, machine, table

ROOT = HERE.parent
OUT = ROOT / "RELIABILITY.md"
HOSTILE_FILES = ("tests/test_hostile.py", "tests/test_hostile_*.py")
"""The files that try hostile cases end to end (their figures make the tables)."""
ALSO_RUN = (
    "tests/test_decode_hostile.py",
    "tests/test_cli_secrets.py",
    "tests/test_export_identity.py",
    "tests/test_export_kill.py",
)
"""Other tests of issue 17's hostile world, listed by outcome: hostile bodies fed to the
decoder alone, the key in every spelling, a job re-run under an export, a killed export."""


def test_files() -> list[str]:
    """The test files to run, relative to the repository, those that exist."""
    found: list[str] = []
    for pattern in HOSTILE_FILES + ALSO_RUN:
        found += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))
    return list(dict.fromkeys(found))


def run(files: list[str], sink: Path, soak: bool) -> int:
    """Run pytest on ``files`` with the figure sink; its exit code."""
    env = {**os.environ, "BREADASYNC_RELIABILITY_FIGURES": str(sink)}
    argv = [sys.executable, "-m", "pytest", "-q", *files]
    if not soak:
        argv += ["-m", "not soak"]
    done = subprocess.run(argv, cwd=ROOT, env=env, timeout=3600, check=False)
    return done.returncode


def load(sink: Path) -> dict[str, list[dict[str, Any]]]:
    """The sink's rows by table (a test's outcome once, even if reported twice)."""
    tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[str] = set()
    if not sink.exists():
        return tables
    for line in sink.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["table"] == "outcomes":
            if row["test"] in seen:
                continue
            seen.add(row["test"])
        tables[row["table"]].append(row)
    return tables


def cell(text: object) -> str:
    """``text`` fit for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def scenarios(rows: list[dict[str, Any]]) -> str:
    return table(
        ["scenario", "faults injected", "requests retried", "verified", "wall time"],
        [
            [
                cell(f["scenario"]),
                f"{f['faults']:,}",
                f"{f['retries']:,}",
                cell(f["verified"]),
                "" if f["seconds"] is None else f"{f['seconds']} s",
            ]
            for f in rows
        ],
    )


def hostile_bodies(rows: list[dict[str, Any]], outcomes: dict[str, str]) -> str:
    body = []
    for f in rows:
        test = next((t for t in outcomes if t.endswith(f"[{f['case']}]")), "")
        body.append(
            [
                f"`{f['case']}`",
                cell(f["position"]),
                cell(f["served"]),
                cell(f["expected"]),
                cell(f["api"]),
                cell(f["cli"]),
                cell(f["resumed"]),
                f"{f['cpu_api']:.2f} / {f['cpu_cli']:.2f}",
                outcomes.get(test, "?"),
            ]
        )
    return table(
        [
            "case",
            "where",
            "served",
            "expected",
            "export_rollout",
            "CLI `export`",
            "then, fault off",
            "CPU s (API / CLI)",
            "test",
        ],
        body,
    )


def by_test(outcomes: list[dict[str, Any]], files: list[str]) -> str:
    """Every other test run, grouped by function: its cases and their outcomes."""
    lines = []
    for file in files:
        groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for row in outcomes:
            nodeid: str = row["test"]
            if not nodeid.startswith(file + "::"):
                continue
            found = re.fullmatch(r"(.+?)(?:\[(.*)\])?", nodeid.split("::", 1)[1])
            assert found is not None
            groups[found.group(1)].append((found.group(2) or "", row["outcome"]))
        if not groups:
            continue
        lines.append(f"\n`{file}`:\n")
        for name, cases in groups.items():
            failed = [case for case, outcome in cases if outcome != "passed"]
            verdict = "passed" if not failed else f"**{len(failed)} failed**: {', '.join(failed)}"
            listed = [case for case, _ in cases if case]
            what = f" ({len(listed)} cases: {', '.join(listed)})" if listed else ""
            lines.append(f"- `{name}`{cell(what)}: {verdict}")
    return "\n".join(lines)


def render(tables: dict[str, list[dict[str, Any]]], files: list[str], soak: bool) -> str:
    outcomes = {row["test"]: row["outcome"] for row in tables["outcomes"]}
    passed = sum(1 for o in outcomes.values() if o == "passed")
    skipped = "" if soak else " The soak-sized scenarios were skipped (`--no-soak`)."
    others = [f for f in files if f in ALSO_RUN]
    return (
        "# Reliability\n\n"
        "What breadasync was put through by a hostile world, what it must do, and what it did:"
        " written by `benchmarks/reliability.py` from the tests that run these cases, against"
        f" the emulator on loopback, on {machine()}. {passed} of {len(outcomes)} tests passed."
        f"{skipped} Every run of the test suite repeats these checks; wall times depend on the"
        " machine and its load (faults are drawn at random, so counts vary a little).\n\n"
        "## Scale under faults\n\n"
        + scenarios(tables["scenarios"])
        + "\n\n## Hostile answers, end to end\n\n"
        "Each case is served by the emulator over HTTP. `export_rollout` first gets good pages;"
        " the fault switches on once the first part is written, so the error must name a later"
        " page (cases that complete get it from the start). Then the CLI's `export` of the same"
        " folder meets it on every page (or on the status), and must fail with one line on"
        " stderr (no traceback, no key). Then, the fault off, the same command resumes, keeping"
        " the committed parts, and the export is compared with the emulator's rows, row by row."
        " CPU seconds are the client's (this process and its children, without the emulator's"
        " thread); the test only bounds them at 60 s (a stall, not a speed claim). Limits: a"
        " body over 64 MiB (`Limits.max_body_bytes`), nesting over 64 levels, more than 500,000"
        " keys and list items in a page (`export.DecodeLimits`).\n\n"
        + hostile_bodies(tables["hostile-bodies"], outcomes)
        + "\n\n## Also run\n"
        + by_test(tables["outcomes"], others)
        + "\n\nAnd on every run of the suite: any name (hypothesis: any Unicode, `/`, `..`, `%`,"
        " `?`, `#`, empty, very long) reaches its own path or is refused before sending; limits"
        " and offsets likewise; no name can write outside the dataset folder or collide; the API"
        " key appears in no log record of the whole run, no exception, repr, manifest or Parquet"
        " file; no test leaves a file, socket, task or session open (ResourceWarning and"
        " unraisable exceptions fail the run); an aiohttp backend whose requests are cancelled"
        " mid-flight leaks nothing.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write RELIABILITY.md from the hostile tests.")
    parser.add_argument(
        "--no-soak", action="store_true", help="skip the soak-sized scenarios (-m 'not soak')"
    )
    args = parser.parse_args(argv)
    files = test_files()
    with tempfile.TemporaryDirectory() as work:
        sink = Path(work) / "figures.jsonl"
        code = run(files, sink, soak=not args.no_soak)
        tables = load(sink)
    if not tables["outcomes"]:
        raise SystemExit("no test ran; RELIABILITY.md is left as it was")
    OUT.write_text(render(tables, files, soak=not args.no_soak), encoding="utf-8")
    print(OUT.read_text(encoding="utf-8"))
    if code != 0:
        raise SystemExit(f"some tests failed (pytest exit {code}); RELIABILITY.md shows which")


if __name__ == "__main__":
    main()
