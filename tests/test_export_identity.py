"""An export is of one job (issue 17, item 1): a re-run of the job while it is exported, or
between an interrupted export and its resume, is caught and named, never mixed in.

The emulator sends a ``job_id``; :class:`NoJobIds` is one that does not, where the job's
identity is its config plus a fingerprint of its first rows.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pyarrow.parquet as pq
import pytest

from breadasync import BreadClient, DataIntegrityError, ExportMismatchError, NotFoundError
from breadasync.emulator import Emulator, EmulatorThread, JobView, TargetPlan
from breadasync.export import ExportProgress, batch_to_rows, load_manifest

ROWS = 5000
PART = 500
# Small pages: the job is re-run after two of its ten parts are written, while pages are
# still being fetched (the rows' number is not the point, so they are few).
# Pages decode in threads: where they decode is not the point, and a decoding child costs
# each export a Python start-up (tests/test_export_processes.py covers that path).
OPTIONS: dict[str, Any] = {
    "page_size": 100,
    "concurrency": 4,
    "rows_per_part": PART,
    "decode_processes": 0,
}

frozen = pytest.mark.bread_emulator(speed=0)


class NoJobIds(Emulator):
    """An emulator whose job statuses carry no ``job_id``, and whose re-runs produce other
    rows with the same config (as a real model does)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reruns: dict[int, int] = {}
        """The re-run number of each target state (by uid) that is a re-run."""

    def _job_body(self, state: Any, kind: str, view: JobView) -> dict[str, Any]:
        body = super()._job_body(state, kind, view)
        body.pop("job_id", None)
        return body

    def _rows(self, kind: str, state: Any, offset: int, count: int) -> bytes:
        data = super()._rows(kind, state, offset, count)
        run = self.reruns.get(state.uid)
        if kind != "rollout" or run is None:
            return data
        rows = orjson.loads(data)
        for row in rows:
            row["response"] = f"{row.get('response')} (re-run {run})"
        return orjson.dumps(rows)


def rerun(emulator: Emulator, rows: int = ROWS, model: str | None = None) -> None:
    """Re-run the rollout of r/t: a new job, complete, with ``rows`` lines (a test-only
    stand-in for the emulator's own re-run)."""
    overrides = {"model_name": model} if model else None
    emulator.add_target("r", "t", rows=rows, rollout="complete", overrides=overrides)
    if isinstance(emulator, NoJobIds):
        emulator.reruns[emulator._repos["r"]["t"].uid] = len(emulator.reruns) + 1


def after_rows(rows: int, action: Callable[[], None]) -> Callable[[ExportProgress], None]:
    """An ``on_progress`` callback that runs ``action`` once, when ``rows`` rows are done."""
    done = False

    def callback(progress: ExportProgress) -> None:
        nonlocal done
        if not done and progress.rows >= rows:
            done = True
            action()

    return callback


def manifest(folder: Path) -> dict[str, Any]:
    data = load_manifest(folder)
    assert data is not None
    return data


@pytest.fixture
def no_job_ids() -> Iterator[NoJobIds]:
    emulator = NoJobIds(speed=0)
    with EmulatorThread(emulator):
        yield emulator


@pytest.fixture
async def client_of() -> AsyncIterator[Callable[[Emulator], BreadClient]]:
    clients: list[BreadClient] = []

    def make(emulator: Emulator) -> BreadClient:
        client = BreadClient(emulator.api_key, emulator.url)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


# --- a re-run while the export reads -------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "model"),
    [(ROWS, None), (ROWS + 1000, None), (ROWS, "other/model")],
    ids=["same-lines", "other-lines", "other-model"],
)
@frozen
async def test_a_rerun_during_the_export_is_caught_and_named(
    make_client: Callable[..., BreadClient],
    bread_emulator: Emulator,
    tmp_path: Path,
    rows: int,
    model: str | None,
) -> None:
    client = make_client()
    bread_emulator.add_target("r", "t", rows=ROWS, rollout="complete")
    old = bread_emulator.job("r", "t").job_id
    with pytest.raises(DataIntegrityError) as caught:
        await client.export_rollout(
            "t",
            repo_name="r",
            dest=tmp_path,
            on_progress=after_rows(2 * PART, lambda: rerun(bread_emulator, rows, model)),
            **OPTIONS,
        )
    new = bread_emulator.job("r", "t").job_id
    assert old != new
    message = str(caught.value)
    assert f"job {old}" in message
    assert f"job {new}" in message
    assert "rows of two jobs must not be mixed" in message
    assert not (tmp_path / "_manifest.parquet").exists()

    # The parts of the first job are not resumed into the second one ...
    with pytest.raises(ExportMismatchError, match=rf"\(job {old}\)"):
        await client.export_rollout("t", repo_name="r", dest=tmp_path, **OPTIONS)
    # ... and replacing them yields exactly the new job's rows, recorded as its export.
    result = await client.export_rollout("t", repo_name="r", dest=tmp_path, resume=False, **OPTIONS)
    assert (result.rows, result.parts_reused) == (rows, 0)
    assert batch_to_rows(pq.read_table(tmp_path)) == bread_emulator.trajectories("r", "t")
    assert manifest(tmp_path)["identity"]["job"] == {"job_id": new}
    assert manifest(tmp_path)["job"]["job_id"] == new


