"""breadasync.ray on a local Ray cluster, against the emulator served on 127.0.0.1.

The Ray workers are other processes: they reach the emulator (a thread of this process) by
its URL, as they would reach the service.
"""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from breadasync import (  # noqa: E402
    AuthenticationError,
    BreadClient,
    DataIntegrityError,
    InvalidArgumentError,
    NotFoundError,
    TargetRef,
    UnfinishedJobError,
)
from breadasync.emulator import Emulator, Faults  # noqa: E402
from breadasync.export import TYPED_SCHEMA as EXPORT_TYPED  # noqa: E402
from breadasync.export import batch_to_rows  # noqa: E402
from breadasync.ray import (  # noqa: E402
    SCHEMA,
    TYPED_SCHEMA,
    BreadDatasource,
    Segment,
    read_rollouts,
)
from breadasync.ray._bridge import POSITION  # noqa: E402

OUTPUT = frozenset({"get_rollout_output"})

# A guard against a hang, not a bound on speed: Ray on a 2-core machine that is busy with
# other work took 107 s for one read (its scheduler shares the same cores), past the
# suite's default of 120 s once the cluster's start is counted.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local cluster of 2 CPUs for every Ray test (starting one costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    with warnings.catch_warnings():
        # Ray Data's own defaults trip its deprecations of its settings (Ray 2.60)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray.data.context")
        context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


SHARED_HANDLES = ("/logs/ray-data/",)
"""Ray's driver opens its session's logs when it likes."""


def shared_handle(handle: str, request: pytest.FixtureRequest) -> bool:
    """In the tests that run the cluster, the driver's connections to its workers."""
    return "ray_cluster" in request.fixturenames and "->socket:" in handle


def _add(emulator: Emulator, sizes: dict[str, int]) -> list[tuple[str, str]]:
    for name, rows in sizes.items():
        emulator.add_target("r", name, rows=rows, rollout="complete")
    return [("r", name) for name in sizes]


def _rows(table: pa.Table, schema: pa.Schema = SCHEMA) -> list[dict[str, Any]]:
    """Rows in (repo, target, position) order, names as plain strings."""
    table = table.select(schema.names)
    table = table.set_column(
        schema.get_field_index("repo"), "repo", table.column("repo").cast(pa.string())
    ).set_column(
        schema.get_field_index("target"), "target", table.column("target").cast(pa.string())
    )
    rows = table.to_pylist()
    rows.sort(key=lambda row: (row["repo"], row["target"], row[POSITION]))
    return rows


def test_import_breadasync_does_not_import_ray() -> None:
    code = "import sys, breadasync, breadasync.export; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_errors_cross_process_boundaries_as_themselves() -> None:
    error = NotFoundError(
        "GET /x -> 404", method="GET", path="/x", status=404, server_message="no such target"
    )
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own object)
    assert type(copy) is NotFoundError
    assert (str(copy), copy.status, copy.server_message) == (str(error), 404, "no such target")


@pytest.mark.bread_emulator(speed=0)
def test_plan_metadata_and_budget(bread_emulator: Emulator) -> None:
    targets = _add(bread_emulator, {"a": 3000, "b": 1000, "c": 5500})
    source = BreadDatasource(
        targets,
        api_key=bread_emulator.api_key,
        base_url=bread_emulator.url,
        max_concurrency=10,
        max_requests_per_second=30.0,
        max_tasks=3,
        page_size=100,
    )
    assert source.rows == 9500
    assert source.row_bytes > 0
    tasks = source.get_read_tasks(4)
    assert len(tasks) == 4
    assert sum(t.metadata.num_rows for t in tasks) == 9500
    assert sum(t.metadata.size_bytes for t in tasks) == pytest.approx(
        source.estimate_inmemory_data_size(), abs=len(tasks)
    )
    assert all(t.schema == SCHEMA for t in tasks)
    # 3 tasks at once, each 10 // 3 = 3 in flight and 10 rps / 3: never more than the total
    shares = {
        (t.read_fn.connection.max_concurrency, t.read_fn.connection.max_requests_per_second)
        for t in tasks
    }
    assert shares == {(3, 10.0)}
    assert source.get_name() == "Bread"
    # the key travels in the pickled task (that is how a worker gets it), and nowhere else
    key = bread_emulator.api_key
    assert key.encode() in pickle.dumps(tasks[0].read_fn)
    for shown in (
        repr(source),
        repr(tasks[0].read_fn),
        repr(tasks[0].read_fn.connection),
        repr(tasks[0].metadata),
    ):
        assert key not in shown
    # fewer tasks than max_tasks: each gets a bigger share, the total stays the same
    (one,) = source.get_read_tasks(1)
    assert one.read_fn.connection.max_concurrency == 10


