"""The commands other than ``export``: rollout, status, targets list, demo, emulator and
completion. Each takes the parsed arguments and a :class:`Ui`, and returns an exit code."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
from typing import Any

import orjson
from rich.progress import Progress, TaskID
from rich.table import Table

from breadasync._errors import BreadError, ConfigError
from breadasync._models import TargetRef

from ._args import (
    DEMO_REPO,
    DEMO_TARGETS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ExportWatch,
    make_client,
)
from ._export import ExportView, all_targets, export_table
from ._output import Ui

READ_HINT = (
    "Read it with pandas (pip install pandas): pandas.read_parquet('{out}')\n"
    'or DuckDB (pip install duckdb):           duckdb.sql("SELECT * FROM read_parquet('
    "'{out}/**/*.parquet', hive_partitioning=true)\")"
)


class Failure(Exception):
    """A runtime failure of the command itself, with a message for a person."""


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
    """Start the rollouts and watch them to the end."""
    async with make_client(args) as client:
        targets = await all_targets(client, args.repo) if args.all else args.targets
        with ui.progress() as progress:
            view = RolloutView(progress, targets)
            results = await client.rollout_many(
                targets,
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
    """The stim and rollout status of each target."""
    import anyio

    found: dict[str, dict[str, Any]] = {}
    async with make_client(args) as client:
        if not args.all:
            for name in args.targets:
                # Every name given checked before anything is asked, as the other commands
                # do: a mistake is a usage error (exit 2), not one failed target of many.
                TargetRef.of(name, args.repo)
        targets = await all_targets(client, args.repo) if args.all else args.targets
        limiter = anyio.CapacityLimiter(64)

        async def one(name: str) -> None:
            entry: dict[str, Any] = {"repo": args.repo, "target": name}
            try:
                async with limiter:
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
            for name in targets:
                tg.start_soon(one, name)
    entries = [found[name] for name in targets]
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
    ui.result({"targets": entries}, table)
    return EXIT_FAILED if any("stim" not in e for e in entries) else EXIT_OK


# --- targets list --------------------------------------------------------------------------


async def cmd_targets_list(args: argparse.Namespace, ui: Ui) -> int:
    """The names of a repo's targets: a table, one name a line with --quiet, or JSON."""
    async with make_client(args) as client:
        names = await all_targets(client, args.repo)
    if ui.quiet and not ui.json:
        # For pipes: 'breadasync targets list --repo r -q | breadasync export --targets-from -'
        ui.stdout.write("".join(f"{name}\n" for name in names))
        return EXIT_OK
    table = Table("repo", "target")
    for name in names:
        table.add_row(args.repo, name)
    ui.result(
        {"repo": args.repo, "count": len(names), "targets": names},
        table,
        f"{len(names)} target(s) in {args.repo}",
    )
    return EXIT_OK


# --- completion ----------------------------------------------------------------------------


async def cmd_completion(args: argparse.Namespace, ui: Ui) -> int:
    """Print the completion script for a shell (generated by shtab from the parser)."""
    try:
        import shtab
    except ImportError:
        ui.error(
            "breadasync completion: error: shell completion needs shtab: "
            "pip install 'breadasync[cli]'"
        )
        return EXIT_USAGE
    from ._args import build_parser

    parser, _ = build_parser()
    script = shtab.complete(parser, shell=args.shell)
    if ui.json:
        ui.document({"shell": args.shell, "script": script})
    else:
        ui.stdout.write(script if script.endswith("\n") else script + "\n")
    return EXIT_OK


# --- demo ----------------------------------------------------------------------------------


async def cmd_demo(args: argparse.Namespace, ui: Ui, watch: ExportWatch) -> int:
    """The whole job against an embedded emulator."""
    from breadasync._client import BreadClient
    from breadasync._config import PollPolicy, RetryPolicy
    from breadasync.emulator import Emulator, EmulatorThread, Faults, TargetPlan

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
            watch.targets = names
            with ui.progress(rate=True) as progress:
                exports = await client.export_many(
                    names,
                    repo_name=DEMO_REPO,
                    dest=args.out,
                    rows_per_part=2000,
                    # Each demo runs new jobs (an export is of one job): a second demo
                    # replaces the first one's export instead of refusing it.
                    resume=False,
                    on_progress=ExportView(progress, watch),
                )
            retries = client.stats.retries
    rows, table = export_table(exports)
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
    """Serve an emulator until SIGINT or SIGTERM."""
    from breadasync.emulator import Emulator, EmulatorServer

    overrides = {
        key: value
        for key, value in (
            ("api_key", args.api_key),
            ("dialect", args.dialect),
            ("profile", args.profile),
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
        raise Failure(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers go in before the URL is printed: whoever reads it may signal at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        targets = emulator.targets()
        # A key the user chose is theirs already: it is not printed back (and would be
        # scrubbed); a random one is the point of the output.
        key = None if args.api_key else emulator.api_key
        if args.json:
            line = {"url": url, "api_key": key, "dialect": emulator.dialect, "targets": targets}
            ui.stdout.write(orjson.dumps(line).decode() + "\n")
        else:
            if targets:
                shown = ", ".join(targets[:5])
                if len(targets) > 5:
                    shown += f" and {len(targets) - 5} more"
                ui.stdout.write(f"Serving {len(targets)} target(s) from the scenario: {shown}\n")
            ui.stdout.write(
                f"Bread emulator ({emulator.dialect} dialect) listening on {url}\n"
                f"  export BREAD_BASE_URL={url}\n"
                f"  export BREAD_API_KEY={key or '<the key given with --api-key>'}\n"
                "Press Ctrl-C to stop.\n"
            )
        ui.stdout.flush()
        await stop.wait()
    finally:
        await server.aclose()
    return EXIT_OK
