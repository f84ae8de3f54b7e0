"""The hostile world: combined faults at scale, a dying service, awkward input, malicious
answers, and secrets, each bounded in time and checked against the emulator's own record."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from breadasync import (
    APIConnectionError,
    BreadClient,
    BreadError,
    InvalidArgumentError,
    NotFoundError,
    Outcome,
    PollPolicy,
    ProtocolError,
    RedirectError,
    RetryPolicy,
)
from breadasync.emulator import DEFAULT_MODEL, Emulator, Faults, RowShape, TargetPlan
from breadasync.emulator import trajectory_row as expected_row
from breadasync.export import batch_to_rows, hive_segment
from tests.conftest import quiet, record_figures, wait_until

SCRIPT = Path(sys.executable).with_name("breadasync")
COMBINED = Faults(
    errors={500: 0.04, 502: 0.04, 503: 0.02},  # 10% 5xx, the 502s with an HTML body
    drop=0.05,  # 5% of answers cut off mid-body
    rate_limit=300,  # requests/s: the client would send far more
    rate_burst=4,
    page_cap=250,  # a server-side cap below the 1000 rows asked
    latency=0.001,
    jitter=0.004,
    retry_after=0.01,
    retry_after_format="ms",
)
PATIENT = RetryPolicy(max_retries=12, initial_backoff=0.01, max_backoff=0.2)


def report(capsys: pytest.CaptureFixture[str], text: str, **figures: Any) -> None:
    """Figures for the test output (shown even when pytest captures), and for
    ``benchmarks/reliability.py``, which collects them into RELIABILITY.md."""
    with capsys.disabled():
        print(f"\n    [hostile] {text}")
    record_figures("scenarios", **figures)


def verify_parts(folder: Path, repo: str, target: str, shape: RowShape) -> int:
    """Row-by-row equality of an export with the emulator's data, part by part."""
    rows = 0
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part)
        offsets = table.column("row_offset").to_pylist()
        assert offsets == list(range(offsets[0], offsets[0] + table.num_rows))
        assert offsets[0] == rows
        assert batch_to_rows(table) == [expected_row(repo, target, i, shape) for i in offsets]
        rows += table.num_rows
    return rows


# --- scale under combined faults -------------------------------------------------------


