"""The emulator's endpoints, bodies, status codes and job simulation, over real HTTP."""

from __future__ import annotations

import asyncio
import io

import pytest

from breadasync.emulator import Emulator, TargetPlan
from tests.conftest import RawApi

T = "/v1/repo/my_repo/targets"
frozen = pytest.mark.bread_emulator(speed=0)


def create_body(name: str, **overrides: object) -> dict[str, object]:
    return {"target_name": name, "template": "default", "overrides": overrides}


# --- targets -------------------------------------------------------------------------------


async def test_create_get_and_list_targets(api: RawApi) -> None:
    created = await api.post(
        T,
        json=create_body(
            "coding_target", model_name="Qwen/Qwen3-32B", num_traj_per_stimulus=5, temperature=1.0
        ),
    )
    assert created.status == 201
    assert created.json() == {
        "target_name": "coding_target",
        "config": {
            "num_traj_per_stimulus": 5,
            "temperature": 1.0,
            "max_tokens": 1024,
            "max_concurrency": 50,
            "model_name": "Qwen/Qwen3-32B",
        },
    }
    got = await api.get(T + "/coding_target")
    assert got.status == 200
    assert got.json() == created.json()
    await api.post(T, json=create_body("another"))
    listed = await api.get(T)
    assert listed.json() == {"targets": ["another", "coding_target"]}


async def test_create_is_idempotent_and_targets_are_immutable(api: RawApi) -> None:
    body = create_body("t", model_name="m")
    assert (await api.post(T, json=body)).status == 201
    again = await api.post(T, json=body)
    assert again.status == 200
    changed = await api.post(T, json=create_body("t", model_name="other"))
    assert changed.status == 409
    assert "immutable" in changed.json()["error"]


async def test_idempotency_key_replays_the_first_answer(api: RawApi) -> None:
    headers = {"Idempotency-Key": "key-1"}
    first = await api.post(T, json=create_body("t", model_name="m"), headers=headers)
    second = await api.post(T, json=create_body("t", model_name="m"), headers=headers)
    assert first.status == second.status == 201
    assert first.body == second.body


async def test_template_copies_an_existing_target(api: RawApi) -> None:
    await api.post(T, json=create_body("base", model_name="m", temperature=0.5))
    derived = await api.post(
        T, json={"target_name": "derived", "template": "base", "overrides": {"max_tokens": 9}}
    )
    assert derived.status == 201
    assert derived.json()["config"]["temperature"] == 0.5
    assert derived.json()["config"]["max_tokens"] == 9
    missing = await api.post(T, json={"target_name": "x", "template": "nope"})
    assert missing.status == 400
    assert "Template 'nope' not found" in missing.json()["error"]


async def test_unknown_override_keys_pass_through_in_the_docs_dialect(api: RawApi) -> None:
    created = await api.post(T, json=create_body("t", model_name="m", my_flag=True))
    assert created.status == 201
    assert created.json()["config"]["my_flag"] is True


async def test_deprecated_u_v_become_teacher_and_student_prompts(api: RawApi) -> None:
    created = await api.post(T, json=create_body("t", u="sys_v1", v="user_v1"))
    assert created.json()["config"]["teacher_prompt"] == "sys_v1"
    assert created.json()["config"]["student_prompt"] == "user_v1"


async def test_unknown_target_and_repo_answer_404(api: RawApi) -> None:
    for path in (
        T + "/ghost",
        T + "/ghost/stim",
        T + "/ghost/rollout",
        T + "/ghost/rollout/output",
        T + "/ghost/stim/output",
    ):
        reply = await api.get(path)
        assert reply.status == 404, path
        assert reply.json() == {"error": "Target not found"}
    for path in (T + "/ghost/stim", T + "/ghost/rollout"):
        assert (await api.post(path)).status == 404
    assert (await api.get("/v1/repo/nowhere/targets")).json() == {"error": "Repository not found"}


# --- jobs ----------------------------------------------------------------------------------


