"""Warm-up runs the shapes serving runs: each row a clip of its own, and the shared prefix where tasks have one."""

from __future__ import annotations

import torch
from factories import HETERO, task_versions

from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots
from stadapter import AdapterConfig

CPU = torch.device("cpu")
LAST_BLOCK = AdapterConfig(width=8, pre_attn=True, pre_mlp=True, layers=1)  # the tiny trunk has 2 blocks


def _trunk_calls(trunk, monkeypatch) -> list[tuple[int, int]]:
    """(inputs, rows) of every trunk forward: rows > inputs when rows share an input's prefix."""
    calls: list[tuple[int, int]] = []
    real = trunk.forward

    def forward(frames, stack, task_index=None, row_input=None):
        calls.append((int(frames.shape[0]), int(frames.shape[0] if row_input is None else row_input.shape[0])))
        return real(frames, stack, task_index, row_input)

    monkeypatch.setattr(trunk, "forward", forward)
    return calls


async def _warm_up(batcher, tvs, trunk) -> int:
    """The start's warm-up with every version known before it begins (a scan that ended first)."""
    from server.engine.stand_ins import WarmUp

    warming = WarmUp(batcher, trunk)
    return await warming.warm([run for tv in tvs for run in warming.plan.add(tv)])


def test_warmup_gives_each_row_its_own_clip_and_warms_the_shared_prefix(tiny_trunk, tmp_path, monkeypatch):
    """Tasks adapting only the last block: one blank tensor for every row made each warm-up forward a shared-prefix
    forward over one input, so the per-clip shapes serving runs (N inputs) were never warmed."""
    tvs = task_versions(tiny_trunk, tmp_path, [(LAST_BLOCK, 3), (LAST_BLOCK, 4)])
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32), max_rows=4)
    calls = _trunk_calls(tiny_trunk, monkeypatch)
    assert runner.warmup(tvs) == len(calls)
    one_task, mixed, shared = calls[:3], calls[3:5], calls[5:]
    assert one_task == [(1, 1), (2, 2), (4, 4)]  # the fast path, a clip per row
    assert mixed == [(2, 2), (4, 4)]  # the mixed path, a clip per row
    assert shared == [(1, 2), (2, 4)]  # each clip to both tasks: the prefix over half the rows


def test_warmup_of_tasks_adapting_block_0_has_no_shared_prefix_to_warm(tiny_trunk, tmp_path, monkeypatch):
    tvs = task_versions(tiny_trunk, tmp_path, [(HETERO[0][0], 3)] * 2)
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32), max_rows=4)
    calls = _trunk_calls(tiny_trunk, monkeypatch)
    runner.warmup(tvs)
    assert calls == [(1, 1), (2, 2), (4, 4), (2, 2), (4, 4)]


def test_warm_up_frees_the_stand_ins_slots(tiny_trunk, tmp_path):
    """The start-up's warm-up ran zero-weight stand-ins and left them in their device slots: slots held and counted
    as used (``stadapter_adapter_slots{state="used"}``) by versions no request can name, until evicted."""
    import asyncio

    from server.config import ServerConfig
    from server.engine.batcher import Batcher
    tvs = task_versions(tiny_trunk, tmp_path, [(LAST_BLOCK, 3), (LAST_BLOCK, 4), (HETERO[0][0], 5)])
    slots = AdapterSlots(1 << 20, CPU, torch.float32)
    batcher = Batcher(ModelRunner(tiny_trunk, slots, max_rows=4),
                      ServerConfig(model_repository=tmp_path, max_batch_size=4).limits, max_delay_s=0.005)
    assert asyncio.run(_warm_up(batcher, tvs, tiny_trunk)) > 0
    assert slots.used == 0 and slots.resident() == []


def test_a_warm_up_fed_by_the_scan_runs_what_one_over_all_the_versions_runs(tiny_trunk, tmp_path, monkeypatch):
    """The start's warm-up is handed the versions one at a time from the scan's thread while it warms: it runs the
    forwards a warm-up over the whole list runs (two groups, mixed and shared-prefix runs among them), each once,
    returns once the scan has ended, and leaves no stand-in in a slot."""
    import asyncio
    import time

    from server.config import ServerConfig
    from server.engine.batcher import Batcher
    from server.engine.stand_ins import WarmUp

    gelu = AdapterConfig(width=8, pre_attn=True, activation="gelu")  # another batch group
    tvs = task_versions(tiny_trunk, tmp_path, [(LAST_BLOCK, 3), (HETERO[0][0], 5), (gelu, 2), (LAST_BLOCK, 4),
                                               (HETERO[1][0], 3), (gelu, 6)])
    limits = ServerConfig(model_repository=tmp_path, max_batch_size=4).limits

    def batcher() -> Batcher:
        return Batcher(ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32), max_rows=4), limits, 0.005)

    calls = _trunk_calls(tiny_trunk, monkeypatch)
    whole = asyncio.run(_warm_up(batcher(), tvs, tiny_trunk))
    expected, calls[:] = sorted(calls), []

    async def fed_by_a_scan() -> tuple[int, Batcher]:
        b = batcher()
        warming = WarmUp(b, tiny_trunk)

        def scan() -> None:
            for tv in tvs:
                warming.add(tv)
                time.sleep(0.02)

        return await warming.run(asyncio.ensure_future(asyncio.to_thread(scan))), b

    runs, b = asyncio.run(fed_by_a_scan())
    assert (runs, sorted(calls)) == (whole, expected)
    assert whole == len(expected) == 3 + 2 + 2 + 3 + 2  # one-task and mixed per group, one shared-prefix run
    assert b.runner.slots.used == 0 and b.runner.slots.resident() == []
