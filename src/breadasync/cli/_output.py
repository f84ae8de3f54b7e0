"""Where the command line writes: results on stdout, progress and notes on stderr, logs with
``-v``, and the API key scrubbed from every byte of it."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ._args import Scrub


class ScrubbedStream:
    """A text stream that scrubs what is written to it (rich and print write through it)."""

    def __init__(self, stream: IO[str], scrub: Scrub) -> None:
        self._stream = stream
        self._scrub = scrub

    def write(self, text: str) -> int:
        """Write ``text`` without secrets."""
        return self._stream.write(self._scrub(text))

    def flush(self) -> None:
        """Flush the stream beneath."""
        self._stream.flush()

    def isatty(self) -> bool:
        """Whether the stream beneath is a terminal."""
        return self._stream.isatty()

    def fileno(self) -> int:
        """The stream beneath's descriptor (rich asks it for the terminal size)."""
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        """The stream beneath's encoding."""
        return getattr(self._stream, "encoding", "utf-8") or "utf-8"


class Ui:
    """Where a command writes: results on stdout, progress and notes on stderr."""

    def __init__(self, args: argparse.Namespace, scrub: Scrub) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False))
        self.scrub = scrub
        self.stdout = ScrubbedStream(sys.stdout, scrub)
        self.stderr = ScrubbedStream(sys.stderr, scrub)
        self.out = Console(file=self.stdout, soft_wrap=True, highlight=False)  # type: ignore[arg-type]
        if not self.out.is_terminal:
            # Piped into a file or another program: do not wrap tables at 80 columns.
            self.out = Console(file=self.stdout, soft_wrap=True, highlight=False, width=240)  # type: ignore[arg-type]
        self.err = Console(file=self.stderr, soft_wrap=True, highlight=False)  # type: ignore[arg-type]
        self.live = self.err.is_terminal and not self.quiet and not self.json

    def note(self, text: str) -> None:
        """A line for a person, on stderr (not with --quiet or --json)."""
        if not self.quiet and not self.json:
            self.err.print(text, markup=False)

    def error(self, text: str) -> None:
        """An error line on stderr, always (with --json too: stdout holds the document)."""
        self.err.print(text, markup=False)

    def document(self, data: Any) -> None:
        """Print one JSON document on stdout."""
        self.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        self.stdout.flush()

    def result(self, data: Any, table: Table | None = None, text: str | None = None) -> None:
        """The command's result: JSON with --json, else a table and/or text."""
        if self.json:
            self.document(data)
            return
        if table is not None:
            self.out.print(table)
        if text:
            self.out.print(text, markup=False)

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


class _ScrubbingFormatter(logging.Formatter):
    """Formats a record, then scrubs the whole line (message, arguments and traceback)."""

    def __init__(self, scrub: Scrub, fmt: str) -> None:
        super().__init__(fmt)
        self._scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        """The record's line, without secrets."""
        return self._scrub(super().format(record))


def setup_logging(verbose: int, stream: IO[str], scrub: Scrub) -> Callable[[], None]:
    """``-v``: breadasync's own records (each request, each retry) on stderr; ``-vv``: also
    aiohttp's. asyncio's debug chatter (which selector it picked) is never shown.

    Returns what undoes it (``main`` may run many times in one process).
    """
    # asyncio's debug mode (PYTHONASYNCIODEBUG) warns of every slow callback, which a busy
    # machine makes common: chatter about the machine, not the command. Its errors stay.
    noisy = logging.getLogger("asyncio")
    noisy_level = noisy.level
    noisy.setLevel(max(noisy.getEffectiveLevel(), logging.ERROR))
    if not verbose:
        return lambda: noisy.setLevel(noisy_level)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        _ScrubbingFormatter(scrub, "%(asctime)s %(name)s %(levelname)s %(message)s")
    )
    loggers = [logging.getLogger(name) for name in ["breadasync", "aiohttp"][: min(verbose, 2)]]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        # Our handler alone: a root handler an embedding program set up would print twice.
        logger.propagate = False

    def undo() -> None:
        noisy.setLevel(noisy_level)
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate

    return undo
