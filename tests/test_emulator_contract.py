"""Contract: every answer, in both dialects, validates against our own pinned schema of the
response shapes we use (``tests/data/bread-response-shapes.schema.json``, written from the
project's API notes); in the spec dialect, also against the published OpenAPI spec when it is
there.

The published spec is reference data kept beside this repository (``../shared/reference/``),
not in it (the notes ask us not to copy it); set ``BREAD_OPENAPI_SPEC`` to its path to check it
elsewhere. Our schema is always checked, so this test never skips on a fresh clone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from breadasync.emulator import Emulator, Faults, TargetPlan
from tests.conftest import RawApi, Reply

SPEC = Path(
    os.environ.get(
        "BREAD_OPENAPI_SPEC",
        Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "bread-openapi.yaml",
    )
)
SHAPES = Path(__file__).resolve().parent / "data" / "bread-response-shapes.schema.json"
SHAPE_OF = {
    "list_targets": "TargetList",
    "create_target": "Target",
    "get_target": "Target",
    "run_stim": "Job",
    "get_stim": "Job",
    "run_rollout": "Job",
    "get_rollout": "Job",
    "get_stim_output": "OutputPage",
    "get_rollout_output": "OutputPage",
}

ROUTES = {
    "list_targets": ("/v1/repo/{repo_name}/targets", "get"),
    "create_target": ("/v1/repo/{repo_name}/targets", "post"),
    "get_target": ("/v1/repo/{repo_name}/targets/{target_name}", "get"),
    "run_stim": ("/v1/repo/{repo_name}/targets/{target_name}/stim", "post"),
    "get_stim": ("/v1/repo/{repo_name}/targets/{target_name}/stim", "get"),
    "get_stim_output": ("/v1/repo/{repo_name}/targets/{target_name}/stim/output", "get"),
    "run_rollout": ("/v1/repo/{repo_name}/targets/{target_name}/rollout", "post"),
    "get_rollout": ("/v1/repo/{repo_name}/targets/{target_name}/rollout", "get"),
    "get_rollout_output": ("/v1/repo/{repo_name}/targets/{target_name}/rollout/output", "get"),
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any] | None:
    """The published spec, or ``None`` where it is not beside the repository."""
    if not SPEC.is_file():
        return None
    import yaml

    loaded: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    return loaded


class Shapes:
    """Our pinned schema of the answers we use."""

    def __init__(self) -> None:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource

        schema = orjson.loads(SHAPES.read_bytes())
        Draft202012Validator.check_schema(schema)
        self.registry = Registry().with_resource(schema["$id"], Resource.from_contents(schema))
        self.base = schema["$id"]
        self.validator_class = Draft202012Validator
        self.checked: set[tuple[str, int]] = set()

    def check(self, route: str, reply: Reply) -> None:
        name = SHAPE_OF[route] if reply.status < 300 else "Error"
        validator = self.validator_class(
            {"$ref": f"{self.base}#/$defs/{name}"}, registry=self.registry
        )
        errors = sorted(validator.iter_errors(reply.json()), key=str)
        assert not errors, f"{route} {reply.status} ({name}): {errors[0].message}"
        self.checked.add((route, reply.status))


class Contract:
    def __init__(self, spec: dict[str, Any]) -> None:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.spec = spec
        self.registry = Registry().with_resource(
            "urn:bread-spec", Resource.from_contents(spec, default_specification=DRAFT202012)
        )
        self.validator_class = Draft202012Validator
        self.checked: set[tuple[str, int]] = set()

    def schema_ref(self, route: str, status: int) -> str:
        path, method = ROUTES[route]
        responses = self.spec["paths"][path][method]["responses"]
        documented = responses.get(str(status))
        if documented is None and 200 <= status < 300:
            # The spec lists 201 for create, yet its description promises a 200 carrying the
            # existing target on a repeat: the same schema.
            documented = next(v for k, v in responses.items() if k.startswith("2"))
        if documented is None:
            # Statuses the spec does not list (401, 403, 429, 503) still use its error body.
            return "urn:bread-spec#/components/schemas/ErrorResponse"
        ref: str = documented["content"]["application/json"]["schema"]["$ref"]
        return "urn:bread-spec" + ref

    def check(self, route: str, reply: Reply) -> None:
        schema = {"$ref": self.schema_ref(route, reply.status)}
        validator = self.validator_class(schema, registry=self.registry)
        errors = sorted(validator.iter_errors(reply.json()), key=str)
        assert not errors, f"{route} {reply.status}: {errors[0].message}"
        self.checked.add((route, reply.status))


@pytest.mark.bread_emulator(dialect="spec", speed=0)
async def test_every_spec_answer_validates(
    api: RawApi, bread_emulator: Emulator, spec: dict[str, Any] | None
) -> None:
    shapes = Shapes()
    contract = Contract(spec) if spec is not None else None

    def check(route: str, reply: Reply) -> None:
        shapes.check(route, reply)
        if contract is not None:
            contract.check(route, reply)

    await exercise(api, bread_emulator, check)
    assert {route for route, _ in shapes.checked} == set(ROUTES)
    if contract is not None:
        assert contract.checked == shapes.checked


@pytest.mark.bread_emulator(speed=0)
async def test_every_docs_answer_validates_against_our_shapes(
    api: RawApi, bread_emulator: Emulator
) -> None:
    shapes = Shapes()
    await exercise(api, bread_emulator, shapes.check)
    assert {route for route, _ in shapes.checked} == set(ROUTES)


async def exercise(
    api: RawApi, bread_emulator: Emulator, contract_check: Callable[[str, Reply], None]
) -> None:
    """Every route, in its good and bad answers, each checked by ``contract_check``."""
    base = "/v1/repo/my_repo/targets"
    body = {
        "target_name": "t",
        "template": "default",
        "overrides": {
            "model_name": "Qwen/Qwen3-32B",
            "num_traj_per_stimulus": 2,
            "generators": [{"type": "oneshot_qs", "numq": 3}],
        },
    }

    async def check(route: str, reply: Reply, status: int) -> None:
        assert reply.status == status, reply.body
        contract_check(route, reply)

    await check("create_target", await api.post(base, json=body), 201)
    await check("create_target", await api.post(base, json=body), 200)
    changed = {**body, "overrides": {"model_name": "other"}}
    await check("create_target", await api.post(base, json=changed), 409)
    await check("create_target", await api.post(base, json={"template": "default"}), 422)
    await check("create_target", await api.post(base, json={**body, "target_name": ".."}), 400)
    await check("list_targets", await api.get(base), 200)
    await check("list_targets", await api.get("/v1/repo/ghost/targets"), 404)
    await check("get_target", await api.get(base + "/t"), 200)
    await check("get_target", await api.get(base + "/ghost"), 404)
    await check("get_target", await api.get(base + "/t", auth=False), 401)

    await check("get_stim", await api.get(base + "/t/stim"), 200)
    await check("run_rollout", await api.post(base + "/t/rollout"), 400)
    await check("run_stim", await api.post(base + "/t/stim"), 200)
    bread_emulator.clock.advance(1)
    await check("get_stim", await api.get(base + "/t/stim"), 200)
    bread_emulator.clock.advance(10)
    await check("get_stim_output", await api.get(base + "/t/stim/output"), 200)
    await check(
        "get_stim_output", await api.get(base + "/t/stim/output", params={"limit": "0"}), 422
    )
    await check("get_rollout", await api.get(base + "/t/rollout"), 200)
    await check("get_rollout_output", await api.get(base + "/t/rollout/output"), 200)
    await check("run_rollout", await api.post(base + "/t/rollout"), 200)
    bread_emulator.clock.advance(5)
    await check("get_rollout", await api.get(base + "/t/rollout"), 200)
    await check(
        "get_rollout_output", await api.get(base + "/t/rollout/output", params={"limit": "2"}), 200
    )
    bread_emulator.clock.advance(10)
    await check(
        "get_rollout_output",
        await api.get(base + "/t/rollout/output", params={"limit": "1000"}),
        200,
    )
    await check(
        "get_rollout_output",
        await api.get(base + "/t/rollout/output", params={"offset": "-1"}),
        422,
    )

    bread_emulator.add_target("my_repo", "nomodel", overrides={"model_name": None})
    await check("run_rollout", await api.post(base + "/nomodel/rollout"), 400)
    bread_emulator.add_target("my_repo", "broke", plan=TargetPlan(out_of_credit=True))
    await check("run_rollout", await api.post(base + "/broke/rollout"), 402)
    bread_emulator.add_target("my_repo", "failing", rollout="failed", rows=10)
    await check("get_rollout", await api.get(base + "/failing/rollout"), 200)
    await check("get_rollout_output", await api.get(base + "/failing/rollout/output"), 200)

    bread_emulator.set_faults(Faults(errors={503: 1.0}))
    await check("get_rollout", await api.get(base + "/t/rollout"), 503)
    bread_emulator.set_faults(Faults(errors={500: 1.0}))
    await check("get_rollout", await api.get(base + "/t/rollout"), 500)
    bread_emulator.set_faults(Faults(rate_limit=0.001, rate_burst=1))
    await api.get(base + "/t/rollout")
    await check("get_rollout", await api.get(base + "/t/rollout"), 429)
    bread_emulator.set_faults(None)


@pytest.mark.parametrize(
    ("route", "status", "body"),
    [
        ("get_rollout", 200, {"status": "done", "lines": 3, "parameters": {}}),
        ("get_rollout", 200, {"status": "complete", "parameters": {}}),
        ("get_rollout_output", 200, {"status": "complete", "lines": 1, "config": {}}),
        ("get_target", 404, {"detail": "Not Found"}),
    ],
)
def test_our_shapes_refuse_wrong_answers(route: str, status: int, body: Any) -> None:
    reply = Reply(status, {}, orjson.dumps(body))
    with pytest.raises(AssertionError, match=route):
        Shapes().check(route, reply)
