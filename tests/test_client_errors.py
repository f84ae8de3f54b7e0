"""Every error class, with its message, and bad input that must send nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from breadasync import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BreadClient,
    ConfigError,
    ConflictError,
    InternalServerError,
    InvalidArgumentError,
    JobFailedError,
    NotFoundError,
    PaymentRequiredError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    RedirectError,
    RetryPolicy,
    Timeouts,
    UnprocessableEntityError,
)
from breadasync._redact import FRAGMENT
from breadasync.emulator import Emulator, Faults, TargetPlan
from breadasync.export import batch_to_rows
from tests.conftest import FAST_RETRY


def assert_no_key(error: BaseException, key: str) -> None:
    texts = [str(error), repr(error), repr(error.args)]
    if isinstance(error, APIStatusError):
        texts += [
            error.body.decode("utf-8", "replace"),
            str(error.server_message),
            repr(dict(error.headers)),
        ]
    assert not any(key in text for text in texts)


async def test_404_not_found(client: BreadClient, bread_emulator: Emulator) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.targets.rollout.run("ghost", repo_name="my_repo")
    error = caught.value
    assert (error.status, error.method, error.path) == (
        404,
        "POST",
        "/v1/repo/my_repo/targets/ghost/rollout",
    )
    assert error.server_message == "Target not found"
    assert (
        str(error) == "POST /v1/repo/my_repo/targets/ghost/rollout -> 404 Not Found: "
        "Target not found"
    )
    assert error.body == b'{"error":"Target not found"}'
    assert bread_emulator.stats.count() == 1  # never retried
    assert_no_key(error, bread_emulator.api_key)


async def test_400_prerequisites(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "nostim", stim="running")
    bread_emulator.add_target("r", "nomodel", overrides={"model_name": None})
    with pytest.raises(BadRequestError, match="Stim job must complete before running rollout"):
        await client.targets.rollout.run("nostim", repo_name="r")
    with pytest.raises(BadRequestError, match="model_name must be configured in target"):
        await client.targets.rollout.run("nomodel", repo_name="r")
    assert bread_emulator.stats.count() == 2


async def test_401_bad_key(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator
) -> None:
    client = make_client(api_key="not-the-key")
    with pytest.raises(AuthenticationError, match="Invalid API key") as caught:
        await client.targets.list(repo_name="r")
    assert caught.value.status == 401
    assert bread_emulator.stats.count() == 1


async def test_402_out_of_credit(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", plan=TargetPlan(out_of_credit=True))
    with pytest.raises(PaymentRequiredError, match="Insufficient credits"):
        await client.targets.rollout.run("t", repo_name="r")
    assert bread_emulator.stats.count() == 1


@pytest.mark.bread_emulator(master_key=False)
async def test_403_user_override_without_master_key(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t")
    with pytest.raises(PermissionDeniedError, match="master API key"):
        await client.targets.get("t", repo_name="r", user_id="alice")
    assert bread_emulator.stats.count() == 1


async def test_409_immutable_target(client: BreadClient, bread_emulator: Emulator) -> None:
    await client.targets.create(repo_name="r", target_name="t", overrides={"model_name": "a"})
    with pytest.raises(ConflictError, match="immutable"):
        await client.targets.create(repo_name="r", target_name="t", overrides={"model_name": "b"})
    assert bread_emulator.stats.count(status=409) == 1


async def test_422_detail_becomes_the_message(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    with pytest.raises(UnprocessableEntityError) as caught:
        await client.targets.create(
            repo_name="r", target_name="t", overrides={"temperature": "hot"}
        )
    assert (
        caught.value.server_message == "body.overrides.temperature: Input should be a valid number"
    )
    assert bread_emulator.stats.count() == 1


@pytest.mark.bread_emulator(dialect="spec")
async def test_spec_error_bodies_carry_a_code(client: BreadClient) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.targets.get("ghost", repo_name="r")
    assert caught.value.code == "RESOURCE_NOT_FOUND"
    assert caught.value.server_message == "Target not found"


async def test_429_after_retries_run_out(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t")
    bread_emulator.set_faults(Faults(errors={429: 1.0}, retry_after=0.001, retry_after_format="ms"))
    with pytest.raises(RateLimitError) as caught:
        await client.targets.get("t", repo_name="r")
    assert caught.value.retry_after == 0.001
    assert caught.value.attempts == 4
    assert "gave up after 4 attempts" in str(caught.value)
    assert bread_emulator.stats.count() == 4


async def test_5xx_html_body_is_summarised(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t")
    bread_emulator.set_faults(Faults(errors={502: 1.0}))
    with pytest.raises(InternalServerError) as caught:
        await client.targets.get("t", repo_name="r")
    assert caught.value.status == 502
    assert caught.value.server_message == "502 Bad Gateway"
    assert b"<html>" in caught.value.body


async def test_dead_server_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on that port now.
    async with BreadClient(
        "k", f"http://127.0.0.1:{port}", retry=RetryPolicy(max_retries=2, initial_backoff=0.001)
    ) as client:
        with pytest.raises(APIConnectionError) as caught:
            await client.targets.list(repo_name="r")
    message = str(caught.value)
    assert f"cannot connect to http://127.0.0.1:{port}" in message
    assert "is the base URL right" in message
    assert caught.value.attempts == 3
    assert client.stats.connection_errors == 3


async def test_timeout_is_an_api_timeout_error(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t")
    bread_emulator.set_faults(Faults(latency=2.0))
    client = make_client(timeout=0.2, retry=RetryPolicy(max_retries=1, initial_backoff=0.001))
    with pytest.raises(APITimeoutError, match="no complete answer within the timeout"):
        await client.targets.get("t", repo_name="r")
    assert client.stats.connection_errors == 2


@pytest.mark.parametrize(
    ("kind", "message", "requests"),
    [
        # Not JSON at all (cut short, a proxy's page): retried like a 5xx, then given up.
        ("html", "not JSON", FAST_RETRY.max_retries + 1),
        ("truncated", "not JSON", FAST_RETRY.max_retries + 1),
        # JSON the client refuses: another try would bring the same.
        ("deep", "nested too deeply", 1),
        ("wrong-types", "field 'lines' should be an integer (got '3 lines')", 1),
    ],
)
async def test_broken_answers_are_protocol_errors(
    client: BreadClient, bread_emulator: Emulator, kind: str, message: str, requests: int
) -> None:
    bread_emulator.add_target("r", "t", rows=3, rollout="complete")
    bread_emulator.set_faults(Faults(corrupt=1.0, corrupt_kind=kind))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as caught:
        await client.targets.rollout.get("t", repo_name="r")
    assert message in str(caught.value)
    assert caught.value.status == 200
    assert str(caught.value).startswith("GET /v1/repo/r/targets/t/rollout -> 200")
    assert caught.value.retryable == (requests > 1)
    assert bread_emulator.stats.count() == requests
    if requests > 1:
        assert f"(gave up after {requests} attempts)" in str(caught.value)


@pytest.mark.parametrize("processes", [0, 1], ids=["threads", "child"])
async def test_a_body_that_is_not_json_now_and_then_costs_a_retry(
    make_client: Callable[..., BreadClient],
    bread_emulator: Emulator,
    tmp_path: Path,
    processes: int,
) -> None:
    """Complete 200 answers whose JSON is cut short, on a fifth of the requests: every call
    and the export succeed, with the rows served, whichever process decodes the pages."""
    # Ten retries: eleven cut bodies in a row (0.2**11) never happen in ~40 requests.
    client = make_client(
        retry=RetryPolicy(max_retries=10, initial_backoff=0.001, max_backoff=0.005)
    )
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    bread_emulator.set_faults(Faults(truncate=0.2))
    job = await client.targets.rollout.get("t", repo_name="r")
    assert job.lines == 3000
    result = await client.export_rollout(
        "t", repo_name="r", dest=tmp_path / "out", page_size=100, decode_processes=processes
    )
    assert result.rows == 3000
    assert bread_emulator.stats.faults("truncate") > 0
    table = pq.read_table(tmp_path / "out")
    assert batch_to_rows(table) == bread_emulator.trajectories("r", "t")


async def test_output_that_is_not_a_list(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rows=3, rollout="complete")
    bread_emulator.set_faults(Faults(corrupt=1.0, corrupt_kind="wrong-types"))
    with pytest.raises(ProtocolError, match="field 'output' should be a list of rows"):
        await client.targets.rollout.get_output("t", repo_name="r")


# The friendly profile's 1000-row pages are over 1 MiB; that size is what this test is about.
@pytest.mark.bread_emulator(huge_body_bytes=8 * 1024 * 1024, profile="simple")
async def test_body_over_the_size_limit(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=3, rollout="complete")
    bread_emulator.set_faults(Faults(corrupt=1.0, corrupt_kind="huge"))
    client = make_client(max_body_bytes=1024 * 1024)
    with pytest.raises(ProtocolError, match="over the limit of 1,048,576 bytes"):
        await client.targets.rollout.get("t", repo_name="r")
    # A page over the limit by its declared length is refused before it is read.
    bread_emulator.set_faults(None)
    bread_emulator.add_target("r", "big", rows=2000, rollout="complete")
    with pytest.raises(ProtocolError, match=r"the answer is [\d,]+ bytes, over the limit"):
        await client.targets.rollout.get_output("big", repo_name="r", limit=1000)


async def test_redirects_are_not_followed(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t")
    bread_emulator.set_faults(Faults(redirect_to="http://collector.example"))
    with pytest.raises(RedirectError) as caught:
        await client.targets.get("t", repo_name="r")
    assert caught.value.location == "http://collector.example/v1/elsewhere"
    assert "http://collector.example/v1/elsewhere" in str(caught.value)
    assert bread_emulator.stats.count() == 1


# --- bad input: a clear error and nothing sent ---------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.targets.get("", repo_name="r"), "target_name must not be empty"),
        (lambda c: c.targets.get("t", repo_name=""), "repo_name must not be empty"),
        (lambda c: c.targets.get(7, repo_name="r"), "target_name must be a str, got int"),
        (lambda c: c.targets.get(".", repo_name="r"), "must not be '.'"),
        (lambda c: c.targets.rollout.run("..", repo_name="r"), "must not be '..'"),
        (lambda c: c.targets.get("a\x00b", repo_name="r"), "control character"),
        (lambda c: c.targets.get("a\nb", repo_name="r"), "control character"),
        (lambda c: c.targets.rollout.get_output("t", repo_name="r", limit=0), "within 1..1000"),
        (lambda c: c.targets.rollout.get_output("t", repo_name="r", limit=1001), "within 1..1000"),
        (lambda c: c.targets.rollout.get_output("t", repo_name="r", limit=True), "an int"),
        (lambda c: c.targets.rollout.get_output("t", repo_name="r", offset=-1), "within 0.."),
        (lambda c: c.targets.stim.get_output("t", repo_name="r", offset=1.5), "an int"),
        (
            lambda c: c.targets.create(repo_name="r", target_name="t", overrides=[1]),
            "overrides must be a mapping",
        ),
        (lambda c: c.targets.get("t", repo_name="r", user_id=""), "user_id must not be empty"),
        (lambda c: c.targets.get("t", repo_name="r", user_id="ünï"), "must be ASCII"),
        (lambda c: c.targets.rollout.wait("t", repo_name="r", poll_timeout=0), "poll_timeout"),
        (
            lambda c: c.targets.rollout.run("t", repo_name="r", poll=False, poll_timeout=-1),
            "poll_timeout",
        ),
        (
            lambda c: c.targets.rollout.run("t", repo_name="r", poll_policy={"initial": 1}),
            "poll_policy must be a breadasync.PollPolicy, not dict",
        ),
        (
            lambda c: c.targets.rollout.run("t", repo_name="r", poll=False, poll_policy=1),
            "poll_policy must be a breadasync.PollPolicy, not int",
        ),
        (lambda c: c.rollout_many(["t"], repo_name="r", poll_policy=2.0), "not float"),
        (
            lambda c: c.rollout_many(["t"], repo_name="r", on_progress="x"),
            "on_progress must be a callable or None, not str",
        ),
        (
            lambda c: c.request("GET", "http://evil.example/v1/repo"),
            "not a path on the configured origin",
        ),
        (lambda c: c.request("GET", "//evil.example/v1"), "absolute URLs are refused"),
        (lambda c: c.request("TRACE", "/v1"), "unsupported HTTP method"),
    ],
)
async def test_invalid_arguments_send_nothing(
    client: BreadClient,
    bread_emulator: Emulator,
    call: Callable[[BreadClient], Any],
    message: str,
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        await call(client)
    assert bread_emulator.stats.count() == 0


def test_no_api_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BREAD_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="set the BREAD_API_KEY environment variable"):
        BreadClient()
    monkeypatch.setenv("BREAD_API_KEY", "   ")
    with pytest.raises(ConfigError, match="no API key"):
        BreadClient()


def test_environment_supplies_key_and_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BREAD_API_KEY", "env-key-123")
    monkeypatch.setenv("BREAD_BASE_URL", "http://127.0.0.1:9/prefix/")
    client = BreadClient()
    assert client.base_url == "http://127.0.0.1:9/prefix"
    assert "env-key-123" not in repr(client)
    monkeypatch.delenv("BREAD_BASE_URL")
    assert BreadClient().base_url == "https://bapi.bread.com.ai"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "ftp://bapi.bread.com.ai"}, "must be an http(s) URL"),
        ({"base_url": "bapi.bread.com.ai"}, "must be an http(s) URL"),
        ({"base_url": "http://bapi.bread.com.ai"}, "plain http to a host that is not loopback"),
        ({"base_url": "https://user:pw@bapi.bread.com.ai"}, "must not carry credentials"),
        ({"base_url": "https://bapi.bread.com.ai/?x=1"}, "must not have a query"),
        # A key pasted into the query is not echoed back.
        ({"base_url": "https://bapi.bread.com.ai/?key=sk-pasted-here"}, r"ai/' must not"),
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": -5}, "timeout must be a positive number"),
        ({"timeout": Timeouts(total=None, connect=1, read=1, request=1)}, None),
        ({"max_retries": -1}, "max_retries must be an int >= 0"),
        ({"max_concurrency": 0}, "max_concurrency must be an int >= 1"),
        ({"max_requests_per_second": 0}, "max_requests_per_second must be a positive"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"user_id": "bad\nid"}, "control character"),
        ({"api_key": "has space"}, "spaces, control or non-ASCII"),
        ({"api_key": 42}, "api_key must be a str"),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], message: str | None) -> None:
    kwargs.setdefault("api_key", "k")
    if message is None:
        BreadClient(**kwargs)
        return
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as caught:
        BreadClient(**kwargs)
    assert "sk-pasted-here" not in str(caught.value)


def test_insecure_http_needs_an_opt_in() -> None:
    client = BreadClient("k", "http://bread.internal:8080", allow_insecure_http=True)
    assert client.base_url == "http://bread.internal:8080"
    for loopback in ("http://localhost:1", "http://127.0.0.5:1", "http://[::1]:1"):
        BreadClient("k", loopback)
    # A name under .localhost may be resolved through DNS to anywhere: not loopback.
    for other in ("http://api.localhost:1", "http://localhost.example:1", "http://10.0.0.1:1"):
        with pytest.raises(ConfigError, match="not loopback"):
            BreadClient("k", other)


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("https://bapi.bread.com.ai/v1", "https://bapi.bread.com.ai"),
        ("https://bapi.bread.com.ai/v1/", "https://bapi.bread.com.ai"),
        ("https://proxy.example/bread/v1", "https://proxy.example/bread"),
        ("https://proxy.example/v1beta", "https://proxy.example/v1beta"),
    ],
)
def test_a_base_url_ending_in_v1_drops_it(given: str, used: str) -> None:
    # Every request path starts with /v1 already: /v1/v1/... would be a misleading 404.
    assert BreadClient("k", given).base_url == used


def test_the_key_is_in_no_repr_or_config_error() -> None:
    client = BreadClient("sk-very-secret-key", "https://bapi.bread.com.ai")
    assert "sk-very-secret-key" not in repr(client)
    assert "sk-very-secret-key" not in repr(vars(client))
    with pytest.raises(ConfigError) as caught:
        BreadClient("sk-secret with space", "https://bapi.bread.com.ai")
    assert "sk-secret" not in str(caught.value)


async def test_a_key_echoed_by_the_server_is_scrubbed(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t")
    bread_emulator.set_faults(Faults(errors={500: 1.0}, echo_request=True))
    with pytest.raises(InternalServerError) as caught:
        await client.targets.get("t", repo_name="r")
    assert "Authorization: Bearer ***" in str(caught.value)
    assert_no_key(caught.value, bread_emulator.api_key)


@pytest.mark.parametrize("kind", ["echo"])
async def test_a_key_echoed_in_a_broken_answer_is_scrubbed(
    client: BreadClient, bread_emulator: Emulator, kind: str
) -> None:
    bread_emulator.add_target("r", "t", rows=3, rollout="complete")
    bread_emulator.set_faults(Faults(corrupt=1.0, corrupt_kind=kind))  # type: ignore[arg-type]
    for call in (
        client.targets.rollout.get("t", repo_name="r"),
        client.targets.rollout.get_output("t", repo_name="r"),
    ):
        with pytest.raises(ProtocolError) as caught:
            await call
        assert "Bearer ***" in caught.value.excerpt + str(caught.value)
        assert_no_key(caught.value, bread_emulator.api_key)
        assert bread_emulator.api_key not in caught.value.excerpt


KEY = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"


@contextlib.asynccontextmanager
async def echoing_server(pad: int) -> AsyncIterator[str]:
    """A server whose broken 200 answers echo the Authorization header after ``pad``
    characters: target ``s``'s status, and target ``p``'s output pages."""

    def echo(request: web.Request) -> web.Response:
        return web.Response(text="x" * pad + request.headers["Authorization"])

    async def status(request: web.Request) -> web.Response:
        auth = request.headers["Authorization"]
        if request.match_info["target"] == "s":
            return echo(request)
        if request.match_info["target"] == "h":
            return web.json_response({"error": "down"}, status=500, headers={"X-Echo": auth})
        if request.match_info["target"] == "f":
            return web.json_response({"status": "failed", "lines": 1, "error": f"bad {auth}"})
        return web.json_response({"status": "complete", "lines": 10, "job_id": 1})

    async def output(request: web.Request) -> web.Response:
        return echo(request)

    app = web.Application()
    app.router.add_get("/v1/repo/r/targets/{target}/rollout", status)
    app.router.add_get("/v1/repo/r/targets/{target}/rollout/output", output)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# Excerpts are cut at 40 bytes (pages) and 200 characters (other answers): these pads put the
# cut inside the key, where replacing whole copies of it would leave a long piece showing.
@pytest.mark.parametrize("pad", [0, 20, 30, 170, 180])
async def test_a_key_cut_short_by_an_excerpt_shows_no_fragment(pad: int, tmp_path: Path) -> None:
    fragments = {KEY[i : i + FRAGMENT] for i in range(len(KEY) - FRAGMENT + 1)}
    async with (
        echoing_server(pad) as url,
        BreadClient(KEY, url, max_retries=0) as client,
    ):
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "status": lambda: client.targets.rollout.get("s", repo_name="r"),
            "get_output": lambda: client.targets.rollout.get_output("p", repo_name="r"),
            "export": lambda: client.export_rollout("p", repo_name="r", dest=tmp_path / "out"),
        }
        for name, call in calls.items():
            with pytest.raises(ProtocolError) as caught:
                await call()
            texts = [str(caught.value), repr(caught.value), caught.value.excerpt]
            shown = [f for f in fragments for text in texts if f in text]
            assert not shown, (name, shown, texts)


async def test_a_key_echoed_in_headers_or_a_job_error_is_hidden() -> None:
    async with (
        echoing_server(0) as url,
        BreadClient(KEY, url, max_retries=0) as client,
    ):
        with pytest.raises(InternalServerError) as caught:
            await client.targets.rollout.get("h", repo_name="r")
        assert caught.value.headers["X-Echo"] == "Bearer ***"
        assert_no_key(caught.value, KEY)
        status = await client.targets.rollout.get("f", repo_name="r")
        assert status.error == "bad Bearer ***"
        assert KEY not in repr(status.raw)
        with pytest.raises(JobFailedError) as failed:
            await client.targets.rollout.wait("f", repo_name="r")
        assert_no_key(failed.value, KEY)
        assert KEY not in repr(failed.value.job.raw)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"HTTP/1.1 abc\r\n\r\n", "the answer is not valid HTTP (Bad status line"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nnotgz",
            "the body could not be read whole",
        ),
    ],
    ids=["bad-status-line", "bad-gzip"],
)
async def test_malformed_http_is_named_as_such(answer: bytes, says: str) -> None:
    """aiohttp reports its parser's failures as a "400", which is not the service's."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with BreadClient(KEY, f"http://127.0.0.1:{port}", max_retries=0) as client:
            with pytest.raises(APIConnectionError) as caught:
                await client.targets.rollout.get("t", repo_name="r")
    finally:
        server.close()
        await server.wait_closed()
    assert says in str(caught.value)
    assert "400" not in str(caught.value)
