"""BreadClient's methods against the emulator, over loopback."""

from __future__ import annotations

import inspect
import math
import pickle
from collections.abc import Callable
from typing import Any

import anyio
import orjson
import pytest

from breadasync import (
    BreadClient,
    ConfigError,
    InvalidArgumentError,
    JobFailedError,
    JobState,
    JobStatus,
    Limits,
    MockTransport,
    NotFoundError,
    PollPolicy,
    PollTimeoutError,
    ProtocolError,
    TransportRequest,
    TransportResponse,
)
from breadasync._errors import JobError
from breadasync.emulator import Emulator, TargetPlan
from breadasync.testing import run_virtual

frozen = pytest.mark.bread_emulator(speed=0)


async def test_targets_create_get_list(client: BreadClient, bread_emulator: Emulator) -> None:
    created = await client.targets.create(
        repo_name="my_repo",
        target_name="coding_target",
        overrides={"model_name": "Qwen/Qwen3-32B", "num_traj_per_stimulus": 5},
    )
    assert created.target_name == "coding_target"
    assert created.config["num_traj_per_stimulus"] == 5
    assert created.raw["target_name"] == "coding_target"
    got = await client.targets.get("coding_target", repo_name="my_repo")
    assert got.config == created.config
    listed = await client.targets.list(repo_name="my_repo")
    assert listed.targets == ["coding_target"]
    # The create POST carried an Idempotency-Key; a repeat with the same config is fine.
    again = await client.targets.create(
        repo_name="my_repo",
        target_name="coding_target",
        overrides={"model_name": "Qwen/Qwen3-32B", "num_traj_per_stimulus": 5},
    )
    assert again.config == created.config
    keys = [r.idempotency_key for r in bread_emulator.stats.records() if r.route == "create_target"]
    assert len(keys) == 2
    assert all(keys)
    assert keys[0] != keys[1]


