"""The ``breadasync`` command: the library's work, from a terminal.

Exit codes: 0 done; 1 a target failed or a request could not be made; 2 bad usage or
configuration; 130 interrupted (Ctrl-C). Progress goes to stderr, and only to a terminal;
with ``--json`` stdout holds exactly one JSON document, errors included.

Layout: ``_args`` (the grammar; all that ``--version`` and usage errors load), ``_output``
(stdout/stderr/logging, the key scrubbed), ``_export`` (export, ``--dry-run``, Ctrl-C
accounting), ``_commands`` (the other commands). rich, pyarrow and aiohttp load only once a
command runs.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from breadasync._redact import HIDDEN

from ._args import (
    DEMO_REPO,
    DEMO_TARGETS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    KEY_OPTION,
    ExportWatch,
    Scrub,
    UsageError,
    parse,
    secrets_in,
    wants_json,
)

if TYPE_CHECKING:
    import argparse

    from ._output import Ui

__all__ = [
    "COMMANDS",
    "DEMO_REPO",
    "DEMO_TARGETS",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

"""The demo's targets: name -> (stimuli, trajectories per stimulus)."""

Command = Callable[["argparse.Namespace", "Ui"], Coroutine[Any, Any, int]]


async def _rollout(args: argparse.Namespace, ui: Ui) -> int:
    from ._commands import cmd_rollout

    return await cmd_rollout(args, ui)


async def _status(args: argparse.Namespace, ui: Ui) -> int:
    from ._commands import cmd_status

    return await cmd_status(args, ui)


async def _export(args: argparse.Namespace, ui: Ui) -> int:
    from ._export import cmd_export

    return await cmd_export(args, ui, args.export_watch)


async def _targets_list(args: argparse.Namespace, ui: Ui) -> int:
    from ._commands import cmd_targets_list

    return await cmd_targets_list(args, ui)


async def _demo(args: argparse.Namespace, ui: Ui) -> int:
    from ._commands import cmd_demo

    return await cmd_demo(args, ui, args.export_watch)


async def _emulator(args: argparse.Namespace, ui: Ui) -> int:
    from ._commands import cmd_emulator

    return await cmd_emulator(args, ui)


async def _completion(args: argparse.Namespace, ui: Ui) -> int:
    from ._commands import cmd_completion

    return await cmd_completion(args, ui)


COMMANDS: dict[str, Command] = {
    "demo": _demo,
    "rollout": _rollout,
    "status": _status,
    "export": _export,
    "targets list": _targets_list,
    "emulator": _emulator,
    "completion": _completion,
}
"""Each command's coroutine, by name (each imports its heavy modules when it runs)."""


def _without_key(argv: list[str], secrets: set[str]) -> list[str]:
    """The command line with the API key's value hidden, fit to show back."""
    shown: list[str] = []
    hide = False
    for arg in argv:
        if hide or arg in secrets:
            shown.append(HIDDEN)
            hide = False
        elif arg == KEY_OPTION:
            shown.append(arg)
            hide = True
        elif arg.startswith(KEY_OPTION + "="):
            shown.append(f"{KEY_OPTION}={HIDDEN}")
        else:
            shown.append(arg)
    return shown


def _interrupted(
    args: argparse.Namespace, argv: list[str], secrets: set[str]
) -> tuple[str, dict[str, Any]]:
    """What Ctrl-C leaves behind, in a sentence and in numbers: only what is true."""
    watch = getattr(args, "export_watch", None)
    if watch is not None:
        from ._export import interrupted_export

        state, numbers = interrupted_export(watch)
        again = shlex.join(["breadasync", *_without_key(argv, secrets)])
        return f"interrupted: {state}. Run the same command again to resume: {again}", numbers
    if args.command == "rollout":
        return (
            "interrupted: jobs already started keep running on the service; run the "
            "same command again to watch them (starting is idempotent)"
        ), {}
    return "interrupted", {}


