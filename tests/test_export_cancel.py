"""Cancelling an export or a batch stream at any moment is clean (issue 16, item 1).

For each entry point (``export_rollout``, ``export_many``, ``iter_rollout_batches``), one
process cancels the call at 50+ random (seeded) moments, by ``Task.cancel``,
``asyncio.timeout`` and ``wait_for`` in turn, and starts the next call on the same folder at
once. Each cancelled call must raise exactly ``CancelledError`` / ``TimeoutError``, leave no
task and no thread work behind, and release its folder; the process must survive them all
(it runs in a subprocess, so a crash in Arrow is a failed test, not a dead pytest); the
export finally completes and is checked row by row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from breadasync import BreadClient, BreadError, RetryPolicy
from breadasync.emulator import Emulator, Faults
from breadasync.export import batch_to_rows
from breadasync.export._threads import running

ROUNDS = 50
# Six parts of 250 rows in 15 pages (two parts a target for export_many): every stage is
# there to be cancelled; more rows would only make each round longer.
ROWS = 1500
MANY = ("a", "b", "c")
ROBUST = RetryPolicy(max_retries=10, initial_backoff=0.002, max_backoff=0.02)
OPTIONS: dict[str, Any] = {"page_size": 100, "rows_per_part": 250, "concurrency": 4}


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """One digest of a list of rows (so a child process can report what it streamed)."""
    return hashlib.sha256(orjson.dumps(rows, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def _call(client: BreadClient, entry: str, dest: Path, resume: bool = True) -> object:
    if entry == "export_rollout":
        return await client.export_rollout("t", repo_name="r", dest=dest, resume=resume, **OPTIONS)
    if entry == "export_many":
        return await client.export_many(
            list(MANY), repo_name="r", dest=dest, target_concurrency=3, resume=resume, **OPTIONS
        )
    rows: list[dict[str, Any]] = []
    async with client.iter_rollout_batches(
        "t", repo_name="r", page_size=100, concurrency=4
    ) as batches:
        async for batch in batches:
            rows.extend(batch_to_rows(batch))
    return rows_digest(rows)


async def stress(entry: str, dest: Path, seed: int, rounds: int) -> dict[str, Any]:
    """Cancel ``entry`` ``rounds`` times at random moments; then run it to its end."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    tally = {"cancelled": 0, "finished": 0, "max_stop_s": 0.0}
    async with BreadClient(
        os.environ["BREAD_API_KEY"], os.environ["BREAD_BASE_URL"], retry=ROBUST
    ) as client:
        before = asyncio.all_tasks()
        resume = True
        for i in range(rounds):
            delay = rng.uniform(0.0, 0.125)  # about as long as one whole call, at most
            how = ("task", "timeout", "wait_for")[i % 3]
            deadline = loop.time() + delay
            finished = tally["finished"]
            try:
                if how == "task":
                    task = asyncio.create_task(_call(client, entry, dest, resume))
                    await asyncio.sleep(delay)  # a random moment, not a synchronisation
                    task.cancel()
                    deadline = loop.time()
                    try:
                        await task
                    except asyncio.CancelledError:
                        if not task.cancelled():
                            raise AssertionError("CancelledError, but the task is not") from None
                        tally["cancelled"] += 1
                    else:
                        tally["finished"] += 1
                elif how == "timeout":
                    async with asyncio.timeout(delay):
                        await _call(client, entry, dest, resume)
                    tally["finished"] += 1
                else:
                    await asyncio.wait_for(_call(client, entry, dest, resume), delay)
                    tally["finished"] += 1
            except TimeoutError:
                tally["cancelled"] += 1
            # A finished export is replaced by the next call (resume=False), so every round
            # has work to cancel; after a cancelled one, the next call resumes it.
            resume = tally["finished"] == finished
            # Anything else (an ExceptionGroup, ExportLockedError...) fails the run.
            tally["max_stop_s"] = max(tally["max_stop_s"], loop.time() - deadline)
            left = asyncio.all_tasks() - before
            assert not left, f"round {i} ({how}) left tasks behind: {left}"
            assert running() == 0, f"round {i} ({how}) left thread work running"
        tally["result"] = await _call(client, entry, dest)
        if entry != "iter_rollout_batches":
            tally["result"] = None
    return tally


def main() -> None:
    """The child process: ``python -c 'from tests.test_export_cancel import main; main()'
    ENTRY DEST SEED ROUNDS``."""
    entry, dest, seed, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    tally = asyncio.run(stress(entry, dest, seed, rounds))
    print(orjson.dumps(tally).decode())


