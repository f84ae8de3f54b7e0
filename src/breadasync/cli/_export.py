"""``breadasync export``: the export itself, its ``--dry-run`` plan, and what an interrupted
export truthfully leaves behind."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
from typing import Any

from rich.progress import Progress
from rich.table import Table

from ._args import EXIT_FAILED, EXIT_OK, ExportWatch, make_client
from ._output import Ui

SAMPLE_ROWS = 100
"""Rows of the one page ``--dry-run`` reads to estimate bytes."""


class ExportView:
    """A bar of rows, with rows/s and the time remaining; it also tells ``watch`` each
    target's total."""

    def __init__(self, progress: Progress, watch: ExportWatch | None = None) -> None:
        self._progress = progress
        self._watch = watch
        self._task = progress.add_task("rows", total=None, rate="")
        self._done: dict[Any, tuple[int, int]] = {}
        self._started = asyncio.get_running_loop().time()

    def __call__(self, update: Any) -> None:
        if self._watch is not None:
            self._watch.totals[update.target.target_name] = update.total
        self._done[update.target] = (update.rows, update.total)
        rows = sum(done for done, _ in self._done.values())
        total = sum(total for _, total in self._done.values())
        elapsed = max(1e-6, asyncio.get_running_loop().time() - self._started)
        self._progress.update(
            self._task, completed=rows, total=total, rate=f"{rows / elapsed:,.0f} rows/s"
        )


def export_table(results: Any) -> tuple[list[dict[str, Any]], Table]:
    """Per-target rows for ``--json`` and the table a person reads."""
    rows = []
    table = Table("target", "rows", "parts", "reused", "MB", "seconds", "error")
    for result in results:
        rows.append(
            {
                "repo": result.target.repo_name,
                "target": result.target.target_name,
                "rows": result.rows,
                "lines": result.lines,
                "status": result.status,
                "partial": result.partial,
                "dest": result.dest,
                "files": result.files,
                "bytes": result.bytes,
                "pages": result.pages,
                "parts_written": result.parts_written,
                "parts_reused": result.parts_reused,
                "retries": result.retries,
                "seconds": round(result.elapsed, 3),
                "error": None if result.error is None else str(result.error),
            }
        )
        table.add_row(
            str(result.target),
            f"{result.rows:,}",
            str(len(result.files)),
            str(result.parts_reused),
            f"{result.bytes / 1e6:.1f}",
            f"{result.elapsed:.1f}",
            str(result.error) if result.error is not None else "",
        )
    return rows, table


async def all_targets(client: Any, repo: str) -> list[str]:
    """Every target of ``repo`` (for ``--all``)."""
    found = await client.targets.list(repo_name=repo)
    return list(found.targets)


async def cmd_export(args: argparse.Namespace, ui: Ui, watch: ExportWatch) -> int:
    """Export the targets, or print the plan with ``--dry-run``."""
    options = {
        "page_size": args.page_size,
        "concurrency": args.concurrency,
        "rows_per_part": args.rows_per_part,
        "resume": not args.no_resume,
        "allow_partial": args.allow_partial,
        "columns": args.columns,
    }
    async with make_client(args) as client:
        targets = await all_targets(client, args.repo) if args.all else args.targets
        if args.dry_run:
            return await _dry_run(client, args, ui, targets)
        watch.targets = list(targets)
        with ui.progress(rate=True) as progress:
            # Always the dataset layout (--out/repo=R/target=T/), so one folder can take one
            # target today and more tomorrow without mixing layouts.
            results = await client.export_many(
                targets,
                repo_name=args.repo,
                dest=args.out,
                on_progress=ExportView(progress, watch),
                **options,
            )
    if len(results) == 1 and results[0].error is not None and not ui.json:
        raise results[0].error  # one target: its error is the command's, on one line
    rows, table = export_table(results)
    failures = results.failures()
    text = f"{results.rows:,} rows in {args.out_abs}"
    reused = sum(r.parts_reused for r in results)
    if reused:
        text += f" (resumed: {reused} part(s) kept from an earlier run)"
    if failures:
        text += f" ({len(failures)} target(s) failed)"
    ui.result({"out": args.out_abs, "rows": results.rows, "targets": rows}, table, text)
    return EXIT_FAILED if failures else EXIT_OK


