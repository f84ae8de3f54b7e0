"""The command line's grammar: parsers, option types, and which targets a command is given.

Light on purpose: ``breadasync --version`` and every usage error run only this module (no
pyarrow, rich or aiohttp), so they answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from breadasync._redact import Redactor
from breadasync._version import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DEMO_REPO = "demo_repo"
"""The repo ``breadasync demo`` creates its targets in."""
DEMO_TARGETS = {  # name -> (stimuli, trajectories per stimulus)
    "coding": (2400, 5),
    "math": (1800, 5),
    "writing": (1200, 4),
    "translation": (3000, 3),
    "reasoning": (1500, 6),
    "safety": (900, 4),
}
KEY_ENV = "BREAD_API_KEY"
KEY_OPTION = "--api-key"


class Scrub:
    """Replaces each secret in a text, and any long enough fragment of one (see
    :class:`~breadasync._redact.Redactor`), with ``***``.

    A short secret is still hidden where it is a whole command-line word (see
    ``_interrupted``), but not inside other text: hiding every ``k`` of a one-letter test key
    would garble the output without protecting anything.
    """

    MIN_LENGTH = 4

    def __init__(self, secrets: Iterable[str]) -> None:
        # Bare (the client strips the key it sends, and a service echoes that copy; the
        # padding's fragments would also eat the text around it), longest first (a secret
        # inside another is hidden as part of it).
        bare = {s.strip() for s in secrets}
        self.secrets = sorted((s for s in bare if len(s) >= self.MIN_LENGTH), key=len, reverse=True)
        self._redactors = [Redactor(secret) for secret in self.secrets]

    def __call__(self, text: str) -> str:
        for redactor in self._redactors:
            text = redactor.text(text)
        return text


# What shtab completes an option's value with (its FILE and DIRECTORY, spelled out here so
# building the parser does not import shtab).
_FILES = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_FOLDERS = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}


class UsageError(Exception):
    """A mistake on the command line: one line for a person (exit code 2)."""

    def __init__(self, message: str, prog: str = "breadasync") -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An argument parser without abbreviations whose errors are one line.

    Abbreviations are off because an abbreviated ``--api-k SECRET`` would otherwise be
    accepted and later echoed back; errors raise :class:`UsageError` so the caller prints
    them once, as text or as JSON.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise the error instead of printing the usage block and exiting."""
        raise UsageError(message, self.prog)


# --- option types --------------------------------------------------------------------------


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
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


# --- the parser ----------------------------------------------------------------------------


def _common() -> Parser:
    common = Parser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        help="print exactly one JSON document on stdout, errors included (for scripts)",
    )
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log each request (method, path, status, attempt, wait) to stderr; -vv: more",
    )
    loudness.add_argument("-q", "--quiet", action="store_true", help="no progress, only the result")
    return common


def _service(common: Parser) -> Parser:
    service = Parser(add_help=False, parents=[common])
    service.add_argument(
        "--base-url", help="the service (default: $BREAD_BASE_URL, then the public API)"
    )
    service.add_argument(KEY_OPTION, help=f"the API key (default: ${KEY_ENV})")
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
    service.add_argument(
        "--request-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds one attempt of a request may take before it is retried (default: 60 "
        "s without a byte, 120 s in all)",
    )
    return service