@frozen
async def test_stim_and_rollout_without_polling(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target(
        "r",
        "t",
        stim="not_started",
        overrides={"model_name": "m", "num_traj_per_stimulus": 2},
        plan=TargetPlan(stimuli=30),
    )
    stim = await client.targets.stim.run("t", repo_name="r", poll=False)
    assert stim.status is JobState.RUNNING
    assert not stim.is_terminal
    bread_emulator.clock.advance(60)
    stim = await client.targets.stim.get("t", repo_name="r")
    assert stim.is_complete
    assert stim.lines == 30
    stimuli = await client.targets.stim.get_output("t", repo_name="r", limit=10, offset=25)
    assert [row["stimulus_id"] for row in stimuli.output] == [25, 26, 27, 28, 29]

    rollout = await client.targets.rollout.run("t", repo_name="r", poll=False)
    assert rollout.status is JobState.RUNNING
    assert rollout.config["model_name"] == "m"
    bread_emulator.clock.advance(5)
    half = await client.targets.rollout.get("t", repo_name="r")
    assert half.lines == 30
    assert half.progress == 50.0
    bread_emulator.clock.advance(60)
    page = await client.targets.rollout.get_output("t", repo_name="r", limit=1000)
    assert page.status is JobState.COMPLETE
    assert page.lines == 60
    assert page.has_more is False
    assert page.output == bread_emulator.trajectories("r", "t")
    assert page.job.is_complete


@pytest.mark.bread_emulator(speed=20)
async def test_rollout_run_polls_to_completion(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", plan=TargetPlan(stimuli=40, rollout_seconds=4))
    status = await client.targets.rollout.run("t", repo_name="r")
    assert status.is_complete
    assert status.lines == 40
    assert bread_emulator.stats.jobs_started("rollout") == 1
    polls = bread_emulator.stats.count("get_rollout", status=200)
    assert 1 <= polls <= 40


@pytest.mark.bread_emulator(speed=20)
async def test_stim_run_polls_too(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", stim="not_started", plan=TargetPlan(stim_seconds=2))
    status = await client.targets.stim.run("t", repo_name="r")
    assert status.is_complete


@pytest.mark.bread_emulator(speed=50)
async def test_failed_rollout_raises_with_the_reason(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target(
        "r", "t", plan=TargetPlan(stimuli=100, fail="rollout", fail_at=0.3, rollout_seconds=5)
    )
    with pytest.raises(JobFailedError) as caught:
        await client.targets.rollout.run("t", repo_name="r")
    error = caught.value
    assert error.job.is_failed
    assert error.job.lines == 30
    assert "simulated failure" in str(error)
    assert (error.repo_name, error.target_name, error.kind) == ("r", "t", "rollout")
    status = await client.targets.rollout.wait("t", repo_name="r", raise_on_failure=False)
    assert status.status is JobState.FAILED


def round_trip(value: Any) -> Any:
    copy = pickle.loads(pickle.dumps(value))  # noqa: S301 (our own objects)
    assert type(copy) is type(value)
    return copy


async def test_answers_results_and_job_errors_survive_pickling(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    """They cross process boundaries (multiprocessing, Ray), though their mappings are
    read-only ``mappingproxy`` objects, which cannot be pickled themselves."""
    bread_emulator.add_target("r", "ok", rows=3, rollout="complete")
    bread_emulator.add_target(
        "r", "bad", plan=TargetPlan(stimuli=10, fail="rollout", fail_at=0.3, rollout_seconds=1)
    )
    target = await client.targets.get("ok", repo_name="r")
    targets = await client.targets.list("r")
    page = await client.targets.rollout.get_output("ok", repo_name="r")
    for answer in (target, targets, page, page.job):
        assert round_trip(answer) == answer
    assert isinstance(round_trip(page.job).config, type(page.job.config))
    results = await client.rollout_many(["ok", "bad"], repo_name="r")
    copy = round_trip(results)
    assert [(r.target, r.outcome, r.status) for r in copy] == [
        (r.target, r.outcome, r.status) for r in results
    ]
    with pytest.raises(JobFailedError) as caught:
        await client.targets.rollout.wait("bad", repo_name="r")
    error = round_trip(caught.value)
    assert (str(error), error.job) == (str(caught.value), caught.value.job)


@frozen
async def test_poll_timeout(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t", rollout="running")
    with pytest.raises(PollTimeoutError) as caught:
        await client.targets.rollout.wait("t", repo_name="r", poll_timeout=0.1)
    assert caught.value.job.status is JobState.RUNNING
    assert "keeps running on the service" in str(caught.value)
    assert isinstance(caught.value, TimeoutError)


async def test_wait_on_a_job_never_started(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t")
    with pytest.raises(JobError, match="has not been started"):
        await client.targets.rollout.wait("t", repo_name="r")


@pytest.mark.parametrize(("duration", "most_polls"), [(1.2, 6), (60, 25)])
def test_polling_adapts_to_progress(duration: float, most_polls: int) -> None:
    # A job watched with a policy whose first interval is 0.3 s and maximum 30 s; the
    # progress estimate must bring the last poll to just after the end (without it, the 60 s
    # job would be seen complete ~11 s late). The job answers like the emulator's (``lines``
    # and ``progress_percent`` while running) through the transport seam, on virtual time:
    # the seconds are the loop's, whatever the machine's load.
    started: list[float] = []
    polls: list[float] = []

    def status(now: float) -> dict[str, Any]:
        ran = now - started[0]
        if ran >= duration:
            return {"status": "complete", "lines": 1000, "job_id": 1}
        progress = ran / duration
        return {
            "status": "running",
            "lines": math.floor(1000 * progress),
            "progress_percent": round(progress * 100, 1),
            "job_id": 1,
        }

    async def handler(request: TransportRequest) -> TransportResponse:
        await anyio.sleep(0.01)  # a request's round trip
        now = anyio.current_time()
        assert request.path == "/v1/repo/r/targets/t/rollout", request.path
        if request.method == "POST":
            started.append(now)
        else:
            polls.append(now)
        return TransportResponse(
            200, {"content-type": "application/json"}, orjson.dumps(status(now))
        )

    async def main() -> JobStatus:
        policy = PollPolicy(initial=0.3, maximum=30, minimum=0.05, jitter=0)
        async with BreadClient("sk-test", transport=MockTransport(handler), poll=policy) as client:
            return await client.targets.rollout.run("t", repo_name="r")

    result = run_virtual(main)
    assert result.is_complete
    assert len(started) == 1
    assert 1 <= len(polls) <= most_polls
    assert polls[-1] - started[0] >= duration  # the last poll saw it complete ...
    assert polls[-1] - started[0] < duration + 0.6  # ... soon after the end, in loop seconds


async def test_user_id_goes_on_every_request_of_a_call(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator
) -> None:
    bread_emulator.clock.speed = 50
    bread_emulator.add_target("r", "t", plan=TargetPlan(stimuli=10, rollout_seconds=3))
    client = make_client(user_id="team-user")
    await client.targets.rollout.run("t", repo_name="r", user_id="alice")
    await client.targets.rollout.get_output("t", repo_name="r")
    await client.targets.get("t", repo_name="r", user_id=None)
    records = bread_emulator.stats.records()
    assert len(records) >= 4
    run_and_polls = [r for r in records if r.route in ("run_rollout", "get_rollout")]
    assert {r.user_id for r in run_and_polls} == {"alice"}
    assert [r.user_id for r in records if r.route == "get_rollout_output"] == ["team-user"]
    assert [r.user_id for r in records if r.route == "get_target"] == [None]


@pytest.mark.parametrize("name", ["a/b", "..x", "what?", "hash#tag", "100%", "é 😀", "a b"])
async def test_awkward_names_travel_as_one_segment(
    client: BreadClient, bread_emulator: Emulator, name: str
) -> None:
    bread_emulator.add_target("repo/with/slashes", name, rows=3, rollout="complete")
    target = await client.targets.get(name, repo_name="repo/with/slashes")
    assert target.target_name == name
    page = await client.targets.rollout.get_output(name, repo_name="repo/with/slashes")
    assert len(page.output) == 3
    (record, _) = bread_emulator.stats.records()[-2:]
    assert (record.repo, record.target) == ("repo/with/slashes", name)


async def test_raw_request_escape_hatch(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "t")
    data = await client.request("GET", "/v1/repo/r/targets")
    assert data == {"targets": ["t"]}


@pytest.mark.bread_emulator(dialect="spec", speed=0)
async def test_spec_dialect_parses_too(client: BreadClient, bread_emulator: Emulator) -> None:
    bread_emulator.add_target(
        "r",
        "t",
        rows=12,
        overrides={"model_name": "m", "num_traj_per_stimulus": 3},
        rollout="complete",
    )
    status = await client.targets.rollout.get("t", repo_name="r")
    assert status.total_expected == 12
    assert status.config["num_traj_per_stimulus"] == 3
    page = await client.targets.rollout.get_output("t", repo_name="r", limit=4)
    assert page.total_expected == 12
    assert page.output[3] == {**page.output[3], "stimulus_id": 1, "trajectory_id": 0}


async def test_unknown_states_and_fields_are_kept(client: BreadClient) -> None:
    from breadasync._models import Origin, parse_job

    status = parse_job({"status": "queued", "lines": 3, "shard": 7}, Origin("GET", "/", 200))
    assert status.status == "queued"
    assert not status.is_terminal  # a state nobody named is waited through
    assert status.raw["shard"] == 7
    # A stop the docs do not list still ends the wait, as a failure.
    stopped = parse_job({"status": "Cancelled", "lines": 3}, Origin("GET", "/", 200))
    assert (stopped.status, stopped.is_terminal, stopped.is_failed) == ("cancelled", True, True)


@pytest.mark.parametrize("field", ["lines", "total_expected"])
def test_a_negative_count_in_a_status_is_refused(field: str) -> None:
    """A negative ``lines`` would plan an export of no rows: refused, naming the field."""
    from breadasync._models import Origin, parse_job

    with pytest.raises(ProtocolError, match=f"field '{field}' should not be negative") as raised:
        parse_job({"status": "complete", "lines": 3, field: -3}, Origin("GET", "/j", 200))
    assert str(raised.value).startswith("GET /j -> 200")


async def test_a_bad_poll_timeout_is_refused_before_the_job_starts(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    from breadasync import InvalidArgumentError

    bread_emulator.add_target("r", "t")
    with pytest.raises(InvalidArgumentError, match="poll_timeout"):
        await client.targets.rollout.run("t", repo_name="r", poll_timeout=0)
    assert bread_emulator.stats.count() == 0
    assert bread_emulator.stats.jobs_started() == 0


# --- the official SDK's call shapes ----------------------------------------------------------

# The public call shapes of aibread 1.4.0's AsyncBread for the resources breadasync implements
# (read from inspect.signature of aibread.resources.targets.*): the parameters it takes
# positionally, then those it takes by keyword, its per-call transport options included.
SDK_EXTRAS = ["x_user_id", "extra_headers", "extra_query", "extra_body"]
SDK_SHAPES: dict[str, tuple[list[str], list[str]]] = {
    "targets.create": (
        ["repo_name"],
        ["target_name", "template", "overrides", "user_id", "timeout", "idempotency_key"],
    ),
    "targets.get": (["target_name"], ["repo_name", "user_id", "timeout"]),
    "targets.list": (["repo_name"], ["user_id", "timeout"]),
    "targets.stim.run": (
        ["target_name"],
        ["repo_name", "poll", "user_id", "timeout", "idempotency_key"],
    ),
    "targets.stim.get": (["target_name"], ["repo_name", "user_id", "timeout"]),
    "targets.stim.get_output": (
        ["target_name"],
        ["repo_name", "limit", "offset", "user_id", "timeout"],
    ),
    "targets.rollout.run": (
        ["target_name"],
        ["repo_name", "poll", "user_id", "timeout", "idempotency_key"],
    ),
    "targets.rollout.get": (["target_name"], ["repo_name", "user_id", "timeout"]),
    "targets.rollout.get_output": (
        ["target_name"],
        ["repo_name", "limit", "offset", "user_id", "timeout"],
    ),
}


def _method(client: BreadClient, dotted: str) -> Any:
    value: Any = client
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("dotted", sorted(SDK_SHAPES))
def test_every_sdk_call_shape_binds(client: BreadClient, dotted: str) -> None:
    positional, keywords = SDK_SHAPES[dotted]
    keywords = keywords + SDK_EXTRAS
    signature = inspect.signature(_method(client, dotted))
    params = list(signature.parameters.values())
    for i, name in enumerate(positional):
        assert params[i].name == name
        assert params[i].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    values = {name: f"v{i}" for i, name in enumerate(positional + keywords)}
    # As the SDK's users write it: positionally where it may, by keyword for the rest...
    signature.bind(*(values[n] for n in positional), **{k: values[k] for k in keywords})
    # ...and everything by keyword, which the SDK accepts too.
    signature.bind(**values)


async def test_sdk_call_shapes_work_against_the_service(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    created = await client.targets.create(
        "sdk_repo", target_name="t", template="default", overrides={"model_name": "m"}
    )
    assert created.target_name == "t"
    listed = await client.targets.list("sdk_repo")
    assert list(listed) == ["t"]  # list results iterate, as the SDK's do
    assert "t" in listed
    assert len(listed) == 1
    assert (await client.targets.get("t", repo_name="sdk_repo")).config["model_name"] == "m"
    stim = await client.targets.stim.run("t", repo_name="sdk_repo", poll=True)
    assert stim.is_complete
    page = await client.targets.stim.get_output("t", repo_name="sdk_repo", limit=5, offset=0)
    assert page.output
    status = await client.targets.rollout.run("t", repo_name="sdk_repo", poll=False)
    assert status.status is not JobState.NOT_STARTED
    assert (await client.targets.rollout.get("t", repo_name="sdk_repo")).status is not None


async def test_the_sdks_per_call_and_client_options_reach_the_service() -> None:
    """``x_user_id``, ``extra_headers``, ``extra_query``, ``extra_body`` on a call, and
    ``default_headers``, ``default_query`` on the client, as the SDK sends them; a timeout
    of ``None`` (no bound) or an ``httpx.Timeout``-like object bounds the attempt so."""
    seen: list[TransportRequest] = []

    async def handler(request: TransportRequest) -> TransportResponse:
        seen.append(request)
        body: dict[str, Any] = {"status": "running", "lines": 0}
        if request.method == "POST" and request.path.startswith("/v1/repo/r/targets?"):
            body = {"target_name": "t", "config": {}}
        return TransportResponse(200, {"content-type": "application/json"}, orjson.dumps(body))

    class HttpxLikeTimeout:  # the attributes of httpx.Timeout(30, connect=2)
        connect, read, write, pool = 2.0, 30.0, 30.0, 30.0

    async def main() -> None:
        async with BreadClient(
            "sk-test",
            transport=MockTransport(handler),
            default_headers={"X-Team": "ml", "user-agent": "mine/1"},
            default_query={"region": "eu"},
        ) as client:
            await client.targets.rollout.get(
                "t",
                repo_name="r",
                x_user_id="alice",
                extra_headers={"X-Trace": "42"},
                extra_query={"verbose": "1"},
                timeout=None,
            )
            await client.targets.create(
                "r",
                target_name="t",
                extra_body={"description": "d", "template": "other"},
                timeout=HttpxLikeTimeout(),
            )
            await client.targets.rollout.run("t", repo_name="r", poll=False)
            await client.request("GET", "/v1/repo/r/targets/t/rollout?page=2")
            await client.targets.create(
                "r", target_name="t", extra_headers={"content-type": "application/x.bread+json"}
            )

    await main()
    get, create, run, raw, typed = seen
    assert raw.path == "/v1/repo/r/targets/t/rollout?page=2&region=eu"
    assert [v for k, v in typed.headers.items() if k.lower() == "content-type"] == [
        "application/x.bread+json"
    ]
    assert get.headers["X-User-Id"] == "alice"
    assert (get.headers["X-Trace"], get.headers["X-Team"]) == ("42", "ml")
    assert get.path == "/v1/repo/r/targets/t/rollout?region=eu&verbose=1"
    assert (get.timeout, get.connect_timeout, get.read_timeout) == (None, None, None)
    assert orjson.loads(create.content or b"") == {
        "target_name": "t",
        "template": "other",  # the extras win, as in the SDK
        "description": "d",
    }
    assert (create.connect_timeout, create.read_timeout) == (2.0, 30.0)
    assert create.timeout is not None  # no bound on one attempt, but the call's total of 600 s
    assert 590 < create.timeout <= 600
    assert "X-Trace" not in run.headers  # a call's extras are its own
    assert run.path == "/v1/repo/r/targets/t/rollout?region=eu"
    for request in seen:
        assert request.headers["Authorization"] == "Bearer sk-test"
        assert request.headers["user-agent"] == "mine/1"
        assert "User-Agent" not in request.headers


@pytest.mark.parametrize(
    ("call", "text"),
    [
        ({"extra_headers": {"authorization": "Bearer other"}}, "may not set 'authorization'"),
        ({"extra_headers": {"Idempotency-Key": "k"}}, "may not set 'Idempotency-Key'"),
        ({"extra_query": ["a"]}, "extra_query must be a mapping"),
        ({"user_id": "a", "x_user_id": "b"}, "name two users"),
    ],
)
async def test_the_sdks_options_are_checked_before_sending(
    client: BreadClient, bread_emulator: Emulator, call: dict[str, Any], text: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=text):
        await client.targets.rollout.get("t", repo_name="r", **call)
    assert bread_emulator.stats.count() == 0
    with pytest.raises(NotFoundError) as missing:  # the SDK's name of the status too
        await client.targets.rollout.get("t", repo_name="r")
    assert missing.value.status_code == missing.value.status == 404
    with pytest.raises(ConfigError, match="default_headers may not set 'Authorization'"):
        BreadClient("k", default_headers={"Authorization": "x"})
    with pytest.raises(ConfigError, match=r"an httpx\.Timeout, not str"):
        BreadClient("k", timeout="30")  # type: ignore[arg-type]


async def test_an_output_page_carries_its_job_status(
    client: BreadClient, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("r", "t", rows=7, rollout="complete")
    page = await client.targets.rollout.get_output("t", repo_name="r", limit=5)
    assert isinstance(page.job, JobStatus)
    assert page.job.is_complete
    assert (page.status, page.lines) == (JobState.COMPLETE, 7)
    assert (page.config, page.error, page.job_id) == (page.job.config, None, page.job.job_id)
    assert (page.offset, page.limit, len(page.output), page.has_more) == (0, 5, 5, True)


LONE = "t\udc80"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.targets.get(LONE, repo_name="r"),
        lambda c: c.targets.get("t", repo_name=LONE),
        lambda c: c.targets.create(LONE, target_name="t"),
        lambda c: c.targets.rollout.run(LONE, repo_name="r"),
        lambda c: c.targets.rollout.wait("t", repo_name=LONE),
        lambda c: c.rollout_many([LONE], repo_name="r"),
        lambda c: c.wait_many([("r", LONE)]),
        lambda c: c.export_rollout(LONE, repo_name="r", dest="unused"),
    ],
)
async def test_a_lone_surrogate_in_a_name_is_an_invalid_argument(
    client: BreadClient, bread_emulator: Emulator, call: Callable[[BreadClient], Any]
) -> None:
    with pytest.raises(InvalidArgumentError, match="not valid Unicode"):
        await call(client)
    assert bread_emulator.stats.count() == 0  # nothing was sent


async def test_limits_are_accepted_as_one_setting(bread_emulator: Emulator) -> None:
    limits = Limits(max_concurrency=3, max_requests_per_second=500, max_body_bytes=4096)
    async with BreadClient(bread_emulator.api_key, bread_emulator.url, limits=limits) as client:
        assert client.max_concurrency == 3
        assert client.stats.max_concurrency == 3
        assert "max_concurrency=3" in repr(client)
    with pytest.raises(ConfigError, match="limits must be a Limits"):
        BreadClient(bread_emulator.api_key, bread_emulator.url, limits=3)  # type: ignore[arg-type]
