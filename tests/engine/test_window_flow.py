"""server.engine.window_flow: several decoders' batches merged, computed as they come, answered in window order."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.decode.window_jobs import WindowBatch, WindowJob, WindowSpan
from server.engine.window_flow import in_window_order, interleave
from stadapter.video import WindowPart


def batch(*indices: int) -> WindowBatch:
    spans = tuple(WindowSpan(k, 10 * k, 10 * k + 10, float(k), k + 1.0) for k in indices)
    return WindowBatch(spans, torch.zeros(len(indices), 1), 0.0)


async def part(batches, delays, log=None, fail_after=None):
    for n, (b, d) in enumerate(zip(batches, delays, strict=True)):
        await asyncio.sleep(d)
        if fail_after is not None and n == fail_after:
            raise ValueError("the decoder failed")
        if log is not None:
            log.append(b.spans[0].index)
        yield b


async def collect(agen) -> list:
    return [x async for x in agen]


def test_interleave_gives_each_item_once_as_it_comes():
    async def go():
        fast = part([batch(0), batch(1), batch(2)], [0.0, 0.0, 0.0])
        slow = part([batch(10), batch(11)], [0.02, 0.02])
        return [b.spans[0].index for b in await collect(interleave([slow, fast]))]
    got = asyncio.run(go())
    assert sorted(got) == [0, 1, 2, 10, 11]
    assert got.index(0) < got.index(10)  # the fast part's items are not held back by the slow one
    assert got.index(10) < got.index(11) and got.index(0) < got.index(1) < got.index(2)


def test_interleave_ends_on_the_first_error_and_stops_the_others():
    closed = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.001)
                yield batch(99)
        finally:
            closed.append(True)

    async def go():
        with pytest.raises(ValueError, match="the decoder failed"):
            await collect(interleave([endless(), part([batch(0), batch(1)], [0.01, 0.01], fail_after=1)]))
    asyncio.run(go())
    assert closed == [True]


def test_answers_go_out_in_window_order_whatever_order_the_batches_come_in():
    async def compute(b: WindowBatch) -> list[int]:
        await asyncio.sleep(0.03 if b.spans[0].index == 0 else 0.0)  # the first batch computes last
        return [10 * s.index for s in b.spans]

    async def batches():
        for b in (batch(2, 3), batch(0, 1), batch(4)):
            yield b

    async def go():
        return await collect(in_window_order(batches(), compute, max_rows=8))
    got = asyncio.run(go())
    assert [(s.index, a) for s, a in got] == [(k, 10 * k) for k in range(5)]


def test_a_gap_left_by_a_part_that_ended_early_goes_last_in_order():
    async def compute(b):
        return [s.index for s in b.spans]

    async def batches():
        for b in (batch(5, 6), batch(0, 1), batch(9)):  # windows 2-4 and 7-8 never come (a stream cut short)
            yield b

    got = asyncio.run(collect(in_window_order(batches(), compute, max_rows=8)))
    assert [s.index for s, _ in got] == [0, 1, 5, 6, 9]


def test_no_more_than_max_rows_are_computed_at_once():
    running, most = [0], [0]

    async def compute(b):
        running[0] += len(b.spans)
        most[0] = max(most[0], running[0])
        await asyncio.sleep(0.01)
        running[0] -= len(b.spans)
        return [0] * len(b.spans)

    async def batches():
        for k in range(0, 20, 2):
            yield batch(k, k + 1)

    got = asyncio.run(collect(in_window_order(batches(), compute, max_rows=4)))
    assert len(got) == 20 and most[0] == 4


def test_a_compute_error_ends_it_and_cancels_what_is_still_computing():
    cancelled = []

    async def compute(b):
        if b.spans[0].index == 2:
            await asyncio.sleep(0.01)
            raise RuntimeError("the batch failed")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(b.spans[0].index)
            raise
        return [0]

    async def batches():
        for k in range(3):
            yield batch(k)

    async def go():
        with pytest.raises(RuntimeError, match="the batch failed"):
            await collect(in_window_order(batches(), compute, max_rows=8))
    asyncio.run(go())
    assert sorted(cancelled) == [0, 1]


def test_a_wrong_number_of_answers_is_an_error_not_a_silent_shift():
    async def compute(b):
        return [0]

    with pytest.raises(RuntimeError, match="1 answers for a batch of 2 windows"):
        asyncio.run(collect(in_window_order(part([batch(0, 1)], [0.0]), compute, max_rows=8)))


def test_a_job_split_keeps_the_rows_held_at_once():
    job = WindowJob(2.0, 1.0, per_batch=10)
    parts = job.parts(3)
    assert [p.part for p in parts] == [WindowPart(j, 3) for j in range(3)]
    assert [p.per_batch for p in parts] == [4, 4, 4]
    assert [p.window_s for p in parts] == [2.0] * 3
    assert job.part == WindowPart()
