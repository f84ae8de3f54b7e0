"""Retries end to end, against the emulator over loopback and raw servers: what the server
sees matches what the client counts. The retry and pacing logic itself is tested on virtual
time in test_transport_mock.py and test_transport_governor.py."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import pytest
import trustme

from breadasync import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BreadClient,
    CertificateError,
    RetryPolicy,
    Timeouts,
)
from breadasync.emulator import Emulator, Faults

from .conftest import FAST_RETRY

ROLLOUT = frozenset({"get_rollout"})


@pytest.fixture
def target(bread_emulator: Emulator) -> Emulator:
    bread_emulator.add_target("r", "t", rows=2500, rollout="complete")
    return bread_emulator


@pytest.mark.parametrize("status", [500, 503])
async def test_transient_statuses_are_retried_until_the_budget_runs_out(
    client: BreadClient, target: Emulator, status: int
) -> None:
    target.set_faults(Faults(errors={status: 1.0}, retry_after=0.001, retry_after_format="ms"))
    with pytest.raises(APIStatusError) as caught:
        await client.targets.rollout.get("t", repo_name="r")
    assert caught.value.status == status
    assert target.stats.count("get_rollout") == 4  # 1 + max_retries (3)
    assert client.stats.retries == 3


async def test_a_transient_fault_is_ridden_out(client: BreadClient, target: Emulator) -> None:
    target.set_faults(
        Faults(errors={503: 1.0}, retry_after=0.001, retry_after_format="ms", max_faults=2)
    )
    status = await client.targets.rollout.get("t", repo_name="r")
    assert status.is_complete
    assert target.stats.count("get_rollout") == 3
    assert client.stats.retries == 2
    assert client.stats.responses[503] == 2


@pytest.mark.parametrize(("fmt", "floor"), [("ms", 0.3), ("http-date", 0.45)])
async def test_retry_after_is_a_floor_for_the_wait(
    client: BreadClient, target: Emulator, fmt: str, floor: float
) -> None:
    # An HTTP date has whole seconds: 1.5 s ahead, truncated, is still >= 0.5 s ahead.
    wait = 1.5 if fmt == "http-date" else 0.3
    target.set_faults(
        Faults(errors={503: 1.0}, retry_after=wait, retry_after_format=fmt, max_faults=1)
    )  # type: ignore[arg-type]
    started = time.monotonic()
    await client.targets.rollout.get("t", repo_name="r")
    assert time.monotonic() - started >= floor
    gap = [r.started for r in target.stats.records()]
    assert gap[1] - gap[0] >= floor


async def test_one_idempotency_key_per_post_across_its_retries(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=10)
    bread_emulator.set_faults(
        Faults(
            errors={503: 1.0},
            retry_after=0.001,
            retry_after_format="ms",
            max_faults=2,
            routes=frozenset({"run_rollout"}),
        )
    )
    await client.targets.rollout.run("t", repo_name="r", poll=False)
    posts = [r for r in bread_emulator.stats.records() if r.route == "run_rollout"]
    assert [r.status for r in posts] == [503, 503, 200]
    assert len({r.idempotency_key for r in posts}) == 1
    assert posts[0].idempotency_key
    await client.targets.rollout.run("t", repo_name="r", poll=False)
    keys = {r.idempotency_key for r in bread_emulator.stats.records() if r.route == "run_rollout"}
    assert len(keys) == 2  # a new call, a new key
    assert bread_emulator.stats.jobs_started("rollout") == 1


async def test_post_answer_lost_mid_body_is_retried_safely(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=10)
    bread_emulator.set_faults(Faults(drop=1.0, max_faults=1, routes=frozenset({"run_rollout"})))
    status = await client.targets.rollout.run("t", repo_name="r", poll=False)
    assert status.status == "running"
    assert bread_emulator.stats.count("run_rollout") == 2
    assert bread_emulator.stats.jobs_started("rollout") == 1  # the POST is idempotent


async def test_a_body_cut_short_is_retried(client: BreadClient, target: Emulator) -> None:
    target.set_faults(Faults(drop=1.0, max_faults=2))
    page = await client.targets.rollout.get_output("t", repo_name="r", limit=1000)
    assert page.output == target.trajectories("r", "t", 0, 1000)
    assert target.stats.count("get_rollout_output") == 3
    assert target.stats.faults("drop") == 2
    assert client.stats.connection_errors == 2


async def test_drops_beyond_the_budget_raise_a_connection_error(
    client: BreadClient, target: Emulator
) -> None:
    target.set_faults(Faults(drop=1.0))
    with pytest.raises(APIConnectionError, match="dropped mid-body") as caught:
        await client.targets.rollout.get_output("t", repo_name="r", limit=1000)
    assert caught.value.attempts == 4


async def test_a_drip_fed_body_hits_the_attempt_deadline(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    # Each chunk arrives well within the read timeout; only the attempt's deadline stops it.
    target.set_faults(Faults(slow_body=4000), repo="r", target="t")
    client = make_client(
        timeout=Timeouts(connect=1, read=5, request=0.3),
        retry=RetryPolicy(max_retries=1, initial_backoff=0.001),
    )
    with pytest.raises(APITimeoutError):
        await client.targets.rollout.get_output("t", repo_name="r", limit=10)
    # The emulator counts a request when its answer ends, which the client cut short; the
    # client's own counters tell the attempts.
    assert client.stats.requests == 2
    assert client.stats.connection_errors == 2


async def test_in_flight_never_exceeds_max_concurrency(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    target.set_faults(Faults(latency=0.05))
    client = make_client(max_concurrency=8)
    async with anyio.create_task_group() as tg:
        for _ in range(60):
            tg.start_soon(partial(client.targets.rollout.get, "t", repo_name="r"))
    assert target.stats.max_in_flight == 8
    assert target.stats.count("get_rollout", status=200) == 60


class _ClosingServer:
    """A raw HTTP server on 127.0.0.1 that reads each request and closes the connection
    without an answer, ``closes`` times, then answers ``{}``."""

    def __init__(self, closes: int) -> None:
        self.closes = closes
        self.seen = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.seen += 1
                if self.seen <= self.closes:
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n{}"
                )
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.mark.parametrize("closes", [2, 10])
async def test_the_server_sees_exactly_the_attempts_the_client_counts(closes: int) -> None:
    """aiohttp would silently send a GET again when the connection closes before an
    answer; the client turns that off, so each attempt is one request on the wire."""
    closing = _ClosingServer(closes)
    server = await asyncio.start_server(closing.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with BreadClient("k", f"http://127.0.0.1:{port}", retry=FAST_RETRY) as client:
            if closes < 4:
                assert await client.request("GET", "/v1/x") == {}
            else:
                with pytest.raises(APIConnectionError, match="closed the connection") as caught:
                    await client.request("GET", "/v1/x")
                assert caught.value.attempts == 4
            assert client.stats.requests == closing.seen == min(closes + 1, 4)
    finally:
        server.close()
        await server.wait_closed()


async def test_an_untrusted_certificate_is_not_retried(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    handshakes = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal handshakes
        handshakes += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        async with BreadClient("k", f"https://127.0.0.1:{port}", retry=FAST_RETRY) as client:
            with pytest.raises(CertificateError, match=r"of 127\.0\.0\.1 cannot") as e:
                await client.request("GET", "/v1/x")
            assert e.value.attempts == 1
            assert client.stats.requests == 1
            assert client.stats.retries == 0
    finally:
        server.close()
        await server.wait_closed()
    assert handshakes == 0  # never trusted, so nothing was sent


async def test_a_base_url_ending_in_v1_is_understood(
    make_client: Callable[..., BreadClient], target: Emulator
) -> None:
    assert target.url is not None
    client = make_client(base_url=target.url + "/v1/")
    assert client.base_url == target.url
    status = await client.targets.rollout.get("t", repo_name="r")
    assert status.is_complete
    assert [r.route for r in target.stats.records()] == ["get_rollout"]