@pytest.mark.bread_emulator(speed=0)
@pytest.mark.parametrize("entry", ["export_rollout", "export_many", "iter_rollout_batches"])
def test_fifty_cancellations_at_random_moments_in_one_process(
    bread_emulator: Emulator, tmp_path: Path, entry: str
) -> None:
    bread_emulator.add_target("r", "t", rows=ROWS, rollout="complete")
    for name in MANY:
        bread_emulator.add_target("r", name, rows=ROWS // len(MANY), rollout="complete")
    # Pages in flight for a few milliseconds, so the cancellations land in every stage.
    bread_emulator.set_faults(Faults(latency=0.002, jitter=0.004))
    dest = tmp_path / "out"
    env = {
        **os.environ,
        "BREAD_API_KEY": bread_emulator.api_key,
        "BREAD_BASE_URL": bread_emulator.url or "",
    }
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            "from tests.test_export_cancel import main; main()",
            entry,
            str(dest),
            "16",
            str(ROUNDS),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stderr[-4000:]}"
    for noise in ("ResourceWarning", "Exception ignored", "Task was destroyed", "never awaited"):
        assert noise not in child.stderr, child.stderr[-4000:]
    tally = orjson.loads(child.stdout.strip().splitlines()[-1])
    assert tally["cancelled"] + tally["finished"] == ROUNDS
    print(f"{entry}: {tally}")  # the report's numbers (pytest -s shows them)

    if entry == "export_rollout":
        table = pq.read_table(dest)
        assert table.column("row_offset").to_pylist() == list(range(ROWS))
        assert batch_to_rows(table) == bread_emulator.trajectories("r", "t")
    elif entry == "export_many":
        dataset = ds.dataset(dest, format="parquet", partitioning="hive")
        for name in MANY:
            part = dataset.to_table(filter=ds.field("target") == name).sort_by("row_offset")
            assert batch_to_rows(part.drop_columns(["repo", "target"])) == (
                bread_emulator.trajectories("r", name)
            )
    else:
        assert tally["result"] == rows_digest(bread_emulator.trajectories("r", "t"))


async def test_a_cancel_during_a_part_commit_leaves_it_journaled(
    make_client: Any, bread_emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare ``Task.cancel`` that lands while a part is being committed (in its thread):
    the part is on disk and in the journal, so the next run reuses it instead of fetching
    its pages again."""
    from breadasync.export import _commit

    bread_emulator.add_target("r", "t", rows=ROWS, rollout="complete")
    loop = asyncio.get_running_loop()
    commit = _commit.PartWriter.commit
    task: asyncio.Task[object] | None = None
    commits = 0

    def cancelling_commit(self: _commit.PartWriter) -> Any:
        nonlocal commits
        commits += 1
        if commits == 2:
            assert task is not None
            # The cancel is delivered to the waiting task while this thread still runs.
            asyncio.run_coroutine_threadsafe(_cancel(task), loop).result()
        return commit(self)

    monkeypatch.setattr(_commit.PartWriter, "commit", cancelling_commit)
    client = make_client(retry=ROBUST)
    options = {**OPTIONS, "decode_processes": 0}
    task = asyncio.create_task(client.export_rollout("t", repo_name="r", dest=tmp_path, **options))
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(_commit.PartWriter, "commit", commit)
    on_disk = sorted(p.name for p in tmp_path.glob("part-*.parquet"))
    journal = [orjson.loads(line) for line in (tmp_path / "_journal.jsonl").read_bytes().split()]
    assert on_disk == [entry["name"] for entry in journal[1:]] == on_disk[:2]
    result = await client.export_rollout("t", repo_name="r", dest=tmp_path, **options)
    assert result.parts_reused == 2
    assert batch_to_rows(pq.read_table(tmp_path)) == bread_emulator.trajectories("r", "t")


async def _cancel(task: asyncio.Task[object]) -> None:
    task.cancel()


async def _stale_cancel_request() -> None:
    """Leave the current task with a cancellation request it caught without ``uncancel()``
    (as Python 3.11's TaskGroup does after a failed child)."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert task.cancelling() == 1


@pytest.mark.parametrize("entry", ["export_rollout", "export_many", "iter_rollout_batches"])
async def test_a_stale_cancel_request_does_not_hide_the_error(
    bread_emulator: Emulator, tmp_path: Path, entry: str
) -> None:
    """A caller whose task still counts a cancellation it caught gets the export's own
    error, not a ``CancelledError`` it never asked for; a real timeout is still one."""
    for name in MANY:
        bread_emulator.add_target("r", name, rows=ROWS, rollout="complete")
    bread_emulator.add_target("r", "t", rows=ROWS, rollout="complete")
    output = frozenset({"get_rollout_output"})
    bread_emulator.set_faults(Faults(corrupt=1.0, corrupt_kind="overlong", routes=output))
    await _stale_cancel_request()
    async with BreadClient(bread_emulator.api_key, bread_emulator.url, retry=ROBUST) as client:
        if entry == "export_many":
            results = await _call(client, entry, tmp_path / "out")
            errors = [type(result.error).__name__ for result in results]  # type: ignore[attr-defined]
            assert errors == ["DataIntegrityError"] * len(MANY)
        else:
            with pytest.raises(BreadError, match="sent more rows than a page may hold"):
                await _call(client, entry, tmp_path / "out")
        bread_emulator.set_faults(Faults(latency=5, routes=output))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await _call(client, entry, tmp_path / "slow")
