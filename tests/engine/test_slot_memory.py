"""The device slot bank against the device's free memory, checked on CPU with ``torch.cuda.mem_get_info`` replaced.

A fixed slot count (``--adapter-slots``) that cannot fit is refused when the server starts, naming the flag,
instead of failing inside the staging of every batch; a byte budget is capped by what the free memory allows.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from factories import make_bundle, task_versions

from server.app import Server
from server.config import ServerConfig
from server.engine import slots as slots_module
from server.engine.slots import BANK_SHARE, AdapterSlots, SlotMemoryError
from stadapter import AdapterConfig
from stadapter.bank import SlotBank, TaskShape

CUDA = torch.device("cuda", 0)
CFG = AdapterConfig(width=8, pre_attn=True, pre_mlp=True)
MiB = 1 << 20


def _free(monkeypatch, free: int) -> list[object]:
    """The device has ``free`` bytes free; returns the devices asked about."""
    asked: list[object] = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (free, 80 << 30))
    return asked


def _slot_bytes(trunk, tv, dtype=torch.float16) -> int:
    return SlotBank(trunk.dim, "meta", dtype).slot_bytes([TaskShape.of(tv.host_stack)])


def test_a_byte_budget_on_cuda_is_capped_by_the_free_memory(monkeypatch):
    asked = _free(monkeypatch, 512 * MiB)
    slots = AdapterSlots(1 << 30, CUDA, torch.float16)
    assert asked == [CUDA]
    assert slots.budget == int(512 * MiB * BANK_SHARE) // 2  # the bank and its copy during a reserve fit the share
    _free(monkeypatch, 80 << 30)
    assert AdapterSlots(1 << 30, CUDA, torch.float16).budget == 1 << 30  # room enough: the budget given


def test_slots_that_cannot_fit_are_refused_naming_the_flag_and_how_many_fit(tiny_trunk, tmp_path, monkeypatch):
    tvs = task_versions(tiny_trunk, tmp_path, [(CFG, 3), (CFG, 5)])
    per = SlotBank(tiny_trunk.dim, "meta", torch.float16).slot_bytes([TaskShape.of(tv.host_stack) for tv in tvs])
    free = 100 * 2 * per * 2  # BANK_SHARE of it holds 100 slots and the bank once more
    _free(monkeypatch, free)
    AdapterSlots(0, CUDA, torch.float16, slots=100).check_fits(tvs)
    with pytest.raises(SlotMemoryError) as e:
        AdapterSlots(0, CUDA, torch.float16, slots=101).check_fits(tvs)
    msg = str(e.value)
    assert "--adapter-slots 101" in msg and "at most 100 slots fit" in msg and str(free) in msg, msg


def test_a_first_task_after_start_on_too_many_slots_is_refused_before_allocating(tiny_trunk, tmp_path, monkeypatch):
    """No task at start: the first lease refuses with the same message (it used to try the device allocation)."""
    (tv,) = task_versions(tiny_trunk, tmp_path, [(CFG, 3)])
    _free(monkeypatch, 10 * MiB)
    slots = AdapterSlots(0, CUDA, torch.float16, slots=10 * MiB // _slot_bytes(tiny_trunk, tv))
    with pytest.raises(SlotMemoryError, match="--adapter-slots"):
        slots.lease([tv])
    assert slots.bytes == 0 and not slots._pinned


def test_the_server_refuses_to_start_with_slots_the_device_cannot_hold(tiny_trunk, two_task_repo, monkeypatch):
    """The start path asks the slots to check the registered tasks (here on CPU, its free memory replaced)."""
    make_bundle(tiny_trunk, two_task_repo / "tasks" / "gamma" / "1", name="gamma", seed=3)
    monkeypatch.setattr(slots_module, "free_device_bytes", lambda device: 1 * MiB)
    cfg = ServerConfig(model_repository=str(two_task_repo), device="cpu", adapter_slots=100_000,
                       decode_backend="thread", warmup=False, poll_interval_s=0)
    with pytest.raises(SlotMemoryError, match="--adapter-slots 100000"):
        asyncio.run(Server.start(cfg))