@pytest.mark.bread_emulator(speed=0)
def test_planning_refuses_what_cannot_be_read(bread_emulator: Emulator) -> None:
    bread_emulator.add_target("r", "done", rows=100, rollout="complete")
    bread_emulator.add_target("r", "running", rows=5000, rollout="running")
    key, url = bread_emulator.api_key, bread_emulator.url
    with pytest.raises(UnfinishedJobError, match="allow_partial"):
        BreadDatasource(["done", "running"], repo_name="r", api_key=key, base_url=url)
    partial = BreadDatasource(
        ["done", "running"], repo_name="r", api_key=key, base_url=url, allow_partial=True
    )
    assert [t.complete for t in partial.targets] == [True, False]
    with pytest.raises(NotFoundError, match="404") as missing:
        BreadDatasource(["done", "nope"], repo_name="r", api_key=key, base_url=url)
    assert missing.value.server_message
    with pytest.raises(AuthenticationError, match="401"):
        BreadDatasource(["done"], repo_name="r", api_key="not-the-key", base_url=url)


async def _export_locally(
    emulator: Emulator, targets: list[tuple[str, str]], dest: Path, columns: Any = "json"
) -> None:
    async with BreadClient(emulator.api_key, emulator.url) as client:
        results = await client.export_many(targets, dest=dest, columns=columns)
    assert all(r.ok for r in results)


@pytest.mark.bread_emulator(speed=0)
def test_read_equals_the_local_export_row_by_row(
    ray_cluster: None, bread_emulator: Emulator, tmp_path: Path
) -> None:
    # 18 pages: two read tasks, cut inside "a", the second spanning all four targets
    targets = _add(bread_emulator, {"a": 9500, "b": 1000, "c": 6700, "d": 7})
    asyncio.run(_export_locally(bread_emulator, targets, tmp_path / "local"))
    local = pads.dataset(tmp_path / "local", format="parquet", partitioning="hive").to_table()

    dataset = read_rollouts(
        targets,
        api_key=bread_emulator.api_key,
        base_url=bread_emulator.url,
        override_num_blocks=5,
    )
    assert dataset.schema().base_schema == SCHEMA
    dataset.write_parquet(str(tmp_path / "ray"))
    remote = pq.read_table(tmp_path / "ray")

    assert remote.num_rows == local.num_rows == 17207
    assert remote.schema.remove_metadata() == SCHEMA.remove_metadata()
    # the same pages as the local export (cuts fall on its page boundaries), so the same
    # bytes: even the key order of ``extra``, which depends on a page's other rows
    assert _rows(remote) == _rows(local)


@pytest.mark.bread_emulator(speed=0)
def test_a_typed_read_equals_the_typed_local_export(
    ray_cluster: None, bread_emulator: Emulator, tmp_path: Path
) -> None:
    targets = _add(bread_emulator, {"a": 2600, "b": 900})
    asyncio.run(_export_locally(bread_emulator, targets, tmp_path / "local", "typed"))
    local = pads.dataset(tmp_path / "local", format="parquet", partitioning="hive").to_table()
    dataset = read_rollouts(
        targets,
        api_key=bread_emulator.api_key,
        base_url=bread_emulator.url,
        override_num_blocks=2,
        columns="typed",
    )
    assert dataset.schema().base_schema == TYPED_SCHEMA
    assert TYPED_SCHEMA.names[:-2] == EXPORT_TYPED.names
    dataset.write_parquet(str(tmp_path / "ray"))
    remote = pq.read_table(tmp_path / "ray")
    assert remote.num_rows == local.num_rows == 3500
    assert remote.schema.remove_metadata() == TYPED_SCHEMA.remove_metadata()
    assert remote.column("tool_calls").null_count < remote.num_rows
    assert _rows(remote, TYPED_SCHEMA) == _rows(local, TYPED_SCHEMA)
    back = batch_to_rows(remote.sort_by([("target", "ascending"), (POSITION, "ascending")]))
    assert back == bread_emulator.trajectories("r", "a") + bread_emulator.trajectories("r", "b")


