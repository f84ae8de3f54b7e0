"""Every fault switch of the emulator, observed over real HTTP."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest

from breadasync.emulator import HOSTILE_KINDS, Emulator, Faults
from tests.conftest import RawApi, quiet

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
    # Lower bounds only: the latency is a floor; how much later a busy machine answers is
    # no business of this test.
    assert elapsed >= 0.15
    assert target.stats.records()[-1].elapsed >= 0.15


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
    before = time.time()
    reply = await api.get(T + "/t/rollout")
    after = time.time()
    when = email.utils.parsedate_to_datetime(reply.headers["Retry-After"]).timestamp()
    # 30 s after the answer, to the second: bounds from the clock around the request, so a
    # slow machine cannot break them.
    assert before + 29 <= when <= after + 30


async def test_x_should_retry_header(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(errors={500: 1.0}, should_retry=False))
    reply = await api.get(T + "/t/rollout")
    assert reply.headers["x-should-retry"] == "false"


async def test_rate_limit_answers_429_with_retry_after(api: RawApi, target: Emulator) -> None:
    # A rate so low that no token refills during the test, however slow the machine.
    target.set_faults(Faults(rate_limit=0.001, rate_burst=2))
    replies = await asyncio.gather(*(api.get(T + "/t/rollout") for _ in range(10)))
    statuses = [r.status for r in replies]
    assert statuses.count(200) == 2  # the burst
    limited = [r for r in replies if r.status == 429]
    assert len(limited) == 8
    assert target.stats.faults("429") == 8
    assert all(int(r.headers["retry-after-ms"]) > 0 for r in limited)
    assert all(r.json() == {"error": "Rate limit exceeded"} for r in limited)


async def test_key_rate_limit_is_one_bucket_per_key(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(key_rate_limit=0.001, key_rate_burst=3, key_rate_no_header=0.2))
    # Two targets, one key: every request of the key takes from the same bucket.
    replies = await asyncio.gather(
        *(api.get(T + ("/t/rollout" if i % 2 else "/calm/rollout")) for i in range(60))
    )
    assert [r.status for r in replies].count(200) == 3
    limited = [r for r in replies if r.status == 429]
    assert len(limited) == 57
    assert target.stats.faults("rate_limit") == 57
    forms = {"none": 0, "seconds": 0, "date": 0}
    for reply in limited:
        value = reply.headers.get("Retry-After")
        assert "retry-after-ms" not in reply.headers
        if value is None:
            forms["none"] += 1
        elif value.isdigit():
            forms["seconds"] += 1
            assert int(value) >= 1  # whole seconds, rounded up
        else:
            forms["date"] += 1
            when = email.utils.parsedate_to_datetime(value).timestamp()
            assert when == int(when)  # an HTTP-date has 1 s resolution
    assert all(forms.values()), forms  # the seeded draws give every form


async def test_overload_answers_503_for_a_period_of_the_emulator_clock(
    api: RawApi, target: Emulator
) -> None:
    target.clock.speed = 0
    target.overload(5)
    replies = await asyncio.gather(*(api.get(T + "/t/rollout") for _ in range(6)))
    assert {r.status for r in replies} == {503}
    assert {r.headers["Retry-After"] for r in replies} == {"1"}
    assert target.stats.faults("overload") == 6
    target.clock.advance(4.9)
    assert (await api.get(T + "/calm/rollout")).status == 503
    target.clock.advance(0.2)
    assert (await api.get(T + "/t/rollout")).status == 200
    target.overload(1, retry_after=None)
    reply = await api.get(T + "/t/rollout")
    assert reply.status == 503
    assert "Retry-After" not in reply.headers
    assert target.stats.faults("overload") == 8


async def test_truncated_bodies_are_complete_http_but_not_json(
    api: RawApi, target: Emulator
) -> None:
    target.set_faults(Faults(truncate=1.0))
    reply = await api.get(OUT, params={"limit": "10"})
    assert reply.status == 200
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(reply.body)
    assert target.stats.faults("truncate") == 1


async def test_drip_feeds_some_bodies_whole(api: RawApi, target: Emulator) -> None:
    target.set_faults(Faults(drip=1.0, drip_rate=50_000), repo="r", target="calm")
    reply = await api.get(T + "/calm/rollout/output", params={"limit": "3"})
    assert reply.status == 200
    assert reply.json()["output"] == target.trajectories("r", "calm", 0, 3)
    # A streamed body reaches the client before the emulator has recorded it.
    await quiet(target)
    assert target.stats.faults("drip") == 1


async def test_flakiness_switches_are_independent_per_request(
    api: RawApi, target: Emulator
) -> None:
    target.set_faults(
        Faults(errors={500: 0.1, 502: 0.1, 503: 0.1, 504: 0.1}, truncate=0.1),
        repo="r",
        target="calm",
    )
    replies = [await api.get(T + "/calm/rollout") for _ in range(300)]
    statuses = Counter(r.status for r in replies)
    assert set(statuses) == {200, 500, 502, 503, 504}
    stats = target.stats
    assert sum(stats.faults(str(code)) for code in (500, 502, 503, 504)) == 300 - statuses[200]
    assert stats.faults("truncate") > 0  # drawn on answers that were not errors


def parse_pairs(text: str) -> tuple[Any, list[list[tuple[str, Any]]]]:
    """Python's lenient parse (NaN, lone surrogates, big ints, duplicates all pass), with
    every object's key-value pairs as sent."""
    pairs: list[list[tuple[str, Any]]] = []

    def hook(items: list[tuple[str, Any]]) -> dict[str, Any]:
        pairs.append(items)
        return dict(items)

    return json.loads(text, object_pairs_hook=hook), pairs