# --- --dry-run -----------------------------------------------------------------------------


def _pages(lines: int, rows_per_part: int, page_size: int) -> tuple[int, int]:
    """Parts and page requests of an export of ``lines`` rows (pages never cross parts)."""
    parts = math.ceil(lines / rows_per_part)
    full, last = divmod(lines, rows_per_part)
    pages = full * math.ceil(rows_per_part / page_size) + math.ceil(last / page_size)
    return parts, pages


async def _sample(client: Any, repo: str, name: str, lines: int, columns: Any) -> dict[str, float]:
    """Bytes per row, from one small page: as JSON on the wire and as zstd Parquet."""
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from breadasync.export import rows_to_batch

    page = await client.targets.rollout.get_output(
        name, repo_name=repo, limit=min(SAMPLE_ROWS, lines), offset=0
    )
    rows = list(page.output)
    if not rows:
        return {}
    sink = pa.BufferOutputStream()
    batch = rows_to_batch(rows, 0, columns=columns)
    pq.write_table(pa.Table.from_batches([batch]), sink, compression="zstd")
    return {
        "rows": len(rows),
        "json_bytes_per_row": len(orjson.dumps(rows)) / len(rows),
        "parquet_bytes_per_row": sink.getvalue().size / len(rows),
    }


def _kept(args: argparse.Namespace, name: str, lines: int) -> list[dict[str, Any]]:
    """The parts already committed in ``--out`` that fit the plan: a resumed export keeps
    them (after verifying them), so their pages are not fetched again."""
    folder = None if args.no_resume else target_folder(args.out, args.repo, name)
    found = (committed(folder) or []) if folder is not None else []
    step = args.rows_per_part
    return [
        r
        for r in found
        if r["start"] % step == 0
        and r["start"] < lines
        and r["stop"] == min(r["start"] + step, lines)
    ]


async def _dry_run(client: Any, args: argparse.Namespace, ui: Ui, targets: list[str]) -> int:
    import anyio

    from breadasync._errors import BreadError

    found: dict[str, dict[str, Any]] = {}
    limiter = anyio.CapacityLimiter(args.concurrency)

    async def one(name: str) -> None:
        entry: dict[str, Any] = {"repo": args.repo, "target": name}
        try:
            async with limiter:
                job = await client.targets.rollout.get(name, repo_name=args.repo)
        except BreadError as exc:
            entry["error"] = str(exc)
        else:
            lines = job.lines or 0
            ready = job.is_complete or (args.allow_partial and str(job.status) != "not_started")
            parts, pages = _pages(lines, args.rows_per_part, args.page_size)
            kept = _kept(args, name, lines)
            entry.update(
                status=str(job.status),
                lines=lines,
                parts=parts,
                pages=pages,
                parts_committed=len(kept),
                pages_to_fetch=pages
                - sum(math.ceil((r["stop"] - r["start"]) / args.page_size) for r in kept),
                would_export=ready,
                error=None if ready else "the job is not complete (see --allow-partial)",
            )
        found[name] = entry

    async with anyio.create_task_group() as tg:
        for name in targets:
            tg.start_soon(one, name)
    entries = [found[name] for name in targets]
    sample: dict[str, float] = {}
    first = next((e for e in entries if e.get("would_export") and e["lines"]), None)
    if first is not None:
        try:
            sample = await _sample(client, args.repo, first["target"], first["lines"], args.columns)
        except BreadError as exc:
            ui.note(f"no byte estimate: the sample page could not be read: {exc}")
    for entry in entries:
        if sample and entry.get("would_export"):
            entry["estimated_bytes"] = round(entry["lines"] * sample["parquet_bytes_per_row"])
            entry["estimated_download_bytes"] = round(entry["lines"] * sample["json_bytes_per_row"])
    chosen = [e for e in entries if e.get("would_export")]
    plan = {
        "dry_run": True,
        "out": args.out_abs,
        "page_size": args.page_size,
        "rows_per_part": args.rows_per_part,
        "lines": sum(e["lines"] for e in chosen),
        "parts": sum(e["parts"] for e in chosen),
        "pages": sum(e["pages"] for e in chosen),
        "parts_committed": sum(e["parts_committed"] for e in chosen),
        "pages_to_fetch": sum(e["pages_to_fetch"] for e in chosen),
        "estimated_bytes": sum(e.get("estimated_bytes", 0) for e in chosen) if sample else None,
        "sample": {"target": first["target"], **sample} if sample and first else None,
        "targets": entries,
    }
    table = Table("target", "status", "lines", "parts", "kept", "pages", "est. MB", "error")
    for entry in entries:
        estimate = entry.get("estimated_bytes")
        table.add_row(
            f"{args.repo}/{entry['target']}",
            entry.get("status", ""),
            f"{entry['lines']:,}" if "lines" in entry else "",
            str(entry.get("parts", "")),
            str(entry.get("parts_committed", "")),
            str(entry.get("pages_to_fetch", "")),
            "" if estimate is None else f"{estimate / 1e6:.1f}",
            entry.get("error") or "",
        )
    shown = "?" if plan["estimated_bytes"] is None else f"~{plan['estimated_bytes'] / 1e6:,.1f} MB"
    text = (
        f"dry run: {len(chosen)} of {len(entries)} target(s) would export {plan['lines']:,} "
        f"rows in {plan['parts']:,} part(s) from {plan['pages_to_fetch']:,} page request(s), "
        f"{shown} of Parquet, to {args.out_abs}; nothing was exported"
    )
    if plan["parts_committed"]:
        text += f"\n({plan['parts_committed']:,} part(s) already committed there will be kept)"
    if sample:
        text += (
            f"\n(bytes estimated from {int(sample['rows'])} sampled rows of "
            f"{args.repo}/{first['target'] if first else ''}; large parts compress better, so "
            "this is an upper estimate)"
        )
    ui.result(plan, table, text)
    return EXIT_OK if all(e.get("would_export") for e in entries) else EXIT_FAILED