async def stream_rerun_after(client: BreadClient, emulator: Emulator, rows: int) -> None:
    """Stream r/t's batches to their end, re-running the job once ``rows`` rows are seen."""
    seen = 0
    async with client.iter_rollout_batches(
        "t", repo_name="r", page_size=100, concurrency=4
    ) as batches:
        async for batch in batches:
            seen += batch.num_rows
            if seen == rows:
                rerun(emulator)


@frozen
async def test_a_page_of_a_rerun_job_ends_the_stream_there(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator
) -> None:
    """Pages name their job: the first page of the new job ends the stream, although the
    re-run has the same lines (and rows of the same shape)."""
    client = make_client()
    bread_emulator.add_target("r", "t", rows=ROWS, rollout="complete")
    old = bread_emulator.job("r", "t").job_id
    with pytest.raises(DataIntegrityError) as caught:
        await stream_rerun_after(client, bread_emulator, 2 * PART)
    new = bread_emulator.job("r", "t").job_id
    message = str(caught.value)
    assert f"this page is of job {new}, but the read began with job {old}" in message
    assert "rows of two jobs must not be mixed" in message


async def test_a_finished_stream_of_a_rerun_job_is_an_error(
    no_job_ids: NoJobIds, client_of: Callable[[Emulator], BreadClient]
) -> None:
    """Pages that name no job: the status read at the stream's end tells (its first rows,
    fetched again, are another job's)."""
    client = client_of(no_job_ids)
    no_job_ids.add_target("r", "t", rows=ROWS, rollout="complete")
    with pytest.raises(DataIntegrityError, match="rows of two jobs must not be mixed"):
        await stream_rerun_after(client, no_job_ids, 2 * PART)


# --- a re-run between an interrupted export and its resume ---------------------------------


async def interrupted(client: BreadClient, dest: Path) -> None:
    """An export stopped after two parts (the journal holds them), as Ctrl-C would."""
    with anyio.CancelScope() as scope:
        await client.export_rollout(
            "t", repo_name="r", dest=dest, on_progress=after_rows(3 * PART, scope.cancel), **OPTIONS
        )
    assert scope.cancelled_caught
    assert (dest / "_journal.jsonl").exists()
    assert not (dest / "_manifest.parquet").exists()


@pytest.mark.parametrize("rows", [ROWS, ROWS + 500], ids=["same-lines", "other-lines"])
@frozen
async def test_a_rerun_between_interruption_and_resume(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator, tmp_path: Path, rows: int
) -> None:
    client = make_client()
    bread_emulator.add_target("r", "t", rows=ROWS, rollout="complete")
    old = bread_emulator.job("r", "t").job_id
    await interrupted(client, tmp_path)
    rerun(bread_emulator, rows)
    new = bread_emulator.job("r", "t").job_id
    # Both jobs named: with the same lines and parts, nothing else tells them apart.
    with pytest.raises(
        ExportMismatchError, match=rf"\(job {old}\), not of .*\(job {new}\).*resume=False"
    ):
        await client.export_rollout("t", repo_name="r", dest=tmp_path, **OPTIONS)
    result = await client.export_rollout("t", repo_name="r", dest=tmp_path, resume=False, **OPTIONS)
    assert (result.rows, result.parts_reused) == (rows, 0)
    assert batch_to_rows(pq.read_table(tmp_path)) == bread_emulator.trajectories("r", "t")