def _selection(service: Parser) -> Parser:
    """Targets, the same way for every command that takes them."""
    chosen = Parser(add_help=False, parents=[service])
    chosen.add_argument("--repo", required=True, help="the repo of the targets")
    chosen.add_argument(
        "targets", nargs="*", metavar="TARGET", help="target names (or use the options below)"
    )
    files = chosen.add_argument(
        "--targets-from",
        metavar="FILE",
        action="append",
        default=[],
        help="read target names from FILE, one a line ('-' for stdin; '#' comments and blank "
        "lines are ignored); repeatable",
    )
    files.complete = _FILES  # type: ignore[attr-defined]
    chosen.add_argument(
        "--all", action="store_true", help="every target of the repo (asks the service)"
    )
    return chosen


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The ``breadasync`` parser, and its command parsers by name."""
    common = _common()
    service = _service(common)
    chosen = _selection(service)

    parser = Parser(
        prog="breadasync",
        description="Start, watch and export Bread rollouts at scale. Try 'breadasync demo'.",
        epilog="Exit codes: 0 done, 1 a target or request failed, 2 usage or configuration, "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"breadasync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    by_name: dict[str, Parser] = {}

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="the whole job against an embedded emulator",
        description="Start the embedded emulator (no key, no network), create a few targets, "
        "run their rollouts with live progress, export them to Parquet and summarise.",
    )
    out = demo.add_argument(
        "--out", default="bread-demo", help="dataset folder to write (default ./bread-demo)"
    )
    out.complete = _FOLDERS  # type: ignore[attr-defined]
    by_name["demo"] = demo

    rollout = commands.add_parser(
        "rollout",
        parents=[chosen],
        help="start and watch rollouts",
        description="Start the rollouts of the given targets and watch them to the end. Exit "
        "0 if all completed, 1 if any failed or errored.",
    )
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
    by_name["rollout"] = rollout

    by_name["status"] = commands.add_parser(
        "status",
        parents=[chosen],
        help="show stim and rollout status",
        description="Show the stim and rollout status of the given targets.",
    )

    by_name["export"] = _export_parser(commands, chosen)

    targets = commands.add_parser(
        "targets",
        help="list a repo's targets",
        description="Work with a repo's targets.",
    )
    targets_commands = targets.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = targets_commands.add_parser(
        "list",
        parents=[service],
        help="the names of a repo's targets",
        description="List the targets of a repo (one name a line with --quiet, for pipes).",
    )
    listing.add_argument("--repo", required=True, help="the repo")
    by_name["targets"] = targets
    by_name["targets list"] = listing

    by_name["emulator"] = _emulator_parser(commands, common)

    completion = commands.add_parser(
        "completion",
        parents=[common],
        help="print a shell completion script",
        description="Print the completion script for bash or zsh. Bash: "
        "'breadasync completion bash > ~/.local/share/bash-completion/completions/breadasync'"
        "; zsh: 'breadasync completion zsh > ~/.zfunc/_breadasync' (with ~/.zfunc in "
        "fpath). Needs shtab: pip install 'breadasync[cli]'.",
    )
    completion.add_argument("shell", choices=["bash", "zsh"], help="the shell")
    by_name["completion"] = completion
    return parser, by_name


def _export_parser(commands: Any, chosen: Parser) -> Parser:
    export: Parser = commands.add_parser(
        "export",
        parents=[chosen],
        help="export rollout output to Parquet",
        description="Export the rollout output of one or more targets to Parquet, as a dataset "
        "--out/repo=R/target=T/part-*.parquet. An interrupted export resumes where it stopped "
        "when run again.",
    )
    export.add_argument(
        "--target",
        dest="target_flags",
        action="append",
        default=[],
        metavar="TARGET",
        help="a target to export (repeatable; the same as a positional TARGET)",
    )
    out = export.add_argument(
        "--out",
        required=True,
        help="the folder or object-store prefix to write: a path, file://..., "
        "s3://bucket/prefix, gs://bucket/prefix or abfs://container/prefix (credentials from "
        "the store's usual environment; pyarrow URI options such as ?endpoint_override=)",
    )
    out.complete = _FOLDERS  # type: ignore[attr-defined]
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
        default=10_000,
        help="rows per Parquet file (default 10000)",
    )
    export.add_argument(
        "--no-resume",
        action="store_true",
        help="refetch everything, replacing an earlier export of these targets",
    )
    export.add_argument(
        "--allow-partial", action="store_true", help="export what an unfinished job has so far"
    )
    export.add_argument(
        "--columns",
        choices=("json", "typed"),
        default="json",
        help="json (default): undocumented fields as JSON text in 'extra'; typed: messages, "
        "usage, finish_reason, reward and tool_calls as typed columns too (docs/SCHEMA.md)",
    )
    export.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (targets, lines, pages, parts, estimated bytes) and stop; reads "
        "each job's status and one small sample page, no output is exported",
    )
    return export


def _emulator_parser(commands: Any, common: Parser) -> Parser:
    emu: Parser = commands.add_parser(
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
    emu.add_argument(
        KEY_OPTION,
        help="the key clients must send (default: a random one, printed; a key given here is "
        "not printed back)",
    )
    scenario = emu.add_argument(
        "--scenario", help="a .json or .toml scenario file (targets, faults...)"
    )
    scenario.complete = _FILES  # type: ignore[attr-defined]
    emu.add_argument(
        "--dialect",
        choices=["docs", "spec"],
        help="answer in the docs' shapes (default) or the OpenAPI spec's",
    )
    emu.add_argument(
        "--profile",
        choices=["realistic", "simple"],
        help="the data profile: rows and jobs as the world has them (default), or the "
        "friendly 'simple' rows",
    )
    emu.add_argument(
        "--speed", type=_nonnegative_float, help="emulated seconds per real second (default 1)"
    )
    emu.add_argument("--seed", type=int, help="seed for fault injection (default 0)")
    return emu


@dataclass
class ExportWatch:
    """What the CLI knows about a running export, kept for the Ctrl-C message.

    ``totals`` holds the rows each target's export will hold, once it has been planned
    (its first progress report); ``out`` is the dataset folder.
    """

    out: str
    repo: str
    targets: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)


# --- reading the command line --------------------------------------------------------------


def secrets_in(argv: Sequence[str], environ: Mapping[str, str]) -> set[str]:
    """Every value that may be the API key, however it was spelled, before parsing.

    Abbreviations are refused, but an error message must not echo a key given as
    ``--api-k SECRET`` either: any option that starts like ``--api`` hides its value.
    """
    found = {environ.get(KEY_ENV, "")}
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("--api"):
            name, equals, value = arg.partition("=")
            if equals:
                found.add(value)
            elif i + 1 < len(argv) and KEY_OPTION.startswith(name):
                found.add(argv[i + 1])
    return {s for s in found if s}


def wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` was asked for (known even when parsing fails)."""
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; a mistake raises :class:`UsageError` naming its command."""
    parser, by_name = build_parser()
    args, extras = parser.parse_known_args(argv)
    name = args.command + (f" {args.action}" if getattr(args, "action", None) else "")
    if hasattr(args, "targets"):
        # Target names after an option ('a --target b c') are names too: argparse fills a
        # positional list only once.
        words = [e for e in extras if not e.startswith("-")]
        if len(words) == len(extras):
            args.targets += words
            extras = []
    if extras:
        # Only the first stray option, cut at '=', so a mistyped key option cannot echo a key.
        first = next((e for e in extras if e.startswith("-")), extras[0]).partition("=")[0]
        raise UsageError(f"unrecognized argument: {first}", by_name[name].prog)
    args.name = name
    args.prog = by_name[name].prog
    if hasattr(args, "targets"):
        args.targets = _chosen_targets(args)
    return args


def _chosen_targets(args: argparse.Namespace) -> list[str]:
    """Positional names, ``--target`` flags and ``--targets-from`` files, in order, once."""
    names = list(getattr(args, "target_flags", []))
    names += args.targets
    for source in args.targets_from:
        try:
            names += read_targets(source)
        except UsageError as exc:
            raise UsageError(str(exc), args.prog) from None
    if args.all and names:
        raise UsageError("--all takes every target of the repo: give no target names", args.prog)
    if not args.all and not names:
        raise UsageError(
            "no targets: give TARGET names, --targets-from FILE (or - for stdin), or --all",
            args.prog,
        )
    return list(dict.fromkeys(names))


def read_targets(source: str) -> list[str]:
    """Target names from a file (or stdin for ``-``): one a line, ``#`` comments skipped."""
    try:
        if source == "-":
            lines: Iterable[str] = sys.stdin.read().splitlines()
        else:
            with open(source, encoding="utf-8") as file:
                lines = file.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read targets from {source!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read targets from {source!r}: it is not UTF-8 text") from None
    names = []
    for line in lines:
        name = line.strip()
        if name and not name.startswith("#"):
            names.append(name)
    return names


def make_client(args: argparse.Namespace, **kwargs: Any) -> Any:
    """A :class:`~breadasync.BreadClient` for the service options of ``args``."""
    from breadasync._client import BreadClient

    if args.request_timeout is not None:
        kwargs.setdefault("timeout", args.request_timeout)
    return BreadClient(
        args.api_key,
        args.base_url,
        max_retries=args.max_retries,
        allow_insecure_http=args.allow_insecure_http,
        **kwargs,
    )
