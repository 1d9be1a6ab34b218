"""The host tier (server.registry.host_tier): single-flight loads, a byte-bounded LRU that never evicts a version a
request holds or a pinned task, bad bundles taken out of service; and the registry's scan that reads no weights."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from factories import make_bundle

from server.errors import BrokenTask, TaskNotFound
from server.registry import loading
from server.registry.host_tier import HostTier
from server.registry.registry import TaskRegistry
from server.registry.version import TaskVersion
from stadapter.bundle import ADAPTER_FILE


class Disk:
    """A loader that counts its reads and can be held or made to fail."""

    def __init__(self, loaded: dict[str, TaskVersion]):
        self.stacks = {name: tv.stack for name, tv in loaded.items()}
        self.reads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[str] = set()

    def __call__(self, tv: TaskVersion):
        self.reads.append(tv.name)
        assert self.gate.wait(10)
        if tv.name in self.fail:
            raise BrokenTask(f"task {tv.name} version {tv.version} cannot be served: broken")
        return self.stacks[tv.name]


@pytest.fixture()
def stacks(two_task_repo, tiny_trunk):
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    return {name: reg.load_version(tv.path) for name, tv in reg.tasks.items()}


def cold(tier: HostTier, loaded, name: str) -> TaskVersion:
    """A version of ``name`` with its weights on disk only, loaded through ``tier``."""
    return TaskVersion(loaded[name].spec, None, Path(name), loaded[name].nbytes, source=tier)


def test_concurrent_first_requests_for_one_cold_version_share_one_load(stacks):
    disk = Disk(stacks)
    tier = HostTier(disk)
    tv = cold(tier, stacks, "alpha")
    disk.gate.clear()

    async def go():
        waiters = [asyncio.ensure_future(tier.ensure(tv)) for _ in range(8)]
        await asyncio.sleep(0.05)
        assert tv.stack is None  # none half-published while the load runs
        disk.gate.set()
        await asyncio.gather(*waiters)

    asyncio.run(go())
    assert disk.reads == ["alpha"] and tier.loads == 1 and tv.stack is stacks["alpha"].stack
    assert tv.host_stack is stacks["alpha"].stack and disk.reads == ["alpha"]  # resident: not read again


def test_a_cancelled_waiter_does_not_cancel_the_load_the_others_wait_for(stacks):
    disk = Disk(stacks)
    tier = HostTier(disk)
    tv = cold(tier, stacks, "alpha")
    disk.gate.clear()

    async def go():
        first = asyncio.ensure_future(tier.ensure(tv))
        second = asyncio.ensure_future(tier.ensure(tv))
        await asyncio.sleep(0.05)
        first.cancel()
        disk.gate.set()
        await second

    asyncio.run(go())
    assert disk.reads == ["alpha"] and tv.stack is stacks["alpha"].stack


def test_the_lru_evicts_beyond_its_budget_but_never_a_held_version_or_a_pinned_task(stacks):
    disk = Disk(stacks)
    budget = stacks["alpha"].nbytes  # room for one task
    tier = HostTier(disk, budget)
    a, b = cold(tier, stacks, "alpha"), cold(tier, stacks, "beta")
    tier.load_now(a)
    tier.load_now(b)  # a is idle: it goes
    assert a.stack is None and b.stack is not None and tier.evictions == 1 and tier.bytes == b.nbytes
    b.acquire()  # a request holds b
    tier.load_now(a)
    assert a.stack is not None and b.stack is not None and tier.bytes > budget  # over budget: b is held
    b.release()
    tier.trim()
    assert b.stack is None and a.stack is not None and tier.bytes <= budget
    assert disk.reads == ["alpha", "beta", "alpha"]

    pinned = HostTier(Disk(stacks), budget, pinned=["alpha"])
    a, b = cold(pinned, stacks, "alpha"), cold(pinned, stacks, "beta")
    pinned.load_now(a)
    pinned.load_now(b)
    pinned.trim()
    assert a.stack is not None and b.stack is None  # alpha pinned: beta is what goes


def test_a_failed_load_fails_every_waiter_takes_the_version_out_once_and_is_not_retried(stacks):
    disk = Disk(stacks)
    out: list = []
    tier = HostTier(disk, on_broken=lambda tv, e: out.append(tv.name))
    tv = cold(tier, stacks, "alpha")
    disk.fail.add("alpha")
    disk.gate.clear()

    async def go():
        waiters = [asyncio.ensure_future(tier.ensure(tv)) for _ in range(4)]
        await asyncio.sleep(0.05)
        disk.gate.set()
        return await asyncio.gather(*waiters, return_exceptions=True)

    results = asyncio.run(go())
    assert all(isinstance(r, BrokenTask) and "alpha" in str(r) for r in results), results
    assert out == ["alpha"] and disk.reads == ["alpha"] and tv.stack is None and tier.bytes == 0
    with pytest.raises(BrokenTask):
        tier.load_now(tv)  # remembered: no second read
    assert disk.reads == ["alpha"]


# --- the registry over the tier ------------------------------------------------------------------------


def corrupt(folder: Path) -> None:
    (folder / ADAPTER_FILE).write_bytes(b"not safetensors at all")


def test_the_scan_reads_no_weights_and_a_corrupt_bundle_fails_on_first_use(two_task_repo, tiny_trunk, monkeypatch):
    reads: list[str] = []
    real = loading.load_bundle
    monkeypatch.setattr(loading, "load_bundle", lambda path, *a: reads.append(Path(path).parent.name) or real(path, *a))
    corrupt(two_task_repo / "tasks" / "alpha" / "1")
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    assert sorted(reg.tasks) == ["alpha", "beta"] and reads == []  # both known, nothing read
    assert all(tv.stack is None for tv in reg.tasks.values())
    alpha = reg.acquire("alpha")
    with pytest.raises(BrokenTask, match="task alpha version 1 cannot be served.*not a readable safetensors"):
        asyncio.run(reg.ensure_loaded(alpha))
    alpha.release()
    assert "alpha" not in reg.tasks and alpha.retired  # out of service, nothing older to serve
    with pytest.raises(TaskNotFound, match="version 1 on disk cannot be served"):
        reg.get("alpha")
    beta = reg.acquire("beta")
    asyncio.run(reg.ensure_loaded(beta))  # the other task is served
    beta.release()
    assert beta.stack is not None and reads == ["alpha", "beta"]
    reg.sync()  # the bad folder is not read again by the next scan
    assert "alpha" not in reg.tasks and reads == ["alpha", "beta"]


def test_a_bad_newest_version_falls_back_to_the_previous_good_one(two_task_repo, tiny_trunk):
    make_bundle(tiny_trunk, two_task_repo / "tasks" / "alpha" / "2", name="alpha", version=2, seed=5)
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    corrupt(two_task_repo / "tasks" / "alpha" / "2")  # after the scan: the server started, then the disk went bad
    v2 = reg.acquire("alpha")
    assert v2.version == 2
    with pytest.raises(BrokenTask):
        asyncio.run(reg.ensure_loaded(v2))
    v2.release()
    v1 = reg.acquire("alpha")
    assert v1.version == 1
    asyncio.run(reg.ensure_loaded(v1))
    v1.release()
    assert v1.stack is not None
    reg.sync()
    assert reg.tasks["alpha"] is v1  # the bad version stays out


def test_a_retired_version_leaves_host_memory_when_its_last_request_ends(two_task_repo, tiny_trunk):
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    v1 = reg.acquire("alpha")
    asyncio.run(reg.ensure_loaded(v1))
    make_bundle(tiny_trunk, two_task_repo / "tasks" / "alpha" / "2", name="alpha", version=2, seed=5)
    reg.sync()
    assert v1.retired and v1.stack is not None  # a request still holds it: it finishes on its version
    v1.release()
    assert v1.stack is None and not reg.host.is_resident(v1)


def test_a_host_dtype_holds_every_load_in_it_and_counts_the_bytes_it_holds(two_task_repo, tiny_trunk, tmp_path):
    """``--host-dtype serving`` on a bfloat16 server: first-use loads, registers and pinned older versions all
    keep bfloat16 copies, and the budget counts their bytes (half the float32 ones), not the files'."""
    def loaded(reg: TaskRegistry) -> list[TaskVersion]:
        reg.sync()
        tvs = [reg.acquire(name) for name in ("alpha", "beta")]
        for tv in tvs:
            reg.host.load_now(tv)
            tv.release()
        return tvs

    as_stored = TaskRegistry(two_task_repo, tiny_trunk)
    fp32 = loaded(as_stored)
    halved = TaskRegistry(two_task_repo, tiny_trunk, host_dtype=torch.bfloat16)
    bf16 = loaded(halved)
    assert halved.host.bytes == as_stored.host.bytes // 2 > 0
    for a, b in zip(fp32, bf16, strict=True):
        assert a.nbytes == b.nbytes  # the task's own size (TaskInfo.adapter_bytes) is the bundle's
        assert {t.dtype for t in tensors(b.host_stack)} == {torch.bfloat16}
        assert all(torch.equal(x.to(torch.bfloat16), y) for x, y in zip(tensors(a.host_stack), tensors(b.host_stack),
                                                                          strict=True))
    upload = halved.new_upload_dir()
    make_bundle(tiny_trunk, tmp_path / "up", name="alpha", seed=9)
    for f in (tmp_path / "up").iterdir():
        (upload / f.name).write_bytes(f.read_bytes())
    registered = halved.register_upload(upload)
    assert registered.version == 2 and {t.dtype for t in tensors(registered.host_stack)} == {torch.bfloat16}
    pinned = halved.get("alpha@1")  # the older version, read again for a pinned request
    assert {t.dtype for t in tensors(pinned.host_stack)} == {torch.bfloat16}


def tensors(stack) -> list[torch.Tensor]:
    return [t for s in stack.slots.values() for t in s.tensors()] + [stack.head_w, stack.head_b]
