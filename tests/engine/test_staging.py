"""Staging: the next full batch gets its slots and its device input while the model computes the previous one.

``ModelRunner.stage`` (slots leased, input on the device) and ``ModelRunner.run`` (the
forward, on the model thread) split ``forward``; the batcher stages a full batch on its
second thread while a forward runs. Two leases are then live at once, so a slot is
pinned by a count: a slot in both must stay pinned until both end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch
from factories import task_versions
from serverproc import wait_for_async

from server.config import ServerConfig
from server.engine.batcher import Batcher
from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots
from server.errors import DeadlineExpired
from stadapter import AdapterConfig

CPU = torch.device("cpu")
SAME = [(AdapterConfig(width=8, pre_attn=True, pre_mlp=True), 5)] * 3  # three tasks of one shape (seeds differ)


def _clip(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _reference(trunk, clips) -> list[torch.Tensor]:
    with torch.no_grad():
        return [trunk(v, tv.host_stack).softmax(-1).mean(0) for tv, v in clips]


def test_a_slot_in_two_live_leases_stays_pinned_until_both_end(tiny_trunk, tmp_path):
    t0, t1, t2 = task_versions(tiny_trunk, tmp_path, SAME)
    probe = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32)).stage([(t0, _clip(0))])
    probe.release()
    slots = AdapterSlots(2 * probe.lease.bank.slot_bytes(), CPU, torch.float32, chunk=1)  # room for two slots
    runner = ModelRunner(tiny_trunk, slots)
    v = _clip(1)
    first = runner.stage([(t0, v)])
    second = runner.stage([(t0, v), (t1, v)])  # t0 is now the least recently used, pinned by both leases
    runner.run(first)  # the first lease ends; the second still computes with t0
    third = runner.stage([(t2, v)])  # the bank is full: only an unpinned slot may be taken
    assert slots.is_resident(t0) and slots.is_resident(t1)
    out = runner.run(second)
    for p, ref in zip(out.probs, _reference(tiny_trunk, [(t0, v), (t1, v)]), strict=True):
        torch.testing.assert_close(p, ref, atol=1e-5, rtol=0)
    runner.run(third)
    assert not slots._pinned  # every lease ended


def test_a_released_staged_batch_gives_its_slots_back(tiny_trunk, tmp_path):
    (t0,) = task_versions(tiny_trunk, tmp_path, SAME[:1])
    slots = AdapterSlots(1 << 20, CPU, torch.float32)
    runner = ModelRunner(tiny_trunk, slots)
    staged = runner.stage([(t0, _clip(0))])
    assert slots._pinned
    staged.release()
    assert not slots._pinned and slots.is_resident(t0)


def test_a_batchs_compute_time_is_its_forward_alone(tiny_trunk, tmp_path):
    """Staging may overlap the previous forward, so it is reported apart (stage_s, stadapter_stage_seconds):
    compute_s, summed over forwards, never counts the same second twice; a clip's queue wait includes it."""
    (t0,) = task_versions(tiny_trunk, tmp_path, SAME[:1])
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32))
    staged = dataclasses.replace(runner.stage([(t0, _clip(0))]), stage_s=5.0)  # as if its staging had taken 5 s
    out = runner.run(staged)
    assert out.stage_s == 5.0 and 0 < out.compute_s < 5.0


class _SlowRunner:
    """A real runner whose forwards take at least ``hold_s``; records when each stage and run begins and ends."""

    def __init__(self, runner: ModelRunner, hold_s: float):
        self.runner, self.hold_s = runner, hold_s
        self.events: list[tuple[str, int, float]] = []
        self.sizes: list[int] = []
        self.fail_next_stage = False
        self._ids: dict[int, int] = {}  # id(staged batch) -> its number
        self._lock = threading.Lock()

    def _log(self, what: str, n: int) -> None:
        with self._lock:
            self.events.append((what, n, time.monotonic()))

    def stage(self, clips):
        if self.fail_next_stage:
            self.fail_next_stage = False
            raise RuntimeError("staging failed on purpose")
        n = len(self.sizes)
        self.sizes.append(len(clips))
        self._log("stage", n)
        staged = self.runner.stage(clips)
        self._ids[id(staged)] = n
        self._log("staged", n)
        return staged

    def run(self, staged):
        n = self._ids[id(staged)]
        self._log("run", n)
        out = self.runner.run(staged)
        time.sleep(self.hold_s)
        self._log("ran", n)
        return out

    def began(self, what: str, n: int) -> bool:
        with self._lock:
            return any(w == what and k == n for w, k, _ in self.events)

    def at(self, what: str, n: int) -> float:
        return next(t for w, k, t in self.events if w == what and k == n)