@pytest.mark.soak
@pytest.mark.timeout(600)
@pytest.mark.bread_emulator(speed=0, seed=11)
async def test_soak_300k_rows_under_combined_faults(
    bread_emulator: Emulator,
    make_client: Callable[..., BreadClient],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bread_emulator.add_target("r", "soak", rows=300_000, rollout="complete")
    bread_emulator.set_faults(COMBINED, repo="r", target="soak")
    client = make_client(retry=PATIENT)
    started = time.monotonic()
    result = await client.export_rollout("soak", repo_name="r", dest=tmp_path, rows_per_part=50_000)
    elapsed = time.monotonic() - started
    assert result.rows == 300_000
    verified = await anyio.to_thread.run_sync(
        verify_parts, tmp_path, "r", "soak", RowShape(model=DEFAULT_MODEL)
    )
    assert verified == 300_000
    stats = bread_emulator.stats
    faults = {kind: stats.faults(kind) for kind in ("500", "502", "503", "429", "drop")}
    # The drawn faults (5xx, drops) are a fraction of at least 1,200 page requests, whatever
    # the machine's load; whether the rate limit answered 429 depends on how fast the export
    # ran, so it is reported, not asserted.
    drawn = {kind: n for kind, n in faults.items() if kind != "429"}
    assert all(drawn.values()), faults
    assert stats.faults() == sum(faults.values())  # no fault of a kind not switched on
    report(
        capsys,
        f"soak: {verified:,} rows verified in {elapsed:.1f} s; "
        f"{stats.faults():,} faults injected {faults}; {result.retries:,} retries; "
        f"{result.pages:,} page requests",
        scenario="export of 300,000 rows under combined faults (10% 5xx incl. HTML 502, "
        "5% drops mid-body, 429 rate limit of 300 req/s, page cap 250, 1-5 ms latency)",
        faults=stats.faults(),
        by_kind=faults,
        retries=result.retries,
        verified=f"{verified:,} rows, row by row",
        seconds=round(elapsed, 1),
    )


@pytest.mark.soak
@pytest.mark.timeout(600)
@pytest.mark.bread_emulator(speed=200, seed=5)
async def test_fanout_2000_targets_under_combined_faults(
    bread_emulator: Emulator,
    make_client: Callable[..., BreadClient],
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = [f"t{i:04d}" for i in range(2000)]
    for i, name in enumerate(names):
        bread_emulator.add_target(
            "r", name, plan=TargetPlan(stimuli=4, rollout_seconds=5 + i % 100)
        )
    faults = Faults(
        errors={500: 0.04, 502: 0.04, 503: 0.02},
        drop=0.05,
        rate_limit=2000,
        rate_burst=20,
        latency=0.001,
        jitter=0.004,
        retry_after=0.01,
        retry_after_format="ms",
    )
    bread_emulator.set_faults(faults)
    client = make_client(retry=PATIENT, poll=PollPolicy(initial=0.05, maximum=0.3, minimum=0.02))
    started = time.monotonic()
    results = await client.rollout_many(names, repo_name="r")
    elapsed = time.monotonic() - started
    assert [r.outcome for r in results] == [Outcome.COMPLETE] * 2000
    assert all(r.lines == 4 for r in results)
    assert bread_emulator.stats.jobs_started("rollout") == 2000
    per_target = Counter(
        r.target for r in bread_emulator.stats.records() if r.route == "run_rollout"
    )
    # A start answered but lost mid-body is asked again, harmlessly: the POST is idempotent.
    assert max(per_target.values()) <= 1 + PATIENT.max_retries
    report(
        capsys,
        f"fan-out: 2,000 targets complete in {elapsed:.1f} s; "
        f"{bread_emulator.stats.faults():,} faults injected; "
        f"{client.stats.retries:,} retries; {bread_emulator.stats.count():,} requests",
        scenario="rollout_many over 2,000 targets under combined faults (10% 5xx, 5% drops, "
        "429 rate limit)",
        faults=bread_emulator.stats.faults(),
        retries=client.stats.retries,
        verified="2,000 results complete with the right lines; 2,000 jobs started, none twice",
        seconds=round(elapsed, 1),
    )

    again = await client.rollout_many(names, repo_name="r")
    assert again.summary().complete == 2000
    assert bread_emulator.stats.jobs_started("rollout") == 2000  # nothing started twice


# --- the service dies and comes back ------------------------------------------------------


DOWNTIME = 1.0
"""Seconds the killed service stays down, at least."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def emulator_process(port: int, scenario: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [str(SCRIPT), "emulator", "--port", str(port), "--scenario", str(scenario), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())  # serving
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.soak
@pytest.mark.timeout(300)
async def test_the_service_killed_and_restarted_mid_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "emu-restart-test-key"
    scenario = tmp_path / "scenario.json"
    scenario.write_text(
        json.dumps(
            {
                "api_key": key,
                "speed": 0,
                "faults": {"latency": 0.1},
                "targets": [{"repo": "r", "target": "t", "rows": 120_000, "rollout": "complete"}],
            }
        )
    )
    port = free_port()
    dest = tmp_path / "out"
    journal = dest / "_journal.jsonl"
    outcome = "rode it out"
    started = time.monotonic()
    downtime = 0.0
    with contextlib.ExitStack() as processes:
        first = await anyio.to_thread.run_sync(
            processes.enter_context, emulator_process(port, scenario)
        )
        async with BreadClient(key, f"http://127.0.0.1:{port}", retry=PATIENT) as client:

            async def export() -> Any:
                return await client.export_rollout(
                    "t", repo_name="r", dest=dest, rows_per_part=10_000, concurrency=2
                )

            results: list[Any] = []

            async def run() -> None:
                try:
                    results.append(await export())
                except APIConnectionError as exc:
                    results.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await wait_until(
                    lambda: journal.exists() and len(journal.read_bytes().splitlines()) >= 3,
                    timeout=60,
                )
                errors_before = client.stats.connection_errors
                first.send_signal(signal.SIGKILL)
                await anyio.to_thread.run_sync(first.wait)
                killed_after = len(journal.read_bytes().splitlines()) - 1
                down = time.monotonic()
                # The service stays down until the export has run into it (however long a
                # busy machine takes to get there) and at least a second (the scenario, not
                # a synchronisation), then comes back on the same port.
                await wait_until(lambda: client.stats.connection_errors > errors_before)
                await anyio.sleep(max(0.0, DOWNTIME - (time.monotonic() - down)))
                downtime = time.monotonic() - down
                await anyio.to_thread.run_sync(
                    processes.enter_context, emulator_process(port, scenario)
                )
            if isinstance(results[0], BreadError):
                outcome = f"failed ({type(results[0]).__name__}), then resumed"
                results[0] = await export()
            result = results[0]
            errors = client.stats.connection_errors - errors_before
    assert result.rows == 120_000
    assert killed_after < 12  # the emulator died mid-export
    assert errors > 0
    verified = await anyio.to_thread.run_sync(
        verify_parts, dest, "r", "t", RowShape(model=DEFAULT_MODEL)
    )
    assert verified == 120_000
    report(
        capsys,
        f"restart: the emulator was killed after {killed_after} of 12 parts and down "
        f"{downtime:.1f} s; the export {outcome}; {verified:,} rows verified; {errors} "
        "connection errors met",
        scenario=f"emulator process SIGKILLed mid-export (after {killed_after} of 12 parts), "
        f"down {downtime:.1f} s (at least {DOWNTIME:.0f} s, and until the export met it), "
        f"restarted on the same port; the export {outcome}",
        faults=errors,
        retries=errors,
        verified=f"{verified:,} rows, row by row",
        seconds=round(time.monotonic() - started, 1),
    )


# --- awkward input, by property ---------------------------------------------------------------

NAMES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "/",
            "a/b",
            "../x",
            "%2F",
            "?",
            "#",
            "a?b#c",
            "%",
            "x" * 600,
            "é😀",
            " ",
            "\x00",
            "a\nb",
            "\u202e",
            "NUL\x7f",
        ]
    ),
    st.text(alphabet="/.?#%=& \\", max_size=12),
)


def last_record(emulator: Emulator, before: int) -> Any:
    """The emulator's record of the request just answered: it is written right after the
    answer leaves, in the emulator's thread, so wait (bounded) until it is there."""
    deadline = time.monotonic() + 60  # only stops a hang
    while emulator.stats.count() == before and time.monotonic() < deadline:
        time.sleep(0.001)
    return emulator.stats.records()[-1]


def name_is_valid(name: str) -> bool:
    if name in ("", ".", ".."):
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name)


def test_any_name_reaches_its_own_path_or_is_refused(bread_emulator: Emulator) -> None:
    with asyncio.Runner() as runner:
        client = BreadClient(
            bread_emulator.api_key, bread_emulator.url, retry=RetryPolicy(max_retries=0)
        )

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(repo=NAMES, target=NAMES)
        def check(repo: str, target: str) -> None:
            before = bread_emulator.stats.count()
            try:
                runner.run(client.targets.rollout.get(target, repo_name=repo))
            except InvalidArgumentError:
                valid = name_is_valid(repo) and name_is_valid(target)
                assert not valid
                assert bread_emulator.stats.count() == before  # nothing was sent
                return
            except NotFoundError:
                pass
            assert name_is_valid(repo)
            assert name_is_valid(target)
            record = last_record(bread_emulator, before)
            assert (record.repo, record.target, record.route) == (repo, target, "get_rollout")

        try:
            check()
        finally:
            runner.run(client.aclose())


def test_limits_and_offsets_are_checked_before_sending(bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=50, rollout="complete")
    with asyncio.Runner() as runner:
        client = BreadClient(bread_emulator.api_key, bread_emulator.url)

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(
            limit=st.one_of(
                st.integers(-5, 1005),
                st.integers(),
                st.floats(),
                st.booleans(),
                st.text(max_size=3),
            ),
            offset=st.one_of(st.integers(-5, 60), st.integers(), st.floats(), st.booleans()),
        )
        def check(limit: Any, offset: Any) -> None:
            valid = (
                type(limit) is int
                and 1 <= limit <= 1000
                and type(offset) is int
                and 0 <= offset < 2**63
            )
            before = bread_emulator.stats.count()
            try:
                page = runner.run(
                    client.targets.rollout.get_output(
                        "t", repo_name="r", limit=limit, offset=offset
                    )
                )
            except InvalidArgumentError:
                assert not valid
                assert bread_emulator.stats.count() == before
                return
            assert valid
            assert page.offset == offset
            assert len(page.output) == max(0, min(limit, 50 - offset))
            record = last_record(bread_emulator, before)
            assert (record.limit, record.offset) == (limit, offset)

        try:
            check()
        finally:
            runner.run(client.aclose())


@settings(max_examples=2000, deadline=None)
@given(
    repo=st.text(min_size=1, max_size=300),
    target=st.text(min_size=1, max_size=300),
    other=st.text(min_size=1, max_size=300),
)
def test_no_name_leaves_the_dataset_folder_or_collides(repo: str, target: str, other: str) -> None:
    root = Path("/dataset")
    folder = root / hive_segment("repo", repo) / hive_segment("target", target)
    assert folder.parent.parent == root
    assert os.path.normpath(folder) == str(folder)  # no '.', '..' or '//' to resolve
    for part in folder.relative_to(root).parts:
        assert "/" not in part
        assert len(part.encode()) <= 255
    if other != target:
        assert hive_segment("target", other) != hive_segment("target", target)


@pytest.mark.bread_emulator(speed=0)
async def test_awkward_names_export_inside_the_dataset(
    bread_emulator: Emulator, make_client: Callable[..., BreadClient], tmp_path: Path
) -> None:
    awkward = ["../../etc", "a/../../b", "%2e%2e", "?x=1#y", "repo=evil", "\\..\\", "😀" * 40]
    for name in awkward:
        bread_emulator.add_target("up/../..", name, rows=3, rollout="complete")
    dest = tmp_path / "dataset"
    results = await make_client().export_many(awkward, repo_name="up/../..", dest=dest)
    assert all(r.ok for r in results)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(dest.resolve()) for p in files)
    assert len({Path(r.dest) for r in results}) == len(awkward)


