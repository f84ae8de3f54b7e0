"""Shared test helpers: a thin raw-HTTP caller for emulator tests, client fixtures, the
key-leak and resource checks around every test, and the figure sink of RELIABILITY.md."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import orjson
import pytest

from breadasync import BreadClient, PollPolicy, RetryPolicy
from breadasync.emulator import Emulator


@dataclass
class Reply:
    """One raw HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class RawApi:
    """Speaks plain HTTP to an emulator, so emulator tests do not depend on our client."""

    def __init__(self, session: aiohttp.ClientSession, emulator: Emulator) -> None:
        self.session = session
        self.emulator = emulator

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        allow_redirects: bool = False,
    ) -> Reply:
        sent = {"Authorization": f"Bearer {self.emulator.api_key}"} if auth else {}
        sent.update(headers or {})
        if json is not None:
            data = orjson.dumps(json)
            sent["Content-Type"] = "application/json"
        assert self.emulator.url is not None
        async with self.session.request(
            method,
            self.emulator.url + path,
            data=data,
            params=params,
            headers=sent,
            allow_redirects=allow_redirects,
        ) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.read())

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.call("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Reply:
        return await self.call("POST", path, **kwargs)


async def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll a condition: the emulator runs in another thread, whose counters cannot wake an
    event of ours. ``timeout`` only stops a hang (a busy machine may take its time), well
    inside pytest-timeout's limit; it is no claim about speed."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def quiet(emulator: Emulator) -> int:
    """Wait until the emulator has no request in flight; the number it has answered."""
    await wait_until(lambda: emulator.stats.in_flight == 0)
    return emulator.stats.count()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(http: aiohttp.ClientSession, bread_emulator: Emulator) -> RawApi:
    return RawApi(http, bread_emulator)


# --- figures for RELIABILITY.md -------------------------------------------------------------

FIGURES_ENV = "BREADASYNC_RELIABILITY_FIGURES"
"""A file that ``benchmarks/reliability.py`` names: tests append their figures (JSON lines)
and every test's outcome to it; unset, nothing is written."""


def record_figures(table: str, **figures: Any) -> None:
    """Append one row of ``table`` to the figure sink, if ``benchmarks/reliability.py`` set
    one (it renders RELIABILITY.md from them)."""
    sink = os.environ.get(FIGURES_ENV)
    if sink:
        with open(sink, "a", encoding="utf-8") as file:
            file.write(json.dumps({"table": table, **figures}) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With a figure sink, the outcome of every test (so the report lists what ran and how
    it ended, not only what tests chose to say)."""
    if report.when == "call" or (report.when == "setup" and not report.passed):
        record_figures(
            "outcomes",
            test=report.nodeid,
            outcome=report.outcome,
            seconds=round(report.duration, 2),
        )


def pytest_configure(config: pytest.Config) -> None:
    """A failing test reports what failed, not the DEBUG records the key-leak check below
    collects (aiohttp and breadasync run at DEBUG for it): pytest's own log capture shows
    warnings and errors only, unless ``--log-level`` or ``log_level`` asks for more."""
    if config.getoption("log_level", None) is None and not config.getini("log_level"):
        config.option.log_level = "WARNING"


# --- client fixtures -----------------------------------------------------------------------

FAST_RETRY = RetryPolicy(max_retries=3, initial_backoff=0.001, max_backoff=0.005)
"""Retries that take milliseconds, so retry tests do too."""
FAST_POLL = PollPolicy(initial=0.01, maximum=0.05, minimum=0.005)

ISSUED_KEYS: set[str] = set()
"""Every API key an emulator of this test run accepted: none may appear in a log record."""


@pytest.fixture
def bread_emulator_factory(
    bread_emulator_factory: Callable[..., Emulator],
) -> Callable[..., Emulator]:
    """The plugin's factory (and so its ``bread_emulator``, which uses this one), noting
    every key it issues for the leak check."""

    def start(**kwargs: Any) -> Emulator:
        emulator = bread_emulator_factory(**kwargs)
        ISSUED_KEYS.add(emulator.api_key)
        return emulator

    return start


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def _no_api_key_in_any_log_record() -> Iterator[None]:
    """Capture every log record of the run (breadasync and aiohttp at DEBUG); at the end,
    none may contain an API key."""
    capture = _Capture()
    capture.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("breadasync", "aiohttp")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(capture)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(capture)
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)
    leaked = [t for t in capture.texts for key in ISSUED_KEYS if key in t]
    assert not leaked, f"an API key appeared in {len(leaked)} log record(s): {leaked[0][:200]}"


@pytest.fixture
async def make_client(bread_emulator: Emulator) -> AsyncIterator[Callable[..., BreadClient]]:
    """``make_client(**kwargs)``: a client of the emulator, fast retries and polls by
    default; every one is closed after the test."""
    made: list[BreadClient] = []

    def make(**kwargs: Any) -> BreadClient:
        kwargs.setdefault("api_key", bread_emulator.api_key)
        kwargs.setdefault("base_url", bread_emulator.url)
        kwargs.setdefault("retry", FAST_RETRY)
        kwargs.setdefault("poll", FAST_POLL)
        client = BreadClient(**kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def client(make_client: Callable[..., BreadClient]) -> BreadClient:
    """A client of ``bread_emulator`` with fast retries and polls."""
    return make_client()


# --- resource hygiene, checked around every test -----------------------------------------------


def _open_files() -> set[str]:
    """What this process has open, by target (sockets, pipes and files); Linux only."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue  # closed while listing (e.g. the listing's own descriptor)
    return found


@pytest.fixture(autouse=True)
def _no_leaked_files(request: pytest.FixtureRequest) -> Iterator[None]:
    """No test may leave a file, socket or pipe open behind it.

    A test module may name what a library keeps open process-wide (not a leak): handles
    whose target contains one of its ``SHARED_HANDLES``, or for which its
    ``shared_handle(handle, request)`` is true.
    """
    if not os.path.isdir("/proc/self/fd"):
        yield
        return
    shared: tuple[str, ...] = getattr(request.module, "SHARED_HANDLES", ())
    also = getattr(request.module, "shared_handle", None)
    before = _open_files()
    yield
    gc.collect()
    leaked = sorted(
        handle
        for handle in _open_files() - before
        if not any(part in handle for part in shared)
        and not (also is not None and also(handle, request))
    )
    assert not leaked, f"left open: {leaked}"


@pytest.fixture(autouse=True)
async def _no_orphan_tasks() -> AsyncIterator[None]:
    """No test may leave a task running on its event loop."""
    yield
    current = asyncio.current_task()
    orphans = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not orphans, f"tasks left running: {orphans}"
