"""The example web backends (``examples/``), each under its real server on 127.0.0.1 against
the emulator: job status, rollout start, whole streams, refusals before any byte, and a
client that disconnects mid-stream stopping the page fetches."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import aiohttp
import anyio
import pyarrow as pa
import pytest
import uvicorn
from aiohttp import web
from examples import aiohttp_app, fastapi_app
from examples.encoding import PAGE_SIZE, WINDOW

from breadasync.emulator import Emulator
from breadasync.export import batch_to_rows

REPO = "my_repo"
BIG = 30_000
"""Rows of the target a client leaves mid-stream: about 30 MB of NDJSON, far more than the
socket buffers between server and client hold, so the server is still streaming whenever
the client goes (it cannot run ahead of a client that stopped reading)."""
SMALL = 2_500
CHECKS = 3_000
"""How many times a condition of another thread or task is checked, 10 ms apart, at most."""


async def until(condition: Callable[[], bool], what: str) -> None:
    """Check ``condition`` until it holds, a bounded number of times (the server and the
    emulator run in other threads or tasks, whose counters cannot wake us)."""
    for _ in range(CHECKS):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what}: still not so after {CHECKS} checks")


class Records(logging.Handler):
    """Every log record of the test, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.guard:
            self.records.append(record)

    def problems(self) -> list[str]:
        with self.guard:
            return [
                f"{r.name} {r.levelname} {r.getMessage()} {r.exc_info[1] if r.exc_info else ''}"
                for r in self.records
                if r.levelno >= logging.WARNING
            ]

    def stopped(self, target: str) -> list[logging.LogRecord]:
        with self.guard:
            return [
                r
                for r in self.records
                if r.name.startswith("examples") and f"{REPO}/{target} stopped" in r.getMessage()
            ]


@pytest.fixture
def logs() -> Iterator[Records]:
    """The test's log records; the examples' INFO records included."""
    handler = Records()
    examples = logging.getLogger("examples")
    saved = examples.level
    examples.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)
        examples.setLevel(saved)


@pytest.fixture
def service(bread_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """The emulator, with the targets the tests use, and the apps' environment."""
    bread_emulator.add_target(REPO, "small", rows=SMALL, rollout="complete")
    bread_emulator.add_target(REPO, "big", rows=BIG, rollout="complete")
    bread_emulator.add_target(REPO, "fresh")  # stim complete, rollout not started
    bread_emulator.add_target(REPO, "no_stim", stim="not_started")
    bread_emulator.add_target(REPO, "running", rollout="running")
    monkeypatch.setenv("BREAD_API_KEY", bread_emulator.api_key)
    monkeypatch.setenv("BREAD_BASE_URL", bread_emulator.url or "")
    return bread_emulator


@asynccontextmanager
async def aiohttp_server() -> AsyncIterator[str]:
    """The aiohttp example under aiohttp's runner, configured as its ``__main__`` is."""
    runner = web.AppRunner(aiohttp_app.make_app(), handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def uvicorn_server() -> AsyncIterator[str]:
    """The FastAPI example under uvicorn, in a thread with its own event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # log_config=None: uvicorn's records reach the root logger, where the test reads them.
    server = uvicorn.Server(uvicorn.Config(fastapi_app.app, log_config=None, ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        await until(lambda: server.started or not thread.is_alive(), "uvicorn started")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join)
        sock.close()


SERVERS = {"aiohttp": aiohttp_server, "fastapi": uvicorn_server}


@pytest.fixture(params=sorted(SERVERS))
async def url(
    request: pytest.FixtureRequest, service: Emulator, logs: Records
) -> AsyncIterator[str]:
    """The base URL of one example app, served for the test; no record of it, its server
    or breadasync may be a warning or an error."""
    async with SERVERS[request.param]() as base:
        yield base
    assert logs.problems() == []


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def rows_path(url: str, target: str, fmt: str) -> str:
    return f"{url}/repos/{REPO}/targets/{target}/rows.{fmt}"


@pytest.mark.bread_emulator(speed=0)
async def test_rollout_start_and_status(
    url: str, service: Emulator, http: aiohttp.ClientSession
) -> None:
    job = f"{url}/repos/{REPO}/targets/fresh/rollout"
    async with http.get(job) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "not_started"
    async with http.post(job) as resp:
        assert resp.status == 202
        started = await resp.json()
    assert started["status"] in ("pending", "running")
    async with http.post(job) as resp:  # idempotent: the same job
        assert (await resp.json())["job_id"] == started["job_id"]
    assert service.stats.jobs_started("rollout", target="fresh") == 1
    async with http.get(job) as resp:
        assert (await resp.json())["job_id"] == started["job_id"]

    async with http.post(f"{url}/repos/{REPO}/targets/no_stim/rollout") as resp:
        assert resp.status == 400
        assert "Stim job must complete" in (await resp.json())["error"]
    async with http.get(f"{url}/repos/{REPO}/targets/missing/rollout") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "Target not found"


@pytest.mark.bread_emulator(speed=0)
async def test_whole_streams_hold_every_row_exactly(
    url: str, service: Emulator, http: aiohttp.ClientSession
) -> None:
    expected = service.trajectories(REPO, "small")
    async with http.get(rows_path(url, "small", "ndjson")) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/x-ndjson"
        lines = (await resp.read()).splitlines()
    assert [json.loads(line) for line in lines] == expected

    async with http.get(rows_path(url, "small", "arrow")) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/vnd.apache.arrow.stream"
        table = pa.ipc.open_stream(await resp.read()).read_all()
    assert table.column("row_offset").to_pylist() == list(range(SMALL))
    assert batch_to_rows(table) == expected


@pytest.mark.bread_emulator(speed=0)
@pytest.mark.parametrize("fmt", ["ndjson", "arrow"])
async def test_a_refused_stream_is_an_error_before_any_byte(
    url: str, service: Emulator, http: aiohttp.ClientSession, fmt: str
) -> None:
    async with http.get(rows_path(url, "missing", fmt)) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert await resp.json() == {"error": "Target not found"}
    async with http.get(rows_path(url, "running", fmt)) as resp:
        assert resp.status == 409
        assert "not complete" in (await resp.json())["error"]
    assert service.stats.count("get_rollout_output") == 0


@pytest.mark.bread_emulator(speed=0)
@pytest.mark.parametrize("fmt", ["ndjson", "arrow"])
async def test_a_client_that_disconnects_stops_the_fetches(
    url: str, service: Emulator, http: aiohttp.ClientSession, logs: Records, fmt: str
) -> None:
    resp = await http.get(rows_path(url, "big", fmt))
    assert resp.status == 200
    if fmt == "ndjson":
        assert "stimulus" in json.loads(await resp.content.readline())
    else:
        assert await resp.content.readexactly(4) == b"\xff\xff\xff\xff"  # an IPC message
    resp.close()  # the connection with it: the client is gone, mid-stream

    await until(lambda: len(logs.stopped("big")) == 1, "the handler saw the disconnect")
    taken = logs.stopped("big")[0].args[2]  # type: ignore[index]
    await until(lambda: service.stats.in_flight == 0, "the emulator is quiet")
    fetched = sum(
        record.rows or 0
        for record in service.stats.records()
        if record.route == "get_rollout_output" and record.target == "big"
    )
    assert isinstance(taken, int)
    assert 0 < taken < BIG  # it stopped mid-stream...
    # ...having fetched no more than the window of pages it may hold ahead of the client
    assert taken <= fetched <= taken + WINDOW * PAGE_SIZE