@frozen
async def test_stim_then_rollout_lifecycle(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target(
        "my_repo",
        "t",
        overrides={"model_name": "m", "num_traj_per_stimulus": 4},
        plan=TargetPlan(stimuli=25, stim_seconds=5, rollout_seconds=10, progress="full"),
        stim="not_started",
    )
    assert (await api.get(T + "/t/stim")).json() == {
        "status": "not_started",
        "lines": 0,
        "parameters": {},
    }
    blocked = await api.post(T + "/t/rollout")
    assert blocked.status == 400
    assert blocked.json() == {"error": "Stim job must complete before running rollout"}

    started = (await api.post(T + "/t/stim")).json()
    assert started["status"] == "running"
    assert started["lines"] == 0
    bread_emulator.clock.advance(5)
    stim = (await api.get(T + "/t/stim")).json()
    assert (stim["status"], stim["lines"]) == ("complete", 25)

    rollout = (await api.post(T + "/t/rollout")).json()
    assert rollout["status"] == "running"
    assert rollout["lines"] == 0
    assert rollout["parameters"]["model_name"] == "m"
    bread_emulator.clock.advance(5)
    half = (await api.get(T + "/t/rollout")).json()
    assert half["status"] == "running"
    assert half["lines"] == 50
    assert half["progress_percent"] == 50.0
    page = (await api.get(T + "/t/rollout/output", params={"limit": "1000"})).json()
    assert len(page["output"]) == 50
    assert page["has_more"] is False  # nothing more *yet*: lines is still growing
    bread_emulator.clock.advance(5)
    done = (await api.get(T + "/t/rollout")).json()
    assert (done["status"], done["lines"]) == ("complete", 100)
    assert "progress_percent" not in done


@frozen
async def test_rollout_post_is_idempotent(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("my_repo", "t", rows=10)
    first = (await api.post(T + "/t/rollout")).json()
    bread_emulator.clock.advance(3)
    second = (await api.post(T + "/t/rollout")).json()
    assert first["job_id"] == second["job_id"]
    assert second["lines"] == 3  # the current state, not a new job
    assert bread_emulator.stats.jobs_started("rollout") == 1
    assert bread_emulator.stats.count("run_rollout", status=200) == 2


@frozen
async def test_stim_post_is_idempotent(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("my_repo", "t", stim="not_started")
    await api.post(T + "/t/stim")
    await api.post(T + "/t/stim")
    assert bread_emulator.stats.jobs_started("stim", target="t") == 1


async def test_rollout_needs_model_name(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("my_repo", "t", overrides={"model_name": None})
    reply = await api.post(T + "/t/rollout")
    assert reply.status == 400
    assert reply.json() == {"error": "model_name must be configured in target"}
    assert bread_emulator.stats.jobs_started() == 0


@frozen
async def test_queued_job_is_pending_first(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("my_repo", "t", plan=TargetPlan(queue_seconds=2, stimuli=10))
    assert (await api.post(T + "/t/rollout")).json()["status"] == "pending"
    bread_emulator.clock.advance(2.5)
    assert (await api.get(T + "/t/rollout")).json()["status"] == "running"


@frozen
async def test_failed_rollout_reports_error_and_keeps_its_lines(
    api: RawApi, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target(
        "my_repo",
        "t",
        plan=TargetPlan(fail="rollout", fail_at=0.4, stimuli=100, rollout_seconds=10),
    )
    await api.post(T + "/t/rollout")
    bread_emulator.clock.advance(4)
    failed = (await api.get(T + "/t/rollout")).json()
    assert failed["status"] == "failed"
    assert failed["lines"] == 40
    assert "simulated failure" in failed["error"]
    # A repeat POST reports the failed job; it does not start another.
    assert (await api.post(T + "/t/rollout")).json()["status"] == "failed"
    assert bread_emulator.stats.jobs_started("rollout") == 1
    page = (await api.get(T + "/t/rollout/output", params={"limit": "1000"})).json()
    assert len(page["output"]) == 40


async def test_out_of_credit_answers_402(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("my_repo", "t", stim="not_started")
    bread_emulator.set_out_of_credit()
    reply = await api.post(T + "/t/stim")
    assert reply.status == 402
    assert "Insufficient credits" in reply.json()["error"]
    bread_emulator.add_target("my_repo", "u", plan=TargetPlan(out_of_credit=True))
    bread_emulator.set_out_of_credit(False)
    assert (await api.post(T + "/u/rollout")).status == 402


async def test_stim_output_pages(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("my_repo", "t", plan=TargetPlan(stimuli=30))
    page = (await api.get(T + "/t/stim/output", params={"limit": "20", "offset": "20"})).json()
    assert page["lines"] == 30
    assert [row["stimulus_id"] for row in page["output"]] == list(range(20, 30))
    assert page["has_more"] is False


async def test_stimuli_count_follows_the_generators(api: RawApi, bread_emulator: Emulator) -> None:
    generators = [
        {"type": "oneshot_qs", "numq": 7},
        {"type": "hardcoded", "questions": ["a", "b", "c"]},
    ]
    await api.post(
        T, json=create_body("t", model_name="m", generators=generators, num_traj_per_stimulus=2)
    )
    bread_emulator.clock.speed = 0
    await api.post(T + "/t/stim")
    bread_emulator.clock.advance(10)
    assert (await api.get(T + "/t/stim")).json()["lines"] == 10
    await api.post(T + "/t/rollout")
    bread_emulator.clock.advance(100)
    assert (await api.get(T + "/t/rollout")).json()["lines"] == 20


# --- output pages --------------------------------------------------------------------------


async def test_output_pages_match_the_deterministic_rows(
    api: RawApi, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("my_repo", "t", rows=2500, rollout="complete")
    rows = []
    offset = 0
    while True:
        page = (
            await api.get(T + "/t/rollout/output", params={"limit": "1000", "offset": str(offset)})
        ).json()
        assert page["offset"] == offset
        assert page["limit"] == 1000
        assert page["lines"] == 2500
        rows.extend(page["output"])
        offset += len(page["output"])
        if not page["has_more"]:
            break
    assert rows == bread_emulator.trajectories("my_repo", "t")
    assert len(rows) == 2500


async def test_default_limit_is_100_and_offset_past_the_end_is_empty(
    api: RawApi, bread_emulator: Emulator
) -> None:
    bread_emulator.add_target("my_repo", "t", rows=150, rollout="complete")
    page = (await api.get(T + "/t/rollout/output")).json()
    assert (page["limit"], page["offset"], len(page["output"])) == (100, 0, 100)
    beyond = (await api.get(T + "/t/rollout/output", params={"offset": "500"})).json()
    assert beyond["output"] == []
    assert beyond["has_more"] is False


async def test_output_of_a_job_not_started_is_empty(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("my_repo", "t")
    page = (await api.get(T + "/t/rollout/output")).json()
    assert (page["status"], page["lines"], page["output"]) == ("not_started", 0, [])


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "loc", "kind"),
    [
        ({"limit": "0"}, ["query", "limit"], "greater_than_equal"),
        ({"limit": "1001"}, ["query", "limit"], "less_than_equal"),
        ({"limit": "ten"}, ["query", "limit"], "int_parsing"),
        ({"offset": "-1"}, ["query", "offset"], "greater_than_equal"),
        ({"offset": "1.5"}, ["query", "offset"], "int_parsing"),
    ],
)
async def test_invalid_limit_or_offset_answers_422(
    api: RawApi, bread_emulator: Emulator, params: dict[str, str], loc: list[str], kind: str
) -> None:
    bread_emulator.add_target("my_repo", "t", rows=10, rollout="complete")
    reply = await api.get(T + "/t/rollout/output", params=params)
    assert reply.status == 422
    (detail,) = reply.json()["detail"]
    assert detail["loc"] == loc
    assert detail["type"] == kind
    assert detail["msg"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b"{not json", ["body", 1]),
        (b"[1, 2]", ["body"]),
        (b'{"template": "default"}', ["body", "target_name"]),
        (b'{"target_name": 7, "template": "default"}', ["body", "target_name"]),
        (
            b'{"target_name": "t", "template": "default", "overrides": {"temperature": "hot"}}',
            ["body", "overrides", "temperature"],
        ),
        (
            b'{"target_name": "t", "template": "default", "overrides": {"temperature": 2.5}}',
            ["body", "overrides", "temperature"],
        ),
        (
            b'{"target_name": "t", "template": "default", '
            b'"overrides": {"num_traj_per_stimulus": 0}}',
            ["body", "overrides", "num_traj_per_stimulus"],
        ),
        (
            b'{"target_name": "t", "template": "default", "overrides": {"max_tokens": true}}',
            ["body", "overrides", "max_tokens"],
        ),
        (
            b'{"target_name": "t", "template": "default", "overrides": {"model_name": 3}}',
            ["body", "overrides", "model_name"],
        ),
        (
            b'{"target_name": "t", "template": "default", "overrides": {"generators": [{}]}}',
            ["body", "overrides", "generators", 0, "type"],
        ),
        (b'{"target_name": "t", "template": "default", "overrides": []}', ["body", "overrides"]),
    ],
)
async def test_bad_create_bodies_answer_422(api: RawApi, body: bytes, loc: list[object]) -> None:
    reply = await api.post(T, data=body, headers={"Content-Type": "application/json"})
    assert reply.status == 422
    assert reply.json()["detail"][0]["loc"] == loc


@pytest.mark.parametrize("name", ["", ".", "..", "tab\there", "nul\x00", "x" * 300])
async def test_invalid_target_names_answer_400(api: RawApi, name: str) -> None:
    reply = await api.post(T, json=create_body(name))
    assert reply.status == 400
    assert "Invalid target name" in reply.json()["error"]


async def test_names_with_reserved_characters_travel_as_one_segment(
    api: RawApi, bread_emulator: Emulator
) -> None:
    name = "a/b?c#d%e é😀 .."
    assert (await api.post(T, json=create_body(name))).status == 201
    encoded = "a%2Fb%3Fc%23d%25e%20%C3%A9%F0%9F%98%80%20.."
    reply = await api.get(T + "/" + encoded)
    assert reply.json()["target_name"] == name
    assert bread_emulator.targets("my_repo") == [name]


async def test_missing_and_wrong_keys_answer_401(api: RawApi) -> None:
    missing = await api.get(T, auth=False)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = await api.get(T, auth=False, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    assert wrong.json() == {"error": "Invalid API key"}
    scheme = await api.get(T, auth=False, headers={"Authorization": "Basic abc"})
    assert scheme.status == 401


@pytest.mark.bread_emulator(master_key=False)
async def test_user_override_needs_a_master_key(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target("my_repo", "t")
    assert (await api.get(T + "/t", headers={"X-User-Id": "u1"})).status == 403
    assert (await api.get(T + "/t", params={"user_id": "u1"})).status == 403
    assert (await api.get(T + "/t")).status == 200


async def test_unknown_paths_and_methods_get_json_errors(api: RawApi) -> None:
    missing = await api.get("/v2/nothing")
    assert missing.status == 404
    assert missing.json() == {"error": "Not Found"}
    wrong = await api.call("DELETE", T)
    assert wrong.status == 405
    assert "error" in wrong.json()


async def test_oversized_create_body_is_refused(api: RawApi) -> None:
    reply = await api.post(T, data=io.BytesIO(b"x" * (2 * 1024 * 1024)))
    assert reply.status == 413
    assert "error" in reply.json()


# --- the spec dialect ----------------------------------------------------------------------


@pytest.mark.bread_emulator(dialect="spec", speed=0)
async def test_spec_dialect_shapes(api: RawApi, bread_emulator: Emulator) -> None:
    bread_emulator.add_target(
        "my_repo",
        "t",
        overrides={"model_name": "m", "num_traj_per_stimulus": 3},
        plan=TargetPlan(stimuli=4, progress="full"),
    )
    status = (await api.post(T + "/t/rollout")).json()
    assert set(status) >= {"status", "lines", "config", "total_expected", "job_id"}
    assert status["total_expected"] == 12
    bread_emulator.clock.advance(60)
    page = (await api.get(T + "/t/rollout/output", params={"limit": "5"})).json()
    assert "parameters" not in page
    assert [(r["stimulus_id"], r["trajectory_id"]) for r in page["output"]] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
    ]
    missing = await api.get(T + "/ghost")
    assert missing.json() == {"message": "Target not found", "code": "RESOURCE_NOT_FOUND"}
    strict = await api.post(T, json=create_body("x", my_flag=True))
    assert strict.status == 422
    assert strict.json()["detail"][0]["type"] == "extra_forbidden"


# --- observation ---------------------------------------------------------------------------


async def test_stats_count_routes_statuses_targets_and_peak_in_flight(
    api: RawApi, bread_emulator: Emulator
) -> None:
    from breadasync.emulator import Faults

    bread_emulator.add_target("my_repo", "a", rows=10, rollout="complete")
    bread_emulator.add_target("my_repo", "b", rows=10, rollout="complete")
    bread_emulator.set_faults(Faults(latency=0.2), repo="my_repo", target="a")
    await asyncio.gather(*(api.get(T + "/a/rollout") for _ in range(5)))
    await api.get(T + "/b/rollout/output", headers={"X-User-Id": "alice", "Idempotency-Key": "k"})
    await api.get(T + "/ghost")
    stats = bread_emulator.stats
    assert stats.count("get_rollout", status=200) == 5
    assert stats.count(target="a") == 5
    assert stats.count(target="b", route="get_rollout_output") == 1
    assert stats.count(status=404) == 1
    assert stats.max_in_flight == 5
    last_b = [r for r in stats.records() if r.target == "b"][-1]
    assert (last_b.user_id, last_b.idempotency_key, last_b.rows) == ("alice", "k", 10)
    snapshot = stats.snapshot()
    assert snapshot["by_route"]["get_rollout"] == {"200": 5}
    stats.reset()
    assert stats.count() == 0


async def test_control_api(api: RawApi, bread_emulator: Emulator) -> None:
    added = await api.post(
        "/_emulator/targets",
        auth=False,
        json={"repo": "my_repo", "target": "t", "rows": 5, "rollout": "complete"},
    )
    assert added.status == 200
    assert bread_emulator.job("my_repo", "t").lines == 5
    faults = await api.call(
        "PUT", "/_emulator/faults", auth=False, json={"faults": {"errors": {"503": 1.0}}}
    )
    assert faults.status == 200
    assert (await api.get(T + "/t/rollout")).status == 503
    await api.call("PUT", "/_emulator/faults", auth=False, json={"faults": None})
    assert (await api.get(T + "/t/rollout")).status == 200
    stats = (await api.get("/_emulator/stats", auth=False)).json()
    assert stats["by_route"]["get_rollout"] == {"200": 1, "503": 1}
    log = (await api.get("/_emulator/requests", auth=False)).json()
    assert [r["status"] for r in log] == [503, 200]
    clock = (await api.post("/_emulator/clock", auth=False, json={"speed": 0, "advance": 5})).json()
    assert clock["speed"] == 0
    bad = await api.call("PUT", "/_emulator/faults", auth=False, json={"faults": {"nope": 1}})
    assert bad.status == 400
    assert "unknown fault switch" in bad.json()["error"]
    assert (await api.post("/_emulator/stats/reset", auth=False)).status == 200
    assert bread_emulator.stats.count() == 0
