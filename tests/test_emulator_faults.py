"""Every fault switch of the emulator, observed over real HTTP."""

from __future__ import annotations

import asyncio
import email.utils
import time

import aiohttp
import orjson
import pytest

from breadasync.emulator import Emulator, Faults
from tests.conftest import RawApi

T = "/v1/repo/r/targets"
OUT = T + "/t/rollout/output"


@pytest.fixture
def target(bread_emulator: Emulator) -> Emulator:
    bread_emulator.add_target("r", "t", rows=3000, rollout="complete")
    bread_emulator.add_target("r", "calm", rows=10, rollout="complete")
    return bread_emulator


async def test_faults_are_off_by_default(api: RawApi, target: Emulator) -> None:
    replies = await asyncio.gather(*(api.get(OUT, params={"limit": "1000"}) for _ in range(20)))
    assert {r.status for r in replies} == {200}
    assert target.stats.faults() == 0


async def test_latency_and_jitter(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(latency=0.15, jitter=0.1))
    started = time.monotonic()
    reply = await api.get(T + "/t/rollout")
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert elapsed >= 0.15
    record = target.stats.records()[-1]
    assert 0.15 <= record.elapsed < 0.25 + 0.1  # latency + jitter, plus scheduling slack


@pytest.mark.parametrize("status", [500, 408, 504])
async def test_injected_errors(api: RawApi, target: Emulator, status: int) -> None:
    target.set_faults(Faults(errors={status: 1.0}))
    reply = await api.get(T + "/t/rollout")
    assert reply.status == status
    assert target.stats.faults(str(status)) == 1


async def test_502_has_an_html_body(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={502: 1.0}))
    reply = await api.get(T + "/t/rollout")
    assert reply.status == 502
    assert reply.headers["Content-Type"].startswith("text/html")
    assert b"<html>" in reply.body


async def test_503_carries_retry_after(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={503: 1.0}, retry_after=2.5))
    reply = await api.get(T + "/t/rollout")
    assert reply.status == 503
    assert reply.headers["Retry-After"] == "3"
    assert reply.headers["retry-after-ms"] == "2500"
    assert reply.json() == {"error": "Service temporarily unavailable"}


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("seconds", {"Retry-After": "0.25"}), ("ms", {"retry-after-ms": "250"}), ("none", {})],
)
async def test_retry_after_formats(
    api: RawApi, target: Emulator, fmt: str, expected: dict[str, str]
) -> None:
    target.set_faults(Faults(errors={503: 1.0}, retry_after=0.25, retry_after_format=fmt))  # type: ignore[arg-type]
    reply = await api.get(T + "/t/rollout")
    got = {k: v for k, v in reply.headers.items() if k.lower().startswith("retry-after")}
    assert got == expected


async def test_retry_after_as_http_date(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={503: 1.0}, retry_after=30, retry_after_format="http-date"))
    reply = await api.get(T + "/t/rollout")
    when = email.utils.parsedate_to_datetime(reply.headers["Retry-After"]).timestamp()
    assert 25 <= when - time.time() <= 31


async def test_x_should_retry_header(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={500: 1.0}, should_retry=False))
    reply = await api.get(T + "/t/rollout")
    assert reply.headers["x-should-retry"] == "false"


async def test_rate_limit_answers_429_with_retry_after(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(rate_limit=5, rate_burst=2))
    replies = await asyncio.gather(*(api.get(T + "/t/rollout") for _ in range(10)))
    statuses = [r.status for r in replies]
    assert statuses.count(200) in (2, 3)  # the burst, and maybe one token refilled meanwhile
    limited = [r for r in replies if r.status == 429]
    assert limited
    assert all(0 < int(r.headers["retry-after-ms"]) <= 400 for r in limited)
    assert all(r.json() == {"error": "Rate limit exceeded"} for r in limited)


async def test_drop_cuts_the_body_short(http: aiohttp.ClientSession, target: Emulator) -> None:
    target.set_faults(Faults(drop=1.0))
    headers = {"Authorization": f"Bearer {target.api_key}"}
    async with http.get(f"{target.url}{OUT}?limit=1000", headers=headers) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert target.stats.faults("drop") == 1


async def test_slow_body_drip_feeds(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(slow_body=20_000), repo="r", target="calm")
    started = time.monotonic()
    reply = await api.get(T + "/calm/rollout/output", params={"limit": "5"})
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert len(reply.json()["output"]) == 5
    assert elapsed >= len(reply.body) / 20_000 * 0.9


async def test_page_cap_returns_fewer_rows_than_asked(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(page_cap=250))
    page = (await api.get(OUT, params={"limit": "1000", "offset": "100"})).json()
    assert len(page["output"]) == 250
    assert page["limit"] == 1000
    assert page["has_more"] is True
    assert page["output"] == target.trajectories("r", "t", 100, 350)


