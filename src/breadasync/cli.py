"""The ``breadasync`` command."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import orjson

from ._version import __version__


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not within 0..65535")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="breadasync", description="Drive the Bread rollout API at scale."
    )
    parser.add_argument("--version", action="version", version=f"breadasync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    emu = commands.add_parser(
        "emulator",
        help="run an emulator of the Bread API (for tests and demos)",
        description="Serve an emulator of the Bread API until interrupted (Ctrl-C).",
    )
    emu.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    emu.add_argument(
        "--port", type=_port, default=8765, help="port to bind; 0 picks a free one (default 8765)"
    )
    emu.add_argument("--api-key", help="the key clients must send (default: a random one)")
    emu.add_argument("--scenario", help="a .json or .toml scenario file (targets, faults, ...)")
    emu.add_argument(
        "--dialect",
        choices=["docs", "spec"],
        help="answer in the docs' shapes (default) or the OpenAPI spec's",
    )
    emu.add_argument(
        "--speed", type=_positive_float, help="emulated seconds per real second (default 1)"
    )
    emu.add_argument("--seed", type=int, help="seed for fault injection (default 0)")
    emu.add_argument(
        "--json", action="store_true", help="print the URL and key as one JSON line (for scripts)"
    )
    return parser


async def _serve_emulator(args: argparse.Namespace) -> int:
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
        print(f"breadasync emulator: {exc}", file=sys.stderr)
        return 2
    server = EmulatorServer(emulator, args.host, args.port)
    try:
        url = await server.start()
    except OSError as exc:
        print(
            f"breadasync emulator: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers go in before the URL is printed: whoever reads it may signal at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.json:
            line = {"url": url, "api_key": emulator.api_key, "dialect": emulator.dialect}
            print(orjson.dumps(line).decode(), flush=True)
        else:
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "emulator":
        return asyncio.run(_serve_emulator(args))
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
