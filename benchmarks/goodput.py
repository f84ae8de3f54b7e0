"""Goodput under faults and rate limits (issue 12): what flaky answers, a rate limit and an
overload cost the client, from the emulator's own request log.

Each scenario runs against a fresh emulator in its own process (realistic profile, real
clock), the client in this one:

- **no faults** and **flaky**: a ``--rows`` export (default 300,000) with a page cap of 250
  and 2-10 ms of latency; flaky adds 10% 5xx (500, 502 and 503 in thirds, the 503s with
  ``Retry-After: 1``) and 5% bodies dropped halfway. Both exports must hold the same rows
  (compared table to table), and flaky must run at >= 0.7x the throughput of no faults;
- **rate limited**: 64 callers read a job's status for ``--seconds`` (default 12) against a
  per-key limit of R = 50, 300 and 1000 requests/s answered with 429 and whole-second
  ``Retry-After`` (seconds or HTTP date); the client does not know R. Reported from 5 s
  until the callers stop: accepted requests/s against R (target >= 0.8 R) and the share
  throttled (< 5%). The bucket holds one token (no burst at all: a request 0.1 ms early is
  refused), three, or R (a second's worth). Beside the small buckets at R = 300 and 1000, a
  reference pacer (``_pacer``: one thread, raw sockets, a busy-wait clock, no retries) sends
  at exactly 0.85 R: the 429s it gets are what the machine's timing alone costs an evenly
  paced client, and a row that it misses too is out of even pacing's reach here;
- **overload**: the same export while every request is 503 for the first 10 s; reported:
  the requests the client sent during those 10 s, and when it was done;
- **fan-out**: ``rollout_many`` over 300 targets whose jobs take 1-6 s, under 5% 5xx (a
  third 503 with ``Retry-After``) and a 400 requests/s limit: it must end within the slowest
  job + 2 s with a median of at most 20 polls per target, every job complete and started
  once.

For each: throughput, requests/s, the share of requests throttled (429 and 503) and the
longest silence (the longest gap between two requests reaching the emulator). The figures
go to RESULTS.md (section ``goodput``) and a PNG of requests over time per scenario
(``benchmarks/goodput.png``, for the README).

    python -m benchmarks.goodput                       # all of it
    python -m benchmarks.goodput --only flaky          # one scenario (and no faults)
    python -m benchmarks.goodput --only rate --burst 1 --no-reference --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from benchmarks._common import (
    HERE,
    RemoteEmulator,
    control,
    emulator_process,
    machine,
    profile_label,
    section,
    table,
    write_section,
)

WORK = Path(".bench-work") / "goodput"
PNG = HERE / "goodput.png"
PAGE_CAP = 250
LATENCY, JITTER = 0.002, 0.008
FLAKY: dict[str, Any] = {
    "errors": {"500": 0.0334, "502": 0.0333, "503": 0.0333},
    "retry_after": 1.0,
    "retry_after_format": "seconds",
    "drop": 0.05,
}
RATES = (50, 300, 1000)
BURSTS = ("1", "3", "R")
"""The rate limit's bucket sizes measured: one token (zero burst tolerance), three, and a
second's worth."""
CALLERS = 64
OVERLOAD_SECONDS = 10.0
FANOUT_TARGETS = 300
FANOUT_SECONDS = (1.0, 6.0)
FANOUT_RATE = 400.0
THROTTLED = {429, 503}
REFERENCE_PACE = 0.85
"""The reference pacer's pace, as a share of R: a little above the target's 0.8 R, so that it
can meet the target where the machine allows it."""
REFERENCE_RATES = (300, 1000)


@dataclass
class Outcome:
    """One scenario's figures."""

    name: str
    seconds: float
    requests: int
    throttled: int
    silence: float
    throughput: str
    verdict: str
    times: list[float] = field(default_factory=list)
    bad: list[bool] = field(default_factory=list)


