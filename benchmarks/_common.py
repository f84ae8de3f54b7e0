"""Shared benchmark plumbing: an emulator in its own process, timing, and RESULTS.md.

Every benchmark runs on the emulator's ``realistic`` data profile (rows and jobs as the world
has them) unless ``--profile simple`` asks for the friendly one; that run writes its own
section of RESULTS.md, labelled, beside the realistic one.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SCRIPT = Path(sys.executable).with_name("breadasync")
PROFILES = ("realistic", "simple")
PROFILE = "realistic"
"""The data profile of every emulator this run starts (set by :func:`use_profile`)."""


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    """``--profile realistic|simple`` (default realistic)."""
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default="realistic",
        help="the emulator's data profile: realistic (default) or the friendly 'simple'",
    )


def use_profile(profile: str) -> None:
    """Run every emulator of this process with ``profile``."""
    global PROFILE
    if profile not in PROFILES:
        raise SystemExit(f"unknown profile {profile!r}; use one of {PROFILES}")
    PROFILE = profile


def parse_profile(argv: list[str] | None = None) -> str:
    """Parse a command line that takes only ``--profile``; applies it and returns it."""
    parser = argparse.ArgumentParser()
    add_profile_argument(parser)
    profile: str = parser.parse_args(argv).profile
    use_profile(profile)
    return profile


def section(name: str) -> str:
    """The RESULTS.md section of benchmark ``name`` for this run's profile."""
    return name if PROFILE == "realistic" else f"{name}-{PROFILE}"


def profile_label() -> str:
    """How a section names the data it measured."""
    if PROFILE == "realistic":
        return "the emulator's realistic data profile"
    return "the emulator's friendly `simple` profile (not what the world sends)"


@dataclass
class RemoteEmulator:
    """An emulator running as ``breadasync emulator`` in a child process."""

    url: str
    api_key: str
    process: psutil.Process

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)


@contextmanager
def emulator_process(scenario: dict[str, Any], workdir: Path) -> Iterator[RemoteEmulator]:
    """Start ``breadasync emulator`` with a scenario (and this run's data profile, unless the
    scenario names one); stop it on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "scenario.json"
    path.write_text(json.dumps({"profile": PROFILE, **scenario}))
    proc = subprocess.Popen(
        [str(SCRIPT), "emulator", "--port", "0", "--json", "--scenario", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        yield RemoteEmulator(info["url"], info["api_key"], psutil.Process(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


def control(emu: RemoteEmulator, path: str, body: Any = None) -> Any:
    """Call the emulator's control API (``/_emulator/...``)."""
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if data is None else "POST"
    request = urllib.request.Request(emu.url + path, data=data, method=method)  # noqa: S310
    with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 (loopback http)
        return json.loads(resp.read())


def machine() -> str:
    """One line describing where the numbers came from."""
    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else (
            "# Benchmark results\n\nWritten by the scripts in this folder; each run replaces its "
            "own section. Ratios matter more than absolute numbers on these noisy machines.\n"
        )
    )
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else (text.rstrip() + "\n\n" + block + "\n")
    )
    RESULTS.write_text(text)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def per_page_ms(pages: list[bytes], work: Callable[[int, bytes], object], rounds: int) -> float:
    """CPU milliseconds of this process per page."""
    started = time.process_time()
    for _ in range(rounds):
        for i, body in enumerate(pages):
            work(i, body)
    return (time.process_time() - started) * 1000 / (len(pages) * rounds)