# --- malicious or broken answers -----------------------------------------------------------


@pytest.mark.bread_emulator(speed=0, huge_body_bytes=16 * 1024 * 1024)
async def test_broken_answers_leave_good_data_untouched(
    capsys: pytest.CaptureFixture[str],
    bread_emulator: Emulator,
    make_client: Callable[..., BreadClient],
    tmp_path: Path,
    bread_emulator_factory: Callable[..., Emulator],
) -> None:
    bread_emulator.add_target("r", "good", rows=2500, rollout="complete")
    bread_emulator.add_target("r", "bad", rows=2500, rollout="complete")
    client = make_client(max_body_bytes=4 * 1024 * 1024)
    first = await client.export_many(["good"], repo_name="r", dest=tmp_path)
    assert first[0].ok
    good = tmp_path / "repo=r" / "target=good"

    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in good.iterdir()}

    before = digests()
    elsewhere = bread_emulator_factory()  # the host a malicious redirect points to
    output_only = frozenset({"get_rollout_output"})
    cases: list[tuple[Faults, type[Exception], str]] = [
        (
            Faults(corrupt=1.0, corrupt_kind="huge", routes=output_only),
            ProtocolError,
            "over the limit",
        ),
        (
            Faults(corrupt=1.0, corrupt_kind="deep", routes=output_only),
            ProtocolError,
            "nested too deeply",
        ),
        (
            Faults(corrupt=1.0, corrupt_kind="wrong-types", routes=output_only),
            ProtocolError,
            "should be",
        ),
        (Faults(corrupt=1.0, corrupt_kind="html", routes=output_only), ProtocolError, "not JSON"),
        (Faults(redirect_to=elsewhere.url, routes=output_only), RedirectError, "redirected"),
    ]
    retries_before = client.stats.retries
    for faults, error, text in cases:
        bread_emulator.set_faults(faults, repo="r", target="bad")
        results = await client.export_many(
            ["good", "bad"], repo_name="r", dest=tmp_path, resume=True
        )
        assert results[0].ok
        assert results[0].pages == 0  # verified, not fetched again
        assert isinstance(results[1].error, error), results[1].error
        assert text in str(results[1].error)
        assert bread_emulator.api_key not in str(results[1].error)
        assert digests() == before
    assert elsewhere.stats.count() == 0  # the key never followed the redirect
    report(
        capsys,
        f"malicious answers: {len(cases)} kinds refused with clear errors; the good export "
        "is unchanged; the redirect target got no request",
        scenario="malicious answers to a second export beside a good one: a 16 MB body, "
        "100,000-deep JSON, wrong types, HTML, a redirect to another host",
        faults=len(cases),
        # The HTML page alone is retried (it is not JSON at all: another try may mend it).
        retries=client.stats.retries - retries_before,
        verified="the good export's files unchanged (SHA-256); 0 requests reached the other host",
        seconds=None,
    )