@frozen
async def test_without_a_rerun_the_resume_keeps_the_parts(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator, tmp_path: Path
) -> None:
    client = make_client()
    bread_emulator.add_target("r", "t", rows=ROWS, rollout="complete")
    await interrupted(client, tmp_path)
    result = await client.export_rollout("t", repo_name="r", dest=tmp_path, **OPTIONS)
    assert result.parts_reused >= 2
    assert result.parts_reused + result.parts_written == ROWS // PART
    assert batch_to_rows(pq.read_table(tmp_path)) == bread_emulator.trajectories("r", "t")


# --- a service without job ids -------------------------------------------------------------


async def test_without_job_ids_config_and_first_rows_identify_the_job(
    no_job_ids: NoJobIds, client_of: Callable[[Emulator], BreadClient], tmp_path: Path
) -> None:
    client = client_of(no_job_ids)
    no_job_ids.add_target("r", "t", rows=ROWS, rollout="complete")
    await client.export_rollout("t", repo_name="r", dest=tmp_path / "a", **OPTIONS)
    job = manifest(tmp_path / "a")["identity"]["job"]
    assert set(job) == {"config", "first_rows"}
    assert batch_to_rows(pq.read_table(tmp_path / "a")) == no_job_ids.trajectories("r", "t")

    # Re-run with the same config and lines but other rows, during the export: the first
    # rows, fetched again at the end, tell.
    with pytest.raises(DataIntegrityError, match="rows of two jobs must not be mixed"):
        await client.export_rollout(
            "t",
            repo_name="r",
            dest=tmp_path / "b",
            on_progress=after_rows(2 * PART, lambda: rerun(no_job_ids)),
            **OPTIONS,
        )
    # Between an interruption and its resume: the parts of the earlier job are refused.
    await interrupted(client, tmp_path / "c")
    rerun(no_job_ids)
    with pytest.raises(ExportMismatchError, match="the job with config"):
        await client.export_rollout("t", repo_name="r", dest=tmp_path / "c", **OPTIONS)
    # A re-run with another model changes the config: caught by the status read at the end.
    with pytest.raises(DataIntegrityError, match=r"\(model other/model\)"):
        await client.export_rollout(
            "t",
            repo_name="r",
            dest=tmp_path / "d",
            on_progress=after_rows(2 * PART, lambda: rerun(no_job_ids, model="other/model")),
            **OPTIONS,
        )


async def running_on_a_service_naming_it_only_then(
    emulator: Emulator, client_of: Callable[[Emulator], BreadClient]
) -> BreadClient:
    """A client of ``emulator``, whose r/t rollout is 25 s into a run of 100 s and named by
    a ``job_id`` only while it runs."""
    plan = TargetPlan(stimuli=1000, rollout_seconds=100, final_job_id=False)
    emulator.add_target("r", "t", plan=plan)
    client = client_of(emulator)
    await client.targets.rollout.run("t", repo_name="r", poll=False)
    emulator.clock.advance(25)
    return client


async def test_a_job_that_loses_its_id_when_it_completes_is_the_same_job(
    client_of: Callable[[Emulator], BreadClient], tmp_path: Path
) -> None:
    """A service that names a job only while it is queued or running (the SDK's ``job_id``:
    "if job is queued/running"), and a partial export of a running job that completes
    meanwhile: the status read at the end has no ``job_id`` any more, which is not another
    job (its config is the same)."""
    emulator = Emulator(speed=0)
    with EmulatorThread(emulator):
        client = await running_on_a_service_naming_it_only_then(emulator, client_of)
        running = (await client.targets.rollout.get("t", repo_name="r")).job_id
        assert running is not None
        result = await client.export_rollout(
            "t",
            repo_name="r",
            dest=tmp_path,
            allow_partial=True,
            on_progress=after_rows(100, lambda: emulator.clock.advance(200)),
            **OPTIONS,
        )
        assert (await client.targets.rollout.get("t", repo_name="r")).job_id is None
        assert (result.rows, result.partial) == (250, True)
        assert batch_to_rows(pq.read_table(tmp_path)) == emulator.trajectories("r", "t", 0, 250)
        # The export is of the job its status named (its first rows were read as well).
        assert manifest(tmp_path)["identity"]["job"] == {"job_id": running}


