"""The ``breadasync`` command: the library's work, from a terminal.

Exit codes: 0 done; 1 a target failed or a request could not be made; 2 bad usage or
configuration; 130 interrupted (Ctrl-C). Progress goes to stderr, and only to a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ._errors import (
    BreadError,
    ConfigError,
    InvalidArgumentError,
    first_error,
)
from ._version import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
READ_HINT = (
    "Read it with pandas (pip install pandas): pandas.read_parquet('{out}')\n"
    'or DuckDB (pip install duckdb):           duckdb.sql("SELECT * FROM read_parquet('
    "'{out}/**/*.parquet', hive_partitioning=true)\")"
)
DEMO_REPO = "demo_repo"
DEMO_TARGETS = {  # name -> (stimuli, trajectories per stimulus)
    "coding": (2400, 5),
    "math": (1800, 5),
    "writing": (1200, 4),
    "translation": (3000, 3),
    "reasoning": (1500, 6),
    "safety": (900, 4),
}


# --- arguments -----------------------------------------------------------------------------


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _int_within(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not within {low}..{high}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout (for scripts)"
    )
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v", "--verbose", action="count", default=0, help="log each request and retry to stderr"
    )
    loudness.add_argument("-q", "--quiet", action="store_true", help="no progress, only the result")
    service = argparse.ArgumentParser(add_help=False, parents=[common])
    service.add_argument(
        "--base-url", help="the service (default: $BREAD_BASE_URL, then the public API)"
    )
    service.add_argument("--api-key", help="the API key (default: $BREAD_API_KEY)")
    service.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="allow a plain-http --base-url to a host that is not loopback (sends the key "
        "unencrypted)",
    )
    service.add_argument(
        "--max-retries",
        type=_int_within(0, 100),
        default=5,
        help="retries of a failed request, with backoff (default 5)",
    )

    parser = argparse.ArgumentParser(
        prog="breadasync",
        description="Start, watch and export Bread rollouts at scale. Try 'breadasync demo'.",
    )
    parser.add_argument("--version", action="version", version=f"breadasync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="the whole job against an embedded emulator",
        description="Start the embedded emulator (no key, no network), create a few targets, "
        "run their rollouts with live progress, export them to Parquet and summarise.",
    )
    demo.add_argument(
        "--out", default="bread-demo", help="dataset folder to write (default ./bread-demo)"
    )

    rollout = commands.add_parser(
        "rollout",
        parents=[service],
        help="start and watch rollouts",
        description="Start the rollouts of the given targets and watch them to the end. Exit "
        "0 if all completed, 1 if any failed or errored.",
    )
    rollout.add_argument("targets", nargs="+", metavar="TARGET")
    rollout.add_argument("--repo", required=True, help="the repo of the targets")
    rollout.add_argument(
        "--no-wait",
        action="store_true",
        help="only start them (starting again is harmless: it is idempotent)",
    )
    rollout.add_argument(
        "--timeout", type=_positive_float, help="seconds to wait at most for all of them"
    )
    rollout.add_argument(
        "--wait-for-stim",
        action="store_true",
        help="wait for stim jobs still running, then start the rollout",
    )

    status = commands.add_parser(
        "status",
        parents=[service],
        help="show stim and rollout status",
        description="Show the stim and rollout status of the given targets.",
    )
    status.add_argument("targets", nargs="+", metavar="TARGET")
    status.add_argument("--repo", required=True, help="the repo of the targets")

    export = commands.add_parser(
        "export",
        parents=[service],
        help="export rollout output to Parquet",
        description="Export the rollout output of one or more targets to Parquet, as a dataset "
        "--out/repo=R/target=T/part-*.parquet. An interrupted export resumes where it stopped "
        "when run again.",
    )
    export.add_argument("--repo", required=True, help="the repo of the targets")
    export.add_argument(
        "--target",
        dest="targets",
        action="append",
        required=True,
        metavar="TARGET",
        help="a target to export (repeat for more)",
    )
    export.add_argument(
        "--out",
        required=True,
        help="the folder or object-store prefix to write: a path, file://..., "
        "s3://bucket/prefix, gs://bucket/prefix or abfs://container/prefix (credentials from "
        "the store's usual environment; pyarrow URI options such as ?endpoint_override=)",
    )
    export.add_argument(
        "--concurrency", type=_int_within(1, 256), default=16, help="pages in flight (default 16)"
    )
    export.add_argument(
        "--page-size",
        type=_int_within(1, 1000),
        default=1000,
        help="rows per page request, 1..1000 (default 1000)",
    )
    export.add_argument(
        "--rows-per-part",
        type=_int_within(1, 100_000_000),
        default=100_000,
        help="rows per Parquet file (default 100000)",
    )
    export.add_argument(
        "--no-resume",
        action="store_true",
        help="refetch everything, replacing an earlier export of these targets",
    )
    export.add_argument(
        "--allow-partial", action="store_true", help="export what an unfinished job has so far"
    )

    emu = commands.add_parser(
        "emulator",
        parents=[common],
        help="run an emulator of the Bread API",
        description="Serve an emulator of the Bread API until interrupted (Ctrl-C).",
    )
    emu.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    emu.add_argument(
        "--port",
        type=_int_within(0, 65535),
        default=8765,
        help="port to bind; 0 picks a free one (default 8765)",
    )
    emu.add_argument("--api-key", help="the key clients must send (default: a random one)")
    emu.add_argument("--scenario", help="a .json or .toml scenario file (targets, faults...)")
    emu.add_argument(
        "--dialect",
        choices=["docs", "spec"],
        help="answer in the docs' shapes (default) or the OpenAPI spec's",
    )
    emu.add_argument(
        "--speed", type=_nonnegative_float, help="emulated seconds per real second (default 1)"
    )
    emu.add_argument("--seed", type=int, help="seed for fault injection (default 0)")
    return parser


# --- output --------------------------------------------------------------------------------


class Ui:
    """Where a command writes: results on stdout, progress and notes on stderr."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False))
        self.out = Console(soft_wrap=True, highlight=False)
        if not self.out.is_terminal:
            # Piped into a file or another program: do not wrap tables at 80 columns.
            self.out = Console(soft_wrap=True, highlight=False, width=240)
        self.err = Console(stderr=True, soft_wrap=True, highlight=False)
        self.live = self.err.is_terminal and not self.quiet

    def note(self, text: str) -> None:
        """A line for a person, on stderr (not with --quiet or --json)."""
        if not self.quiet and not self.json:
            self.err.print(text)

    def result(self, data: Any, table: Table | None = None, text: str | None = None) -> None:
        """The command's result: JSON with --json, else a table and/or text."""
        if self.json:
            sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
            return
        if table is not None:
            self.out.print(table)
        if text:
            self.out.print(text)

    @contextlib.contextmanager
    def progress(self, *, rate: bool = False) -> Iterator[Progress]:
        """A progress display on stderr (inert when stderr is not a terminal)."""
        columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
        if rate:
            columns += [TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
        else:
            columns += [TextColumn("{task.fields[state]}"), TimeElapsedColumn()]
        with Progress(
            *columns, console=self.err, disable=not self.live, transient=False
        ) as progress:
            yield progress


def _client(args: argparse.Namespace, **kwargs: Any) -> Any:
    from ._client import BreadClient

    return BreadClient(
        args.api_key,
        args.base_url,
        max_retries=args.max_retries,
        allow_insecure_http=args.allow_insecure_http,
        **kwargs,
    )


# --- rollout -------------------------------------------------------------------------------


class RolloutView:
    """One bar per target (a handful), or one overall bar (many)."""

    def __init__(self, progress: Progress, targets: list[str]) -> None:
        self._progress = progress
        self._per_target = len(targets) <= 12
        self._tasks: dict[str, TaskID] = {}
        if self._per_target:
            for name in dict.fromkeys(targets):
                self._tasks[name] = progress.add_task(name, total=100, state="starting")
        else:
            self._overall = progress.add_task("rollouts", total=len(set(targets)), state="")

    def __call__(self, update: Any) -> None:
        name = update.target.target_name
        if self._per_target:
            status = update.status
            state = str(status.status) if status is not None else "starting"
            done = 0.0
            if update.result is not None:
                state = str(update.result.outcome)
                done = 100.0
            elif status is not None and status.progress is not None:
                done = status.progress
            self._progress.update(self._tasks[name], completed=done, state=state)
        elif update.result is not None:
            self._progress.advance(self._overall)


def _rollout_rows(results: Any) -> tuple[list[dict[str, Any]], Table]:
    rows = []
    table = Table("target", "outcome", "lines", "polls", "seconds", "error")
    for result in results:
        error = str(result.error) if result.error is not None else None
        rows.append(
            {
                "repo": result.target.repo_name,
                "target": result.target.target_name,
                "outcome": str(result.outcome),
                "status": str(result.status.status) if result.status else None,
                "lines": result.lines,
                "polls": result.polls,
                "seconds": round(result.elapsed, 3),
                "error": error,
            }
        )
        table.add_row(
            str(result.target),
            str(result.outcome),
            "" if result.lines is None else f"{result.lines:,}",
            str(result.polls),
            f"{result.elapsed:.1f}",
            error or "",
        )
    return rows, table


async def cmd_rollout(args: argparse.Namespace, ui: Ui) -> int:
    async with _client(args) as client:
        with ui.progress() as progress:
            view = RolloutView(progress, args.targets)
            results = await client.rollout_many(
                args.targets,
                repo_name=args.repo,
                wait=not args.no_wait,
                wait_for_stim=args.wait_for_stim,
                total_timeout=args.timeout,
                on_progress=view,
            )
    rows, table = _rollout_rows(results)
    summary = results.summary()
    ui.result({"summary": dataclasses.asdict(summary), "targets": rows}, table, str(summary))
    return EXIT_OK if not results.failures() else EXIT_FAILED


# --- status --------------------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace, ui: Ui) -> int:
    import anyio

    from ._fanout import normalise_targets

    refs = normalise_targets(args.targets, args.repo)
    found: dict[str, dict[str, Any]] = {}
    async with _client(args) as client:

        async def one(name: str) -> None:
            entry: dict[str, Any] = {"repo": args.repo, "target": name}
            try:
                stim = await client.targets.stim.get(name, repo_name=args.repo)
                rollout = await client.targets.rollout.get(name, repo_name=args.repo)
            except BreadError as exc:
                entry["error"] = str(exc)
            else:
                entry.update(
                    stim=str(stim.status),
                    stim_lines=stim.lines,
                    rollout=str(rollout.status),
                    lines=rollout.lines,
                    progress_percent=rollout.progress,
                    error=rollout.error,
                )
            found[name] = entry

        async with anyio.create_task_group() as tg:
            for ref in dict.fromkeys(refs):
                tg.start_soon(one, ref.target_name)
    entries = [found[ref.target_name] for ref in refs]
    table = Table("target", "stim", "rollout", "lines", "progress", "error")
    for entry in entries:
        progress = entry.get("progress_percent")
        table.add_row(
            f"{args.repo}/{entry['target']}",
            entry.get("stim", ""),
            entry.get("rollout", ""),
            "" if entry.get("lines") is None else f"{entry['lines']:,}",
            "" if progress is None else f"{progress:.0f}%",
            entry.get("error") or "",
        )
    ui.result(entries, table)
    return EXIT_FAILED if any("stim" not in e for e in entries) else EXIT_OK


# --- export --------------------------------------------------------------------------------


class ExportView:
    """A bar of rows, with rows/s and the time remaining."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task = progress.add_task("rows", total=None, rate="")
        self._done: dict[Any, tuple[int, int]] = {}
        self._started = asyncio.get_running_loop().time()

    def __call__(self, update: Any) -> None:
        self._done[update.target] = (update.rows, update.total)
        rows = sum(done for done, _ in self._done.values())
        total = sum(total for _, total in self._done.values())
        elapsed = max(1e-6, asyncio.get_running_loop().time() - self._started)
        self._progress.update(
            self._task, completed=rows, total=total, rate=f"{rows / elapsed:,.0f} rows/s"
        )


def _export_table(results: Any) -> tuple[list[dict[str, Any]], Table]:
    rows = []
    table = Table("target", "rows", "parts", "MB", "seconds", "error")
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
            f"{result.bytes / 1e6:.1f}",
            f"{result.elapsed:.1f}",
            str(result.error) if result.error is not None else "",
        )
    return rows, table


async def cmd_export(args: argparse.Namespace, ui: Ui) -> int:
    options = {
        "page_size": args.page_size,
        "concurrency": args.concurrency,
        "rows_per_part": args.rows_per_part,
        "resume": not args.no_resume,
        "allow_partial": args.allow_partial,
    }
    async with _client(args) as client:
        with ui.progress(rate=True) as progress:
            # Always the dataset layout (--out/repo=R/target=T/), so one folder can take one
            # target today and more tomorrow without mixing layouts.
            results = await client.export_many(
                args.targets,
                repo_name=args.repo,
                dest=args.out,
                on_progress=ExportView(progress),
                **options,
            )
    if len(results) == 1 and results[0].error is not None:
        raise results[0].error  # one target: its error is the command's, on one line
    rows, table = _export_table(results)
    failures = results.failures()
    out = args.out_abs
    text = f"{results.rows:,} rows in {out}"
    if failures:
        text += f" ({len(failures)} target(s) failed)"
    ui.result({"out": out, "rows": results.rows, "targets": rows}, table, text)
    return EXIT_FAILED if failures else EXIT_OK


# --- demo ----------------------------------------------------------------------------------


async def cmd_demo(args: argparse.Namespace, ui: Ui) -> int:
    from ._client import BreadClient
    from ._config import PollPolicy, RetryPolicy
    from .emulator import Emulator, EmulatorThread, Faults, TargetPlan

    emulator = Emulator(
        speed=10,
        plan=TargetPlan(stim_seconds=6, rollout_seconds=4, seconds_per_line=0.002),
        # A service has bad moments: the demo's has some, and nothing is lost to them.
        faults=Faults(
            latency=0.003,
            jitter=0.01,
            errors={503: 0.03, 502: 0.01},
            retry_after=0.05,
            retry_after_format="ms",
            page_cap=400,
        ),
    )
    with EmulatorThread(emulator) as server:
        ui.note(f"Started the embedded Bread emulator at {server.url} (no key, no network).")
        async with BreadClient(
            emulator.api_key,
            server.url,
            poll=PollPolicy(initial=0.2, maximum=2),
            retry=RetryPolicy(max_retries=8, initial_backoff=0.05, max_backoff=1),
        ) as client:
            for name, (stimuli, per) in DEMO_TARGETS.items():
                await client.targets.create(
                    repo_name=DEMO_REPO,
                    target_name=name,
                    overrides={
                        "model_name": "Qwen/Qwen3-32B",
                        "num_traj_per_stimulus": per,
                        "temperature": 0.8,
                        "generators": [{"type": "oneshot_qs", "numq": stimuli}],
                    },
                )
                await client.targets.stim.run(name, repo_name=DEMO_REPO, poll=False)
            ui.note(
                f"Created {len(DEMO_TARGETS)} targets in {DEMO_REPO} and started their "
                "stim jobs; rollouts start as each stim completes."
            )
            names = list(DEMO_TARGETS)
            with ui.progress() as progress:
                rollouts = await client.rollout_many(
                    names,
                    repo_name=DEMO_REPO,
                    wait_for_stim=True,
                    on_progress=RolloutView(progress, names),
                )
            ui.note(str(rollouts.summary()))
            with ui.progress(rate=True) as progress:
                exports = await client.export_many(
                    names,
                    repo_name=DEMO_REPO,
                    dest=args.out,
                    rows_per_part=2000,
                    on_progress=ExportView(progress),
                )
            retries = client.stats.retries
    rows, table = _export_table(exports)
    out = args.out_abs
    faults = emulator.stats.faults()
    text = (
        f"{exports.rows:,} rows from {len(exports)} targets in {out}\n"
        f"(the emulator injected {faults} faults; the client retried {retries} times)\n\n"
        + READ_HINT.format(out=args.out)
    )
    ui.result(
        {
            "out": str(out),
            "rows": exports.rows,
            "faults_injected": faults,
            "retries": retries,
            "rollouts": dataclasses.asdict(rollouts.summary()),
            "targets": rows,
        },
        table,
        text,
    )
    ok = not rollouts.failures() and not exports.failures()
    return EXIT_OK if ok else EXIT_FAILED


# --- emulator ------------------------------------------------------------------------------


async def cmd_emulator(args: argparse.Namespace, ui: Ui) -> int:
    from .emulator import Emulator, EmulatorServer

    overrides = {
        key: value
        for key, value in (
            ("api_key", args.api_key),
            ("dialect", args.dialect),
            ("speed", args.speed),
            ("seed", args.seed),
        )
        if value is not None
    }
    try:
        emulator = Emulator.from_scenario(args.scenario or {}, **overrides)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    server = EmulatorServer(emulator, args.host, args.port)
    try:
        url = await server.start()
    except OSError as exc:
        raise _Failure(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers go in before the URL is printed: whoever reads it may signal at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        targets = emulator.targets()
        if args.json:
            line = {
                "url": url,
                "api_key": emulator.api_key,
                "dialect": emulator.dialect,
                "targets": targets,
            }
            print(orjson.dumps(line).decode(), flush=True)
        else:
            if targets:
                shown = ", ".join(targets[:5])
                if len(targets) > 5:
                    shown += f" and {len(targets) - 5} more"
                print(f"Serving {len(targets)} target(s) from the scenario: {shown}", flush=True)
            print(
                f"Bread emulator ({emulator.dialect} dialect) listening on {url}\n"
                f"  export BREAD_BASE_URL={url}\n"
                f"  export BREAD_API_KEY={emulator.api_key}\n"
                "Press Ctrl-C to stop.",
                flush=True,
            )
        await stop.wait()
    finally:
        await server.aclose()
    return EXIT_OK


class _Failure(Exception):
    """A runtime failure of the command itself, with a message for a person."""


COMMANDS = {
    "demo": cmd_demo,
    "rollout": cmd_rollout,
    "status": cmd_status,
    "export": cmd_export,
    "emulator": cmd_emulator,
}


def _without_key(argv: list[str]) -> list[str]:
    """The command line with the API key's value hidden, fit to show back."""
    shown: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            shown.append("***")
            hide = False
        elif arg == "--api-key":
            shown.append(arg)
            hide = True
        elif arg.startswith("--api-key="):
            shown.append("--api-key=***")
        else:
            shown.append(arg)
    return shown


def _interrupted_note(args: argparse.Namespace, argv: list[str]) -> str:
    if args.command in ("export", "demo"):
        again = shlex.join(["breadasync", *_without_key(argv)])
        return (
            "interrupted: the parts already written are kept; run the same command "
            f"again to resume ({again})"
        )
    if args.command == "rollout":
        return (
            "interrupted: jobs already started keep running on the service; run the "
            "same command again to watch them (starting is idempotent)"
        )
    return "interrupted"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if getattr(args, "out", None) is not None:
        # Before the event loop (it asks the OS); a URI (s3://...) is shown as given.
        args.out_abs = args.out if "://" in args.out else os.path.abspath(args.out)
    ui = Ui(args)
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG,
            stream=sys.stderr,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
        )
    try:
        try:
            return asyncio.run(COMMANDS[args.command](args, ui))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    except KeyboardInterrupt:
        ui.err.print(f"breadasync: {_interrupted_note(args, argv)}")
        return EXIT_INTERRUPTED
    except (ConfigError, InvalidArgumentError) as exc:
        ui.err.print(f"breadasync {args.command}: error: {exc}", markup=False)
        return EXIT_USAGE
    except (BreadError, _Failure) as exc:
        ui.err.print(f"breadasync {args.command}: error: {exc}", markup=False)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