async def test_growing_lines_on_a_complete_job(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(growing_lines=7))
    first = (await api.get(T + "/t/rollout")).json()
    second = (await api.get(T + "/t/rollout")).json()
    assert first["status"] == second["status"] == "complete"
    assert second["lines"] - first["lines"] == 7
    assert first["lines"] > 3000


async def test_redirect_to_another_origin(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(redirect_to="http://elsewhere.invalid"))
    reply = await api.get(T + "/t/rollout")
    assert reply.status == 307
    assert reply.headers["Location"].startswith("http://elsewhere.invalid/")


@pytest.mark.parametrize("kind", ["html", "truncated", "deep"])
async def test_corrupt_bodies_are_not_json(api: RawApi, target: Emulator, kind: str) -> None:
    target.set_faults(Faults(corrupt=1.0, corrupt_kind=kind))  # type: ignore[arg-type]
    reply = await api.get(T + "/t/rollout")
    assert reply.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(reply.body)


async def test_corrupt_wrong_types(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(corrupt=1.0, corrupt_kind="wrong-types"))
    page = (await api.get(OUT, params={"limit": "3"})).json()
    assert isinstance(page["lines"], str)
    assert isinstance(page["output"], dict)


async def test_corrupt_has_more_lies(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(corrupt=1.0, corrupt_kind="has-more-lies"))
    last = (await api.get(OUT, params={"limit": "1000", "offset": "2000"})).json()
    assert last["has_more"] is True


@pytest.mark.bread_emulator(huge_body_bytes=4 * 1024 * 1024)
async def test_corrupt_huge_body_streams_without_a_length(
    http: aiohttp.ClientSession, target: Emulator
) -> None:
    target.set_faults(Faults(corrupt=1.0, corrupt_kind="huge"))
    headers = {"Authorization": f"Bearer {target.api_key}"}
    async with http.get(f"{target.url}{T}/t/rollout", headers=headers) as resp:
        assert resp.content_length is None
        body = await resp.read()
    assert len(body) >= 4 * 1024 * 1024


async def test_routes_filter_limits_faults(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={500: 1.0}, routes=frozenset({"get_rollout_output"})))
    assert (await api.get(T + "/t/rollout")).status == 200
    assert (await api.get(OUT)).status == 500


async def test_max_faults_stops_injecting(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={503: 1.0}, max_faults=2))
    statuses = [(await api.get(T + "/t/rollout")).status for _ in range(4)]
    assert statuses == [503, 503, 200, 200]


async def test_target_faults_replace_server_faults(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={500: 1.0}))
    target.set_faults(Faults(errors={503: 1.0}), repo="r", target="t")
    assert (await api.get(T + "/t/rollout")).status == 503
    assert (await api.get(T + "/calm/rollout")).status == 500
    target.set_faults(Faults(), repo="r", target="t")
    assert (await api.get(T + "/t/rollout")).status == 200
    target.set_faults(None)
    assert (await api.get(T + "/calm/rollout")).status == 200


async def test_fault_fractions_are_roughly_honoured(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={500: 0.3}), repo="r", target="calm")
    statuses = [(await api.get(T + "/calm/rollout")).status for _ in range(200)]
    assert 30 <= statuses.count(500) <= 90


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latency": -1}, "latency must be >= 0"),
        ({"errors": {200: 0.5}}, "not an HTTP error status"),
        ({"errors": {500: 1.5}}, "within 0..1"),
        ({"errors": {500: 0.6, 503: 0.6}}, "add up to more than 1"),
        ({"drop": 2}, "fraction"),
        ({"rate_limit": 0}, "rate_limit must be > 0"),
        ({"page_cap": 0}, "page_cap must be >= 1"),
        ({"routes": frozenset({"nope"})}, "unknown route"),
    ],
)
def test_invalid_fault_switches_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Faults(**kwargs)  # type: ignore[arg-type]


def test_faults_round_trip_through_dicts() -> None:
    faults = Faults(errors={503: 0.1, 502: 0.05}, routes=frozenset({"get_rollout"}), drop=0.1)
    assert Faults.from_dict(orjson.loads(orjson.dumps(faults.to_dict()))) == faults
    with pytest.raises(ValueError, match="unknown fault switch"):
        Faults.from_dict({"latencyy": 1})


async def test_corrupt_overlong_and_empty_pages(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(corrupt=1.0, corrupt_kind="overlong"))
    page = (await api.get(OUT, params={"limit": "10"})).json()
    assert len(page["output"]) == 11
    target.set_faults(Faults(corrupt=1.0, corrupt_kind="empty"))
    page = (await api.get(OUT, params={"limit": "10"})).json()
    assert page["output"] == []
    assert page["lines"] == 3000