def _fail_document(code: int, kind: str, message: str, **more: Any) -> dict[str, Any]:
    return {"ok": False, "exit_code": code, "error": {"type": kind, "message": message}, **more}


def _usage_error(exc: UsageError, as_json: bool, scrub: Scrub) -> int:
    """One line on stderr (and one JSON document on stdout with --json); no rich needed."""
    message = scrub(str(exc))
    line = f"{exc.prog}: error: {message} (see '{exc.prog} --help')"
    if as_json:
        document = _fail_document(EXIT_USAGE, "usage", message)
        sys.stdout.write(scrub(json.dumps(document, indent=2)) + "\n")
    sys.stderr.write(scrub(line) + "\n")
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    secrets = secrets_in(argv, os.environ)
    scrub = Scrub(secrets)
    try:
        args = parse(argv)
    except UsageError as exc:
        return _usage_error(exc, wants_json(argv), scrub)
    out = getattr(args, "out", None)
    if out is not None:
        # Before the event loop (it asks the OS); a store URL stays as it is.
        # ~ as the library reads it (a shell leaves it alone after --out=).
        args.out_abs = out if "://" in out else os.path.abspath(os.path.expanduser(out))
    if args.command in ("export", "demo"):
        # Made before the command runs, so Ctrl-C at any moment finds it.
        args.export_watch = ExportWatch(args.out, getattr(args, "repo", DEMO_REPO))
    try:
        return _run(args, argv, secrets, scrub)
    except KeyboardInterrupt:
        # Ctrl-C while the command was still loading (rich, aiohttp), before its own
        # handling began: the same one line (and document), without rich.
        message, more = _interrupted(args, argv, secrets)
        if wants_json(argv):
            document = _fail_document(EXIT_INTERRUPTED, "interrupted", message, **more)
            sys.stdout.write(scrub(json.dumps(document, indent=2)) + "\n")
        sys.stderr.write(scrub(f"breadasync: {message}") + "\n")
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace, argv: list[str], secrets: set[str], scrub: Scrub) -> int:
    import asyncio

    # The HTTP sender (aiohttp) loads lazily; load it before the event loop starts so its
    # import never stalls the loop (asyncio's debug mode would report a slow callback).
    import breadasync._aiohttp_transport  # noqa: F401
    from breadasync._errors import BreadError, ConfigError, InvalidArgumentError, first_error

    from ._commands import Failure
    from ._output import Ui, setup_logging

    ui = Ui(args, scrub)
    undo_logging = setup_logging(getattr(args, "verbose", 0), ui.stderr, scrub)  # type: ignore[arg-type]
    kind, code, message = "", EXIT_OK, ""
    more: dict[str, Any] = {}

    try:
        try:
            return asyncio.run(COMMANDS[args.name](args, ui))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
    except KeyboardInterrupt:
        kind, code = "interrupted", EXIT_INTERRUPTED
        message, more = _interrupted(args, argv, secrets)
    except UsageError as exc:
        kind, code, message = "usage", EXIT_USAGE, str(exc)
    except (ConfigError, InvalidArgumentError) as exc:
        kind, code, message = type(exc).__name__, EXIT_USAGE, str(exc)
    except (BreadError, Failure) as exc:
        kind, code, message = type(exc).__name__, EXIT_FAILED, str(exc)
    except Exception as exc:
        # Unforeseen (a bug, or a failure nothing typed): still one line, still scrubbed;
        # the traceback only on request, through the same scrubbing stream.
        kind, code = type(exc).__name__, EXIT_FAILED
        message = f"unexpected {type(exc).__name__}: {exc}"
        if getattr(args, "verbose", 0):
            ui.error(traceback.format_exc().rstrip())
        else:
            message += " (run with -v for the traceback)"
    finally:
        undo_logging()
    if ui.json:
        ui.document(_fail_document(code, kind, message, **more))
    if kind == "interrupted":
        ui.error(f"breadasync: {message}")
    else:
        ui.error(f"{args.prog}: error: {message}")
    return code


if __name__ == "__main__":
    sys.exit(main())