# --- Ctrl-C --------------------------------------------------------------------------------


def committed(folder: str) -> list[dict[str, Any]] | None:
    """The part records committed in one target's export folder, or ``None`` if unknown.

    Read when no export is running there: a committed part is in the manifest (a whole
    export) or the journal (an unfinished one); a part being written when Ctrl-C came is
    not.
    """
    try:
        from breadasync.export import LocalDestination, load_manifest

        store = LocalDestination(folder)
        manifest = load_manifest(folder)
        if isinstance(manifest, dict) and isinstance(manifest.get("parts"), list):
            records = manifest["parts"]
        else:
            records = store.read_journal()[1:]
        for record in records:
            int(record["rows"]), int(record["start"]), int(record["stop"])
        return list(records)
    except Exception:  # a folder we cannot read: say nothing untrue
        return None


def target_folder(out: str, repo: str, target: str) -> str | None:
    """Where ``export`` writes one target under ``out`` (``None`` for a store URL)."""
    if "://" in out:
        return None
    from breadasync.export import hive_segment

    return os.path.join(out, hive_segment("repo", repo), hive_segment("target", target))


def interrupted_export(watch: ExportWatch) -> tuple[str, dict[str, Any]]:
    """What an interrupted export leaves: a sentence and its numbers, all read from disk."""
    parts = rows = refetch = 0
    known = True
    waiting = 0
    for name in watch.targets:
        total = watch.totals.get(name)
        if total is None:
            waiting += 1  # never planned: nothing of it was written
            continue
        folder = target_folder(watch.out, watch.repo, name)
        found = committed(folder) if folder is not None else None
        if found is None:
            known = False
            continue
        parts += len(found)
        done = sum(int(r["rows"]) for r in found)
        rows += done
        refetch += max(0, total - done)
    numbers: dict[str, Any] = {
        "parts_committed": parts if known else None,
        "rows_committed": rows if known else None,
        "rows_to_refetch": refetch if known else None,
        "targets_not_started": waiting,
    }
    if not known:
        text = "committed parts are kept and verified when the same command runs again"
    elif parts:
        text = (
            f"{parts:,} part(s) with {rows:,} rows are committed and will be kept; "
            f"{refetch:,} rows will be fetched again"
        )
    elif refetch:
        text = f"no part was committed yet: all {refetch:,} rows will be fetched again"
    else:
        text = "no part was committed yet"
    if waiting:
        text += f"; {waiting} target(s) had not started"
    return text, numbers