def log_figures(log: list[dict[str, Any]]) -> tuple[list[float], list[bool], float]:
    """Request arrival times (from the first), whether each was throttled or failed, and
    the longest gap between two arrivals."""
    starts = sorted((r["started"], r["status"]) for r in log)
    if not starts:
        return [], [], 0.0
    first = starts[0][0]
    times = [s - first for s, _ in starts]
    bad = [status >= 429 for _, status in starts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return times, bad, max(gaps, default=0.0)


def set_faults(emu: RemoteEmulator, body: dict[str, Any]) -> None:
    """Replace the emulator's server-wide faults (``PUT /_emulator/faults``)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 (loopback http)
        emu.url + "/_emulator/faults", data=data, method="PUT"
    )
    with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310
        resp.read()


def export_scenario(rows: int, faults: dict[str, Any], speed: float = 1) -> dict[str, Any]:
    return {
        "speed": speed,
        "faults": {"latency": LATENCY, "jitter": JITTER, "page_cap": PAGE_CAP, **faults},
        "targets": [{"repo": "bench", "target": "g", "rows": rows, "rollout": "complete"}],
    }


async def _export(emu: RemoteEmulator, dest: Path) -> int:
    from breadasync import BreadClient

    async with BreadClient(emu.api_key, emu.url) as client:
        result = await client.export_rollout("g", repo_name="bench", dest=dest)
    return result.rows


def run_export(name: str, rows: int, faults: dict[str, Any]) -> tuple[Outcome, Path]:
    """Export under ``faults``; the folder is kept for the comparison."""
    dest = WORK / name.replace(" ", "-")
    shutil.rmtree(dest, ignore_errors=True)
    with emulator_process(export_scenario(rows, faults), WORK / f"emu-{name}") as emu:
        # The emulator's realistic rows are built once, by a fault-free warm-up outside the
        # timed run, so each scenario measures the client and not the data generator.
        set_faults(emu, {"faults": {"latency": 0}})
        asyncio.run(_warm(emu, rows))
        set_faults(emu, {"faults": export_scenario(rows, faults)["faults"]})
        control(emu, "/_emulator/stats/reset", {})
        started = time.monotonic()
        got = asyncio.run(_export(emu, dest))
        seconds = time.monotonic() - started
        log = control(emu, "/_emulator/requests")
    assert got == rows, (name, got, rows)
    times, bad, silence = log_figures(log)
    outcome = Outcome(
        name,
        seconds,
        len(log),
        sum(r["status"] in THROTTLED for r in log),
        silence,
        f"{rows / seconds:,.0f} rows/s",
        "",
        times,
        bad,
    )
    return outcome, dest


async def _warm(emu: RemoteEmulator, rows: int) -> None:
    import aiohttp

    headers = {"Authorization": f"Bearer {emu.api_key}"}
    path = f"{emu.url}/v1/repo/bench/targets/g/rollout/output"
    semaphore = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(offset: int) -> None:
            async with (
                semaphore,
                session.get(path, params={"limit": PAGE_CAP, "offset": offset}) as resp,
            ):
                await resp.read()

        await asyncio.gather(*(one(o) for o in range(0, rows, PAGE_CAP)))


def same_rows(a: Path, b: Path) -> bool:
    """Whether two export folders hold equal tables (every row, every column)."""
    first = ds.dataset(a, format="parquet").to_table().sort_by("row_offset")
    second = ds.dataset(b, format="parquet").to_table().sort_by("row_offset")
    return bool(first.equals(second))


def rate_scenario(rate: float, burst: str) -> dict[str, Any]:
    """A per-key bucket of ``rate``/s holding ``burst`` tokens (a number, or ``R``: a
    second's worth), 429 with whole-second ``Retry-After``."""
    return {
        "speed": 1,
        "faults": {
            "latency": LATENCY,
            "jitter": JITTER,
            "key_rate_limit": rate,
            "key_rate_burst": round(rate) if burst == "R" else int(burst),
            "key_rate_no_header": 0.0,
        },
        "targets": [{"repo": "bench", "target": "g", "rows": 10, "rollout": "complete"}],
    }


def rate_name(rate: float, burst: str) -> str:
    return f"R = {rate:.0f}/s" + ("" if burst == "1" else f", burst {burst}")


def run_rate_limited(rate: float, seconds: float, burst: str = "1") -> Outcome:
    """64 callers of the client against :func:`rate_scenario`."""
    with emulator_process(rate_scenario(rate, burst), WORK / f"emu-rate-{rate:.0f}") as emu:
        from breadasync import BreadClient

        async def callers() -> None:
            deadline = time.monotonic() + seconds
            async with BreadClient(emu.api_key, emu.url, max_concurrency=CALLERS) as client:

                async def one() -> None:
                    while time.monotonic() < deadline:
                        await client.targets.rollout.get("g", repo_name="bench")

                async with asyncio.TaskGroup() as tg:
                    for _ in range(CALLERS):
                        tg.create_task(one())

        asyncio.run(callers())
        log = control(emu, "/_emulator/requests")
    return rate_outcome(f"rate limited, {rate_name(rate, burst)}", log, rate, seconds)


def run_reference_pacer(rate: float, seconds: float, burst: str = "1") -> Outcome:
    """The reference pacer of ``_pacer`` at :data:`REFERENCE_PACE` R against the same bucket:
    the 429s that the machine's timing alone costs an evenly paced client."""
    from benchmarks._pacer import pace

    with emulator_process(rate_scenario(rate, burst), WORK / f"emu-pacer-{rate:.0f}") as emu:
        skipped = pace(
            emu.url,
            emu.api_key,
            "/v1/repo/bench/targets/g/rollout",
            REFERENCE_PACE * rate,
            seconds,
        )
        log = control(emu, "/_emulator/requests")
    outcome = rate_outcome(
        f"reference pacer at {REFERENCE_PACE} R, {rate_name(rate, burst)}", log, rate, seconds
    )
    if skipped:
        # Its pace is then below the one it names: the row says so.
        outcome.verdict += f"; {skipped} sends skipped (every connection busy)"
    return outcome


def rate_outcome(name: str, log: list[dict[str, Any]], rate: float, seconds: float) -> Outcome:
    """The rate-limit figures of a request log, judged from 5 s until the callers stop:
    >= 0.8 R accepted and < 5% throttled."""
    times, bad, silence = log_figures(log)
    statuses = [r["status"] for r in sorted(log, key=lambda r: r["started"])]
    # From 5 s until the callers stop asking: after that only the retries of requests
    # throttled before the end trickle in (a second or two at Retry-After: 1), which says
    # nothing about riding the limit.
    after = [s for t, s in zip(times, statuses, strict=True) if 5.0 <= t < seconds]
    span = max(seconds - 5.0, 1e-9)
    accepted = sum(s == 200 for s in after) / span
    share = sum(s in THROTTLED for s in after) / max(len(after), 1)
    return Outcome(
        name,
        times[-1] if times else 0.0,
        len(log),
        sum(s in THROTTLED for s in statuses),
        silence,
        f"{accepted:,.0f} accepted/s from 5 to {seconds:.0f} s ({accepted / rate:.2f} R), "
        f"{share:.1%} throttled then",
        "ok" if accepted >= 0.8 * rate and share < 0.05 else "MISSED (>= 0.8 R, < 5% throttled)",
        times,
        bad,
    )


def run_overload(rows: int) -> Outcome:
    faults = {"overload_seconds": OVERLOAD_SECONDS}
    dest = WORK / "overload"
    shutil.rmtree(dest, ignore_errors=True)
    with emulator_process(export_scenario(rows, {}), WORK / "emu-overload") as emu:
        asyncio.run(_warm(emu, rows))
        control(emu, "/_emulator/stats/reset", {})
        set_faults(emu, {"faults": export_scenario(rows, faults)["faults"]})
        started = time.monotonic()
        got = asyncio.run(_export(emu, dest))
        seconds = time.monotonic() - started
        log = control(emu, "/_emulator/requests")
    shutil.rmtree(dest, ignore_errors=True)
    assert got == rows
    times, bad, silence = log_figures(log)
    during = sum(r["fault"] == "overload" for r in log)
    return Outcome(
        f"overload ({OVERLOAD_SECONDS:.0f} s of 503)",
        seconds,
        len(log),
        sum(r["status"] in THROTTLED for r in log),
        silence,
        f"{rows / seconds:,.0f} rows/s overall; {during} requests during the overload",
        "ok" if during <= 250 else "MISSED (<= 250 requests during the overload)",
        times,
        bad,
    )


def run_fanout() -> Outcome:
    rng = random.Random(12)
    durations = {f"f{i:03d}": rng.uniform(*FANOUT_SECONDS) for i in range(FANOUT_TARGETS)}
    scenario = {
        "speed": 1,
        "faults": {
            "latency": LATENCY,
            "jitter": JITTER,
            "errors": {"500": 0.0167, "502": 0.0167, "503": 0.0166},
            "retry_after": 1.0,
            "key_rate_limit": FANOUT_RATE,
        },
        "targets": [
            {"repo": "bench", "target": name, "plan": {"rollout_seconds": s, "stimuli": 20}}
            for name, s in durations.items()
        ],
    }
    with emulator_process(scenario, WORK / "emu-fanout") as emu:
        from breadasync import BreadClient

        async def fan() -> Any:
            async with BreadClient(emu.api_key, emu.url) as client:
                return await client.rollout_many(list(durations), repo_name="bench")

        started = time.monotonic()
        results = asyncio.run(fan())
        seconds = time.monotonic() - started
        log = control(emu, "/_emulator/requests")
        stats = control(emu, "/_emulator/stats")
    complete = sum(r.outcome == "complete" for r in results)
    polls = statistics.median(r.polls for r in results)
    posts = {r["target"]: r for r in log if r["route"] == "run_rollout" and r["status"] == 200}
    first = min(r["started"] for r in log)
    slowest = max(posts[name]["started"] + s for name, s in durations.items()) - first
    times, bad, silence = log_figures(log)
    ok = (
        complete == FANOUT_TARGETS
        and stats["jobs_started"] == FANOUT_TARGETS
        and seconds <= slowest + 2.0
        and polls <= 20
    )
    return Outcome(
        f"fan-out, {FANOUT_TARGETS} targets",
        seconds,
        len(log),
        sum(r["status"] in THROTTLED for r in log),
        silence,
        f"done {seconds - slowest:+.1f} s after the slowest job; median {polls:.0f} polls; "
        f"{complete} complete, {stats['jobs_started']} started",
        "ok" if ok else "MISSED (slowest + 2 s, median <= 20 polls, all complete once)",
        times,
        bad,
    )


def draw(outcomes: list[Outcome]) -> None:
    """Requests per 100 ms over time, one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(outcomes), 1, figsize=(7, 1.3 * len(outcomes) + 0.6))
    for ax, o in zip(axes if len(outcomes) > 1 else [axes], outcomes, strict=True):
        end = max(o.times, default=0.0) + 0.1
        bins = [i * 0.1 for i in range(int(end / 0.1) + 2)]
        good = [t for t, b in zip(o.times, o.bad, strict=True) if not b]
        worse = [t for t, b in zip(o.times, o.bad, strict=True) if b]
        ax.hist([good, worse], bins=bins, stacked=True, color=["#4477aa", "#ee6677"])
        ax.set_title(o.name, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes_list = axes if len(outcomes) > 1 else [axes]
    axes_list[-1].set_xlabel("seconds (blue: answered, red: 429 / 5xx), per 100 ms", fontsize=8)
    fig.tight_layout()
    fig.savefig(PNG, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--only", choices=("flaky", "rate", "overload", "fanout"), action="append")
    parser.add_argument(
        "--burst",
        action="append",
        help="tokens of the rate limit's bucket: a number or R (a second's worth); repeat for "
        f"more rows (default {' '.join(BURSTS)})",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the reference pacer's rows (beside the small buckets at R = 300 and 1000)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the table; leave RESULTS.md and the PNG"
    )
    args = parser.parse_args()
    bursts = args.burst or list(BURSTS)
    only = set(args.only or ("flaky", "rate", "overload", "fanout"))
    outcomes: list[Outcome] = []
    clean, clean_dest = run_export("no faults", args.rows, {})
    outcomes.append(clean)
    if "flaky" in only:
        flaky, flaky_dest = run_export("flaky", args.rows, FLAKY)
        ratio = clean.seconds / flaky.seconds
        exact = same_rows(clean_dest, flaky_dest)
        flaky.verdict = f"{ratio:.2f}x no faults; rows {'equal' if exact else 'DIFFER'}" + (
            "" if ratio >= 0.7 and exact else " (MISSED: >= 0.7x, equal rows)"
        )
        outcomes.append(flaky)
        shutil.rmtree(flaky_dest, ignore_errors=True)
    clean.verdict = "the reference"
    shutil.rmtree(clean_dest, ignore_errors=True)
    if "rate" in only:
        for burst in bursts:
            for rate in RATES:
                client = run_rate_limited(rate, args.seconds, burst)
                outcomes.append(client)
                if burst != "R" and rate in REFERENCE_RATES and not args.no_reference:
                    reference = run_reference_pacer(rate, args.seconds, burst)
                    outcomes.append(reference)
                    if client.verdict != "ok" and reference.verdict.startswith("MISSED"):
                        client.verdict += "; so does even pacing (next row)"
    if "overload" in only:
        outcomes.append(run_overload(args.rows))
    if "fanout" in only:
        outcomes.append(run_fanout())
    rows = [
        [
            o.name,
            f"{o.seconds:.1f} s",
            o.throughput,
            f"{o.requests / max(o.seconds, 1e-9):,.0f}",
            f"{o.throttled / max(o.requests, 1):.1%}",
            f"{o.silence:.2f} s",
            o.verdict,
        ]
        for o in outcomes
    ]
    if not args.no_write:
        draw(outcomes)
    body = (
        "## Goodput under faults and rate limits (issue 12)\n\n"
        f"Exports of {args.rows:,} rows of {profile_label()}, page cap {PAGE_CAP}, "
        f"{LATENCY * 1000:.0f}-{(LATENCY + JITTER) * 1000:.0f} ms latency; flaky: 10% 5xx "
        "(a third 503 with `Retry-After: 1`) and 5% dropped bodies; rate limited: "
        f"{CALLERS} callers reading a job's status for {args.seconds:.0f} s against a per-key "
        "limit (429, whole-second `Retry-After`) whose bucket holds one token (no burst: a "
        "request that meets it less than 1/R after the one before is refused), three, or R; "
        f"the reference pacer sends at exactly {REFERENCE_PACE} R from one thread on raw "
        "sockets with a busy-wait clock and no retries (what even pacing gets from the "
        "machine's timing alone); overload: every request 503 for "
        f"{OVERLOAD_SECONDS:.0f} s; fan-out: {FANOUT_TARGETS} targets of "
        f"{FANOUT_SECONDS[0]:.0f}-{FANOUT_SECONDS[1]:.0f} s jobs, 5% 5xx, "
        f"{FANOUT_RATE:.0f} requests/s limit. Emulator in its own process; {machine()}. "
        "Requests, throttled share (429 and 503) and the longest silence (the longest gap "
        "between two requests) come from the emulator's request log.\n\n"
        + table(
            [
                "scenario",
                "time",
                "throughput",
                "requests/s",
                "throttled",
                "longest silence",
                "verdict",
            ],
            rows,
        )
        + f"\n\n![requests over time per scenario]({PNG.name})"
    )
    if not args.no_write:
        write_section(section("goodput"), body)
    print(body)


if __name__ == "__main__":
    main()