def test_a_bad_column_mode_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="columns must be"):
        read_rollouts(["t"], repo_name="r", api_key="k", base_url="http://127.0.0.1:9", columns="x")  # type: ignore[arg-type]


@pytest.mark.bread_emulator(speed=0)
def test_the_cluster_stays_within_the_in_flight_budget(
    ray_cluster: None, bread_emulator: Emulator
) -> None:
    targets = _add(bread_emulator, {f"t{i}": 1500 for i in range(6)})
    # slow answers, so that requests overlap if anything lets them
    bread_emulator.set_faults(Faults(latency=0.02, routes=OUTPUT))
    dataset = read_rollouts(
        targets,
        api_key=bread_emulator.api_key,
        base_url=bread_emulator.url,
        max_concurrency=3,
        page_size=100,
        override_num_blocks=6,
    )
    assert dataset.materialize().count() == 9000  # count() alone trusts the metadata
    assert bread_emulator.stats.count("get_rollout_output", status=200) >= 90
    assert 1 <= bread_emulator.stats.max_in_flight <= 3


@pytest.mark.bread_emulator(speed=0)
def test_a_transient_failure_is_retried_by_ray_without_duplicates(
    ray_cluster: None, bread_emulator: Emulator
) -> None:
    targets = _add(bread_emulator, {"a": 3000, "b": 2000})
    dataset = read_rollouts(
        targets,
        api_key=bread_emulator.api_key,
        base_url=bread_emulator.url,
        max_retries=0,  # the task's client gives up at once: the task must read again
        page_size=100,
        override_num_blocks=2,
    )
    # after planning: one 503 on a page of "b"
    bread_emulator.set_faults(
        Faults(errors={503: 1.0}, retry_after=0, max_faults=1, routes=OUTPUT),
        repo="r",
        target="b",
    )
    table = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    assert bread_emulator.stats.faults() == 1
    keys = list(
        zip(table.column("target").to_pylist(), table.column(POSITION).to_pylist(), strict=True)
    )
    assert len(keys) == len(set(keys)) == 5000


@pytest.mark.bread_emulator(speed=0)
def test_a_permanent_error_fails_the_dataset_with_the_services_message(
    ray_cluster: None, bread_emulator: Emulator
) -> None:
    targets = _add(bread_emulator, {"a": 3000, "b": 3000})
    dataset = read_rollouts(
        targets,
        api_key=bread_emulator.api_key,
        base_url=bread_emulator.url,
        override_num_blocks=2,
    )
    bread_emulator.set_faults(Faults(errors={404: 1.0}, routes=OUTPUT))  # the targets go
    with pytest.raises(NotFoundError, match="404 Not Found: Injected error 404") as raised:
        dataset.materialize()
    assert raised.value.status == 404
    # not retried, neither by the client nor by the task nor by Ray: no page asked twice
    asked = [(r.target, r.offset) for r in bread_emulator.stats.records() if r.status == 404]
    assert asked
    assert len(asked) == len(set(asked))


@pytest.mark.bread_emulator(speed=0)
def test_lines_changing_under_the_read_fail_it(ray_cluster: None, bread_emulator: Emulator) -> None:
    targets = _add(bread_emulator, {"a": 2000})
    dataset = read_rollouts(targets, api_key=bread_emulator.api_key, base_url=bread_emulator.url)
    bread_emulator.set_faults(Faults(growing_lines=5, routes=OUTPUT))
    with pytest.raises(DataIntegrityError, match="must not change"):
        dataset.materialize()


