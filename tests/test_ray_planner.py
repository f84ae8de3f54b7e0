"""The read-task planner: every row once, in balanced tasks (no Ray cluster needed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("ray")  # the planner ships in breadasync.ray, which needs Ray Data

from breadasync import TargetRef
from breadasync.ray import Segment, TargetRows, split


def _targets(sizes: list[int]) -> list[TargetRows]:
    return [TargetRows(TargetRef("r", f"t{i}"), n, True) for i, n in enumerate(sizes)]


def _check_cover(targets: list[TargetRows], tasks: list[list[Segment]], page_size: int) -> None:
    """Every row of every target in exactly one segment, in order; cuts on page boundaries."""
    segments = [s for task in tasks for s in task]
    for t in targets:
        mine = [s for s in segments if s.target == t.target]
        assert [(s.start, s.stop) for s in mine] == sorted((s.start, s.stop) for s in mine)
        position = 0
        for s in mine:
            assert s.start == position
            assert s.stop > s.start
            assert s.start % page_size == 0
            assert s.lines == t.lines
            position = s.stop
        assert position == t.lines
    assert all(task for task in tasks)


def test_many_small_targets_spread_evenly() -> None:
    targets = _targets([1000] * 1000)
    tasks = split(targets, 200, 1000)
    _check_cover(targets, tasks, 1000)
    assert len(tasks) == 200
    assert {sum(s.rows for s in task) for task in tasks} == {5000}
    assert {len(task) for task in tasks} == {5}  # whole targets: no page is split


def test_one_huge_target_spreads_evenly() -> None:
    targets = _targets([1_000_000])
    tasks = split(targets, 200, 1000)
    _check_cover(targets, tasks, 1000)
    assert len(tasks) == 200
    assert {sum(s.rows for s in task) for task in tasks} == {5000}


def test_never_more_tasks_than_pages() -> None:
    targets = _targets([2500, 10])
    tasks = split(targets, 200, 1000)
    _check_cover(targets, tasks, 1000)
    assert 1 < len(tasks) <= 4  # 4 pages; cuts land on the page boundary nearest a share
    assert max(sum(s.rows for s in task) for task in tasks) <= 1000


def test_tasks_get_a_minimum_of_pages() -> None:
    targets = _targets([1000] * 100)
    tasks = split(targets, 200, 1000, min_pages=8)
    _check_cover(targets, tasks, 1000)
    assert len(tasks) == 12
    assert min(sum(s.rows for s in task) for task in tasks) >= 8000
    (one,) = split(_targets([3000]), 200, 1000, min_pages=8)  # fewer pages: one task
    assert one == [Segment(TargetRef("r", "t0"), 0, 3000, 3000, True)]


def test_nothing_to_read_is_no_task() -> None:
    assert split(_targets([0, 0]), 8, 1000) == []
    targets = _targets([0, 1500, 0])
    tasks = split(targets, 8, 1000)
    _check_cover(targets, tasks, 1000)
    assert all(s.target.target_name == "t1" for task in tasks for s in task)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20_000), min_size=1, max_size=40),
    parallelism=st.integers(1, 300),
    page_size=st.sampled_from([1, 7, 100, 1000]),
)
def test_any_mix_is_covered_and_balanced(
    sizes: list[int], parallelism: int, page_size: int
) -> None:
    targets = _targets(sizes)
    tasks = split(targets, parallelism, page_size)
    _check_cover(targets, tasks, page_size)
    total = sum(sizes)
    if total == 0:
        assert tasks == []
        return
    assert len(tasks) <= parallelism
    # each task ends within half a page of its share's boundary, except where a target's
    # end (a short last page) is the nearest cut: within one page of the mean, at worst
    mean = total / len(tasks)
    pages = sum(-(-n // page_size) for n in sizes)
    if len(tasks) == min(parallelism, pages):
        assert all(sum(s.rows for s in task) <= mean + 2 * page_size for task in tasks)