@pytest.mark.parametrize("kind", [k for k in HOSTILE_KINDS if k != "huge-string"])
async def test_hostile_bodies(api: RawApi, target: Emulator, kind: str) -> None:
    target.set_faults(
        Faults(corrupt=1.0, corrupt_kind=kind, hostile_keys=1000),  # type: ignore[arg-type]
        repo="r",
        target="t",
    )
    for path in (OUT, T + "/t/rollout"):
        reply = await api.get(path, params={"limit": "10"})
        assert reply.status == 200
        text = reply.body.decode()
        if kind.startswith("deep"):
            opener = "{" if kind.endswith("object") else "["
            assert opener * 1000 in text.replace('{"a":', "{")
            with pytest.raises(orjson.JSONDecodeError):  # deeper than any sane parser goes
                orjson.loads(reply.body)
            continue
        data, pairs = parse_pairs(text)
        if "output" in data:
            assert len(data["output"]) == 10
        if kind == "many-keys":
            assert any(len(p) == 1000 for p in pairs)
        elif kind == "nan":
            assert "NaN" in text
            assert "Infinity" in text
        elif kind == "lone-surrogate":
            assert "\\ud83d" in text
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(reply.body)
        elif kind == "duplicate-keys":
            assert any(len({k for k, _ in p}) < len(p) for p in pairs)
        elif kind == "big-int":
            assert any(
                isinstance(v, int) and not -(2**63) <= v < 2**64 for p in pairs for _, v in p
            )
    assert target.stats.faults("corrupt") == 2


@pytest.mark.bread_emulator(huge_body_bytes=3 * 1024 * 1024 + 5)
async def test_huge_string_in_a_row_comes_in_chunks(
    http: aiohttp.ClientSession, target: Emulator
) -> None:
    target.set_faults(Faults(corrupt=1.0, corrupt_kind="huge-string"))
    headers = {"Authorization": f"Bearer {target.api_key}"}
    async with http.get(f"{target.url}{OUT}", headers=headers) as resp:
        assert resp.content_length is None
        body = await resp.read()
    assert len(orjson.loads(body)["output"][0]["response"]) == 3 * 1024 * 1024 + 5


async def test_drop_cuts_the_body_short(http: aiohttp.ClientSession, target: Emulator) -> None:
    target.set_faults(Faults(drop=1.0))
    headers = {"Authorization": f"Bearer {target.api_key}"}
    async with http.get(f"{target.url}{OUT}?limit=1000", headers=headers) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await quiet(target)  # the connection is cut before the emulator records the request
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