# --- resources and cancellation in a web backend ------------------------------------------------


@pytest.mark.bread_emulator(speed=0)
async def test_web_handlers_cancelled_mid_flight_leak_nothing(bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=10, rollout="complete")
    bread_emulator.set_faults(Faults(latency=30), repo="r", target="t")
    client_key = web.AppKey("bread", BreadClient)
    entered = 0

    async def lifespan(app: web.Application) -> Any:
        app[client_key] = BreadClient(bread_emulator.api_key, bread_emulator.url)
        yield
        await app[client_key].aclose()

    async def handler(request: web.Request) -> web.Response:
        nonlocal entered
        entered += 1
        job = await request.app[client_key].targets.rollout.get("t", repo_name="r")
        return web.json_response({"lines": job.lines})

    app = web.Application()
    app.cleanup_ctx.append(lifespan)
    app.router.add_get("/job", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(session.get, f"http://127.0.0.1:{port}/job")
            await wait_until(lambda: bread_emulator.stats.in_flight == 8)
            tg.cancel_scope.cancel()  # the browsers go away
        bread_client = app[client_key]
        await wait_until(lambda: bread_client.stats.in_flight == 0)
        assert entered == 8
        await quiet(bread_emulator)  # the backend's requests were cancelled in turn
        bread_emulator.set_faults(None, repo="r", target="t")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/job") as resp,
        ):
            assert await resp.json() == {"lines": 10}
    finally:
        await runner.cleanup()
    assert bread_client.closed