def _batcher(runner, tmp_path, rows: int, delay_s: float = 0.05) -> Batcher:
    return Batcher(runner, ServerConfig(model_repository=tmp_path, max_batch_size=rows).limits, max_delay_s=delay_s)


def test_the_next_full_batch_is_staged_while_the_model_computes(tiny_trunk, tmp_path):
    tvs = task_versions(tiny_trunk, tmp_path, SAME)
    slow = _SlowRunner(ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32)), hold_s=0.3)
    clips = [(tvs[i % 3], _clip(i)) for i in range(6)]

    async def main():
        b = _batcher(slow, tmp_path, rows=2)
        b.start()
        try:
            return await asyncio.gather(*(b.submit(tv, v, None) for tv, v in clips))
        finally:
            await b.close()

    results = asyncio.run(main())
    assert slow.sizes == [2, 2, 2]
    for n in (1, 2):  # batch n was staged (slots and input ready) before batch n - 1's forward ended
        assert slow.at("staged", n) < slow.at("ran", n - 1)
        assert slow.at("run", n) >= slow.at("ran", n - 1)  # and forwards never overlap
    for r, ref in zip(results, _reference(tiny_trunk, clips), strict=True):
        torch.testing.assert_close(r.probs, ref, atol=1e-5, rtol=0)


def test_a_partial_batch_keeps_filling_while_the_model_is_busy(tiny_trunk, tmp_path):
    """Staging early must not shrink batches: a batch that is not full waits for the model as before."""
    tvs = task_versions(tiny_trunk, tmp_path, SAME)
    slow = _SlowRunner(ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32)), hold_s=0.5)

    async def main():
        b = _batcher(slow, tmp_path, rows=4, delay_s=0.01)
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(tvs[0], _clip(0), None))
            await wait_for_async(lambda: slow.began("run", 0), "the first batch (one clip: its delay passed) to compute")
            later = []
            for i in range(3):  # these arrive one by one during that forward, each past its own delay
                later.append(asyncio.ensure_future(b.submit(tvs[i], _clip(1 + i), None)))
                await asyncio.sleep(0.05)
            return await asyncio.gather(first, *later)
        finally:
            await b.close()

    asyncio.run(main())
    assert slow.sizes == [1, 3]


def test_a_failed_staging_fails_its_batch_and_the_next_one_is_served(tiny_trunk, tmp_path):
    tvs = task_versions(tiny_trunk, tmp_path, SAME)
    slow = _SlowRunner(ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32)), hold_s=0.0)

    async def main():
        b = _batcher(slow, tmp_path, rows=1)
        b.start()
        try:
            slow.fail_next_stage = True
            with pytest.raises(RuntimeError, match="staging failed on purpose"):
                await b.submit(tvs[0], _clip(0), None)
            return await b.submit(tvs[1], _clip(1), None)
        finally:
            await b.close()

    r = asyncio.run(main())
    torch.testing.assert_close(r.probs, _reference(tiny_trunk, [(tvs[1], _clip(1))])[0], atol=1e-5, rtol=0)


def test_a_staged_batch_whose_callers_expired_is_not_computed_and_frees_its_slots(tiny_trunk, tmp_path):
    tvs = task_versions(tiny_trunk, tmp_path, SAME)
    slots = AdapterSlots(1 << 20, CPU, torch.float32)
    slow = _SlowRunner(ModelRunner(tiny_trunk, slots), hold_s=0.6)

    async def main():
        b = _batcher(slow, tmp_path, rows=1)
        b.start()
        try:
            busy = asyncio.ensure_future(b.submit(tvs[0], _clip(0), None))
            # the model is busy for 0.6 s; the next batch is staged at once
            await wait_for_async(lambda: slow.began("run", 0), "the first batch to compute")
            doomed = b.submit(tvs[1], _clip(1), time.monotonic() + 0.2)
            with pytest.raises(DeadlineExpired):
                await doomed
            await busy
        finally:
            await b.close()

    asyncio.run(main())
    assert slow.sizes == [1, 1]  # staged ...
    assert [e for e in slow.events if e[0] == "run"] == [e for e in slow.events if e[0] == "run" and e[1] == 0]
    assert not slots._pinned  # ... never run, and its lease ended
