"""Decoding in child processes: the same batches as in-process, the same typed errors, and a
child that dies costs one page, not the process."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from breadasync import DataIntegrityError, ProtocolError
from breadasync.export import batch_to_rows
from breadasync.export._decode import DecodeLimits
from breadasync.export._decode_process import PIPELINE_DEPTH, DecodeProcesses
from breadasync.export._reader import decode_page
from tests.decode_pages import page_body, realistic_page, realistic_row


def test_realistic_pages_decode_the_same_in_a_child() -> None:
    with DecodeProcesses(2) as processes:
        for offset in (0, 1000, 7000):
            body = realistic_page(offset)
            here = decode_page(body, "GET", "/p", 200, offset, 1000)
            there = decode_page(body, "GET", "/p", 200, offset, 1000, decoder=processes)
            assert there.batch.equals(here.batch)
            assert (there.lines, there.status) == (here.lines, here.status)
        rows = [realistic_row(i) for i in range(7000, 8000)]
        assert batch_to_rows(there.batch) == rows


def test_errors_come_back_typed() -> None:
    with DecodeProcesses(1, limits=DecodeLimits(max_depth=5)) as processes:
        with pytest.raises(
            ProtocolError, match=r"offset 3 is nested too deeply \(over 5 levels"
        ) as caught:
            decode_page(
                page_body([{"x": [[[[1]]]]}], 3), "GET", "/p", 200, 3, 10, decoder=processes
            )
        assert caught.value.path == "/p"
        assert caught.value.status == 200
        body = page_body([{"r": 0.5}], 0).replace(b"0.5", b"NaN")
        with pytest.raises(ProtocolError, match="NaN or Infinity"):
            decode_page(body, "GET", "/p", 200, 0, 1, decoder=processes)
        with pytest.raises(DataIntegrityError, match="offset 7"):
            decode_page(page_body([{"a": 1}], 7), "GET", "/p", 200, 0, 10, decoder=processes)
        # The child is still the same one after refusals.
        decode_page(page_body([{"a": 1}], 0), "GET", "/p", 200, 0, 10, decoder=processes)
        assert processes._started == 1


def test_a_child_killed_mid_export_costs_one_page() -> None:
    with DecodeProcesses(1) as processes:
        body = page_body([{"a": 1}], 0)
        decode_page(body, "GET", "/p", 200, 0, 10, decoder=processes)
        (child,) = processes._children
        os.kill(child.process.pid, signal.SIGKILL)
        child.process.wait()
        with pytest.raises(ProtocolError, match="the decoding process ended"):
            decode_page(body, "GET", "/p", 200, 0, 10, decoder=processes)
        decoded = decode_page(body, "GET", "/p", 200, 0, 10, decoder=processes)
        assert batch_to_rows(decoded.batch) == [{"a": 1}]
        assert processes._started == 2
    with pytest.raises(RuntimeError, match="closed"):
        processes.decode(body, "GET", "/p", 200, 0, 10)


def test_the_pool_size_is_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DecodeProcesses(0)


def test_pages_in_flight_together_each_get_their_own_answer() -> None:
    # Up to PIPELINE_DEPTH pages share one child; answers must not cross between callers,
    # and a refused page fails only its own caller.
    offsets = list(range(0, 12_000, 1000))
    bodies = {offset: realistic_page(offset) for offset in offsets}
    bad = page_body([{"r": 0.5}], 5).replace(b"0.5", b"NaN")
    results: dict[int, object] = {}

    def work(offset: int) -> None:
        try:
            if offset == 5:
                decode_page(bad, "GET", "/p", 200, 5, 1, decoder=processes)
            else:
                results[offset] = decode_page(
                    bodies[offset], "GET", "/p", 200, offset, 1000, decoder=processes
                ).batch
        except ProtocolError as exc:
            results[offset] = exc

    with DecodeProcesses(1) as processes, ThreadPoolExecutor(PIPELINE_DEPTH * 3) as pool:
        list(pool.map(work, [*offsets[:6], 5, *offsets[6:]]))
        assert processes._started == 1
    assert isinstance(results.pop(5), ProtocolError)
    for offset in offsets:
        here = decode_page(bodies[offset], "GET", "/p", 200, offset, 1000).batch
        assert here.equals(results[offset])