async def test_a_rerun_of_a_job_named_only_while_it_runs_is_caught_by_its_first_rows(
    client_of: Callable[[Emulator], BreadClient], tmp_path: Path
) -> None:
    """The export began on a running job that had an id; the re-run completes without one
    (pages and status name no job): no two ids to compare, so its first rows tell."""
    emulator = Emulator(speed=0)
    with EmulatorThread(emulator):
        client = await running_on_a_service_naming_it_only_then(emulator, client_of)
        with pytest.raises(DataIntegrityError, match="rows of two jobs must not be mixed"):
            await client.export_rollout(
                "t",
                repo_name="r",
                dest=tmp_path,
                allow_partial=True,
                on_progress=after_rows(100, lambda: emulator.rerun("r", "t")),
                **OPTIONS,
            )
        assert (await client.targets.rollout.get("t", repo_name="r")).job_id is None
        assert not (tmp_path / "_manifest.parquet").exists()


@pytest.mark.parametrize(
    "plan",
    [
        TargetPlan(page_lines=False),
        TargetPlan(final_job_id=False),
        TargetPlan(page_lines=False, final_job_id=False),
    ],
    ids=["pages-without-lines", "no-id-when-done", "both"],
)
async def test_what_the_spec_lets_a_service_leave_out(
    client_of: Callable[[Emulator], BreadClient], tmp_path: Path, plan: TargetPlan
) -> None:
    """Output pages without ``lines`` (optional there, in the spec) and a complete job
    without a ``job_id``: the export, a resume and the stream give the rows served."""
    emulator = Emulator(speed=0)
    with EmulatorThread(emulator):
        emulator.add_target("r", "t", rows=ROWS, rollout="complete", plan=plan)
        client = client_of(emulator)
        page = await client.targets.rollout.get_output("t", repo_name="r", limit=3)
        assert (page.lines is None) == (not plan.page_lines)
        served = emulator.trajectories("r", "t")
        await interrupted(client, tmp_path)
        result = await client.export_rollout("t", repo_name="r", dest=tmp_path, **OPTIONS)
        assert (result.rows, result.parts_reused >= 2) == (ROWS, True)
        assert batch_to_rows(pq.read_table(tmp_path)) == served
        async with client.iter_rollout_batches("t", repo_name="r", page_size=700) as batches:
            streamed = [row async for batch in batches for row in batch_to_rows(batch)]
        assert streamed == served


class HugeIntegers(NoJobIds):
    """No ``job_id``, and every row holds integers beyond 64 bits and beyond a double's range
    (the first rows, which identify the job, included)."""

    def _rows(self, kind: str, state: Any, offset: int, count: int) -> bytes:
        rows = orjson.loads(super()._rows(kind, state, offset, count))
        for i, row in enumerate(rows, offset):
            row |= {"id": 2**64 + i, "huge": 10**400 + i}
        return json.dumps(rows).encode()


@frozen
async def test_integers_of_any_size_in_the_rows_that_identify_the_job(
    client_of: Callable[[Emulator], BreadClient], tmp_path: Path
) -> None:
    """Without a ``job_id`` the first rows identify the job: read, hashed and checked again
    exactly, as every other read of them (``get_output`` too)."""
    emulator = HugeIntegers(speed=0)
    with EmulatorThread(emulator):
        emulator.add_target("r", "t", rows=300, rollout="complete")
        client = client_of(emulator)
        expected = [
            {**row, "id": 2**64 + i, "huge": 10**400 + i}
            for i, row in enumerate(emulator.trajectories("r", "t"))
        ]
        page = await client.targets.rollout.get_output("t", repo_name="r", limit=5)
        assert page.output == expected[:5]
        await client.export_rollout("t", repo_name="r", dest=tmp_path / "a", **OPTIONS)
        assert batch_to_rows(pq.read_table(tmp_path / "a")) == expected
        assert set(manifest(tmp_path / "a")["identity"]["job"]) == {"config", "first_rows"}


# --- the batch stream checks its target when entered ---------------------------------------


@frozen
async def test_the_stream_checks_the_target_when_entered(
    make_client: Callable[..., BreadClient], bread_emulator: Emulator
) -> None:
    client = make_client()
    entered = False
    with pytest.raises(NotFoundError):
        async with client.iter_rollout_batches("ghost", repo_name="r"):
            entered = True
    assert not entered
    assert bread_emulator.stats.count("get_rollout_output") == 0
    stream = client.iter_rollout_batches("ghost", repo_name="r")
    with pytest.raises(RuntimeError, match="inside 'async with"):
        await stream.__anext__()