@pytest.mark.bread_emulator(speed=0)
def test_a_job_rerun_after_planning_fails_the_read(
    ray_cluster: None, bread_emulator: Emulator
) -> None:
    """The tasks read the job that was planned: a re-run with the same lines (which the
    line checks cannot see) fails the read instead of mixing in the new job's rows."""
    targets = _add(bread_emulator, {"a": 2000})
    dataset = read_rollouts(targets, api_key=bread_emulator.api_key, base_url=bread_emulator.url)
    old = bread_emulator.job("r", "a").job_id
    _add(bread_emulator, {"a": 2000})
    new = bread_emulator.job("r", "a").job_id
    with pytest.raises(DataIntegrityError, match="rows of two jobs must not be mixed") as raised:
        dataset.materialize()
    assert f"this page is of job {new}, but the read began with job {old}" in str(raised.value)


@pytest.mark.bread_emulator(speed=0)
def test_the_key_is_in_no_ray_log(ray_cluster: None, bread_emulator: Emulator) -> None:
    targets = _add(bread_emulator, {"a": 1500})
    dataset = read_rollouts(targets, api_key=bread_emulator.api_key, base_url=bread_emulator.url)
    assert dataset.materialize().count() == 1500
    assert bread_emulator.api_key not in str(dataset.stats())
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs
    key = bread_emulator.api_key.encode()
    leaked = [p.name for p in logs if key in p.read_bytes()]
    assert not leaked


def test_targets_take_the_forms_of_rollout_many() -> None:
    # nothing is sent when a target is malformed
    from breadasync import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        read_rollouts(["t"], api_key="k", base_url="http://127.0.0.1:9")  # no repo_name
    with pytest.raises(InvalidArgumentError):
        read_rollouts("t", repo_name="r", api_key="k", base_url="http://127.0.0.1:9")
    for bad in ({"max_concurrency": 0}, {"max_requests_per_second": 0.0}, {"page_size": 1001}):
        with pytest.raises(InvalidArgumentError):
            read_rollouts(["t"], repo_name="r", api_key="k", base_url="http://127.0.0.1:9", **bad)
    assert TargetRef("r", "t")  # a TargetRef is accepted as such (covered above)


def test_public_api_is_sorted_complete_and_documented() -> None:
    from tests.test_quality import test_all_is_sorted_complete_and_documented

    test_all_is_sorted_complete_and_documented("breadasync.ray")


def test_a_retried_read_skips_the_rows_already_yielded() -> None:
    from breadasync.ray._datasource import _skip

    a, b = TargetRef("r", "a"), TargetRef("r", "b")
    segments = (Segment(a, 1000, 3000, 3000, True), Segment(b, 0, 500, 500, True))
    assert _skip(segments, 0) == segments
    assert _skip(segments, 1500) == (
        Segment(a, 2500, 3000, 3000, True),
        Segment(b, 0, 500, 500, True),
    )
    assert _skip(segments, 2100) == (Segment(b, 100, 500, 500, True),)
    assert _skip(segments, 2500) == ()


def test_the_readme_example(ray_cluster: None, tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "read_rollouts(" in b
    ]
    assert "ray.init(num_cpus=2)" in code
    code = code.replace("ray.init(num_cpus=2)", "pass  # the session's cluster")
    code = code.replace('"rollouts-parquet"', repr(str(tmp_path / "rollouts-parquet")))
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # noqa: S102 (the README's own example)
    assert namespace["ds"].count() == 60_000
    assert pq.read_table(tmp_path / "rollouts-parquet").num_rows == 60_000


@pytest.mark.bread_emulator(speed=0)
async def test_planning_works_under_a_running_event_loop(bread_emulator: Emulator) -> None:
    # a notebook's loop: planning then runs on a loop of its own, in a thread
    targets = _add(bread_emulator, {"a": 1200})
    source = BreadDatasource(targets, api_key=bread_emulator.api_key, base_url=bread_emulator.url)
    assert source.rows == 1200
