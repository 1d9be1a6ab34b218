"""The device slot bank: mixed batches through slots, exact device bytes, growth, LRU, retirement, stable ids."""

from __future__ import annotations

import inspect
import shutil
import threading

import pytest
import torch
from factories import HETERO, make_bundle, task_versions

from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots
from server.observability.metrics import Metrics
from server.registry.registry import TaskRegistry, TaskVersion
from stadapter import AdapterConfig
from stadapter.bank import SlotBank, TaskShape

CPU = torch.device("cpu")
def test_mixed_batch_through_the_bank_equals_each_clip_alone(tiny_trunk, tmp_path):
    tvs = task_versions(tiny_trunk, tmp_path)
    g = torch.Generator().manual_seed(0)
    plan = [0, 1, 2, 2, 1, 0, 1]
    clips = [(tvs[k], torch.randn(1 + (i % 2), 4, 3, 32, 32, generator=g)) for i, k in enumerate(plan)]
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32))
    out = runner.forward(clips)
    assert out.tasks == 3 and out.clips == len(clips)
    for (tv, views), p in zip(clips, out.probs, strict=True):
        with torch.no_grad():
            alone = tiny_trunk(views, tv.host_stack).softmax(-1).mean(0)
        assert p.shape == (tv.spec.num_classes,)
        torch.testing.assert_close(p, alone, atol=1e-5, rtol=0)


def test_a_mixed_batch_has_one_path_the_per_row_gather_in_the_clips_order(tiny_trunk, tmp_path):
    """The segment path (clips sorted by task, one GEMM per task) never ran in serving and measured no faster
    than the per-row gather (``python -m bench.slot_bank --mixes`` at 879c848): it went with its mode switch."""
    import stadapter.bank as bank_mod

    assert not hasattr(bank_mod, "Segments") and not hasattr(SlotBank, "segments")
    assert "mixed" not in inspect.signature(ModelRunner).parameters
    tvs = task_versions(tiny_trunk, tmp_path)
    g = torch.Generator().manual_seed(5)
    clips = [(tvs[k], torch.randn(n, 4, 3, 32, 32, generator=g)) for k, n in ((1, 1), (0, 2), (1, 1))]
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32))
    staged = runner.stage(clips)
    try:
        assert not hasattr(staged, "order")  # rows stay in the clips' order
        slot = staged.lease.slots
        assert staged.task_index is not None
        assert staged.task_index.tolist() == [slot[tvs[1].uid], slot[tvs[0].uid], slot[tvs[0].uid], slot[tvs[1].uid]]
    finally:
        staged.release()


def test_bank_logits_equal_alone_in_the_mixed_form(tiny_trunk, tmp_path):
    """Logits, not only probabilities: gather over the padded bank agrees with each task alone."""
    tvs = task_versions(tiny_trunk, tmp_path)
    bank = SlotBank(tiny_trunk.dim, CPU, torch.float32)
    bank.reserve(4, also_fit=[TaskShape.of(tv.host_stack) for tv in tvs])
    for slot, tv in zip((3, 0, 2), tvs, strict=True):
        bank.write(slot, tv.host_stack)
    frames = torch.randn(6, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    slot_of = {3: 0, 0: 1, 2: 2}  # slot -> task
    rows = [3, 3, 0, 2, 2, 2]
    with torch.no_grad():
        gathered = tiny_trunk(frames, bank.stacked(), torch.tensor(rows))
        for b, s in enumerate(rows):
            tv = tvs[slot_of[s]]
            alone = tiny_trunk(frames[b:b + 1], tv.host_stack)[0]
            one = tiny_trunk(frames[b:b + 1], bank.view(s))[0]
            n = tv.spec.num_classes
            torch.testing.assert_close(gathered[b, :n], alone, atol=1e-5, rtol=0)
            assert torch.all(gathered[b, n:] == 0)
            assert torch.equal(one, alone)  # the one-task view is the host stack's own math


def test_one_task_view_is_narrow_views_of_its_slot(tiny_trunk, tmp_path):
    tv = task_versions(tiny_trunk, tmp_path)[2]  # width 4 in a bank padded to 12
    bank = SlotBank(tiny_trunk.dim, CPU, torch.float32)
    bank.reserve(2, also_fit=[TaskShape.of(t.host_stack) for t in task_versions(tiny_trunk, tmp_path)])
    bank.write(1, tv.host_stack)
    view = bank.view(1)
    full = bank.stacked()
    for key, s in view.slots.items():
        assert s.width == 4 and s.kernel == (1, 1, 1)
        assert s.fc1_w.untyped_storage().data_ptr() == full.slots[key].fc1_w.untyped_storage().data_ptr()  # no copy
    assert set(view.slots) == set(tv.host_stack.slots) and view.num_classes == (7,)


def test_device_bytes_are_exact_and_the_bank_grows_in_chunks(tiny_trunk, tmp_path):
    tvs = task_versions(tiny_trunk, tmp_path, [(HETERO[0][0], 3)] * 5)
    probe = SlotBank(tiny_trunk.dim, CPU, torch.float32)
    one = probe.slot_bytes([TaskShape.of(tvs[0].host_stack)])
    assert one == tvs[0].host_stack.nbytes  # a slot of equal-shape tasks is exactly one task's tensors
    slots = AdapterSlots(4 * one, CPU, torch.float32, chunk=3)
    runner = ModelRunner(tiny_trunk, slots)
    v = torch.zeros(1, 4, 3, 32, 32)
    runner.forward([(tvs[0], v)])
    assert (slots.used, slots.free, slots.bytes) == (1, 2, 3 * one)  # one chunk of 3
    runner.forward([(tvs[1], v), (tvs[2], v), (tvs[3], v)])
    assert (slots.used, slots.free, slots.bytes) == (4, 0, 4 * one)  # grown to the budget, not past it
    runner.forward([(tvs[4], v)])  # full: the least recently used (tvs[0]) goes back to host memory
    assert slots.evictions == 1 and not slots.is_resident(tvs[0]) and slots.bytes == 4 * one
    out = runner.forward([(tv, v) for tv in tvs])  # 5 tasks in one batch > 4 slots: grows past the budget
    assert slots.activations == 6 and out.tasks == 5
    assert (slots.used, slots.free, slots.bytes) == (4, 0, 4 * one)  # and shrinks back after the batch
    assert slots.evictions == 2 and not slots.is_resident(tvs[1])  # the least recently used of the five
    again = runner.forward([(tvs[k], v) for k in (3, 0)])  # residents were moved down: still correct
    with torch.no_grad():
        for k, p in zip((3, 0), again.probs, strict=True):
            torch.testing.assert_close(p, tiny_trunk(v, tvs[k].host_stack).softmax(-1).mean(0), atol=1e-5, rtol=0)
    assert slots.activations == 6
    bank_bytes = sum(t.numel() * t.element_size() for b in slots._banks.values()
                     for s in b.stacked().slots.values() for t in s.tensors())
    bank_bytes += sum(b.stacked().head_w.nbytes + b.stacked().head_b.nbytes for b in slots._banks.values())
    assert slots.bytes == bank_bytes


def test_a_wider_task_repads_the_bank_and_keeps_residents_correct(tiny_trunk, tmp_path):
    narrow, wide, _ = task_versions(tiny_trunk, tmp_path)
    narrow2 = task_versions(tiny_trunk, tmp_path, [(AdapterConfig(width=4, kernel=(1, 1, 1), pre_attn=True), 7)])[0]
    slots = AdapterSlots(1 << 20, CPU, torch.float32)
    runner = ModelRunner(tiny_trunk, slots)
    v = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    runner.forward([(narrow2, v)])
    before = slots.bytes
    out = runner.forward([(narrow2, v), (wide, v), (narrow, v)])
    assert slots.bytes > before and slots.activations == 3 and slots.hits == 1
    for tv, p in zip((narrow2, wide, narrow), out.probs, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(p, tiny_trunk(v, tv.host_stack).softmax(-1).mean(0), atol=1e-5, rtol=0)


def test_bank_converts_dtype(tiny_trunk, tmp_path):
    tv = task_versions(tiny_trunk, tmp_path)[0]
    slots = AdapterSlots(1 << 20, CPU, torch.bfloat16, chunk=1)
    with slots.lease([tv]) as lease:
        view = lease.bank.view(lease.slots[tv.uid])
    assert view.head_w.dtype == torch.bfloat16 and slots.bytes == tv.host_stack.nbytes // 2


def test_bad_input_is_refused_with_a_clear_error(tiny_trunk, tmp_path):
    tvs = task_versions(tiny_trunk, tmp_path)
    gelu = task_versions(tiny_trunk, tmp_path, [(AdapterConfig(width=8, activation="gelu"), 3)])[0]
    slots = AdapterSlots(1 << 20, CPU, torch.float32)
    runner = ModelRunner(tiny_trunk, slots)
    with pytest.raises(ValueError, match=r"different adapter activations \['gelu', 'none'\]"):
        runner.forward([(tvs[0], torch.zeros(1, 4, 3, 32, 32)), (gelu, torch.zeros(1, 4, 3, 32, 32))])
    assert slots.used == 0 and not slots._pinned  # nothing half-done is left behind
    out = runner.forward([(gelu, torch.zeros(1, 4, 3, 32, 32))])  # the next batch runs (its own bank)
    assert out.probs[0].shape == (3,)
    bank = SlotBank(tiny_trunk.dim, CPU, torch.float32)
    bank.reserve(1, also_fit=[TaskShape.of(tvs[2].host_stack)])
    with pytest.raises(ValueError, match="does not fit the bank's geometry"):
        bank.write(0, tvs[0].host_stack)
    with pytest.raises(ValueError, match="slot 0 is empty"):
        bank.view(0)
    with pytest.raises(ValueError, match="cannot shrink"):
        bank.reserve(0)
    with pytest.raises(ValueError, match="chunk"):
        AdapterSlots(1, CPU, torch.float32, chunk=0)


def _upload(registry, trunk, tmp_path, name, seed):
    src = make_bundle(trunk, tmp_path / f"src-{name}-{seed}", name=name, seed=seed)
    up = registry.new_upload_dir()
    for f in src.iterdir():
        shutil.copy(f, up / f.name)
    return registry.register_upload(up)


def test_a_retired_version_leaves_the_device_when_its_last_request_ends(two_task_repo, tiny_trunk, tmp_path):
    """Admitted on v1, computed after v2 is published: v1 used to come back into the device cache for good."""
    slots = AdapterSlots(1 << 20, CPU, torch.float32)
    reg = TaskRegistry(two_task_repo, tiny_trunk,
                       on_change=lambda published, retired: [slots.retire(tv) for tv in retired])  # as app.py does
    reg.sync()
    runner = ModelRunner(tiny_trunk, slots)
    v = torch.zeros(1, 4, 3, 32, 32)
    v1 = reg.acquire("alpha")  # admitted
    runner.forward([(v1, v)])  # a first request on v1 made it resident
    other = reg.acquire("alpha")  # a second request admitted on v1
    v2 = _upload(reg, tiny_trunk, tmp_path, "alpha", seed=9)  # v2 published while both are in flight
    assert v1.retired and v2.version == 2
    v1.release()
    runner.forward([(other, v), (reg.tasks["beta"], v)])  # computes after the swap: v1 is activated again
    assert slots.is_resident(v1)  # its request is still running
    other.release()  # the last request on v1 ends
    assert not slots.is_resident(v1) and slots.is_resident(reg.tasks["beta"])
    assert slots.evictions == 0  # a discard, not an eviction
    w = reg.acquire("alpha")
    assert w is v2
    runner.forward([(w, v)])
    w.release()
    assert slots.is_resident(v2)  # the live version stays


def test_a_version_discarded_during_its_forward_is_freed_when_the_forward_ends(tiny_trunk, tmp_path):
    tv = task_versions(tiny_trunk, tmp_path)[0]
    slots = AdapterSlots(1 << 20, CPU, torch.float32)
    with slots.lease([tv]):
        slots.discard(tv)  # from another thread, while the model thread uses the slot
        assert slots.is_resident(tv)
    assert not slots.is_resident(tv) and (slots.used, slots.free) == (0, 8)


def test_every_loaded_version_gets_its_own_id_once_even_across_threads(tiny_trunk, tmp_path):
    base = task_versions(tiny_trunk, tmp_path)[0]
    made: list[TaskVersion] = []
    lock = threading.Lock()

    def build():
        for _ in range(200):
            tv = TaskVersion(base.spec, base.host_stack, base.path, base.nbytes)
            with lock:
                made.append(tv)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = [tv.uid for tv in made]
    assert len(set(uids)) == len(uids) == 800
    assert made[0].uid == made[0].uid  # assigned at construction, not on first use


def test_slot_metrics_move(tiny_trunk, tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    tvs = task_versions(tiny_trunk, tmp_path, [(HETERO[0][0], 3)] * 3)
    m = Metrics(CPU)
    slots = AdapterSlots(2 * tvs[0].host_stack.nbytes, CPU, torch.float32, on_event=m.adapter_event)
    m.watch_slots(lambda: slots.used, lambda: slots.free, lambda: slots.bytes)
    runner = ModelRunner(tiny_trunk, slots)
    v = torch.zeros(1, 4, 3, 32, 32)
    for tv in (tvs[0], tvs[1], tvs[0], tvs[2]):
        runner.forward([(tv, v)])
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in f.samples}
    assert got[("stadapter_adapter_activations_total", ())] == 3
    assert got[("stadapter_adapter_hits_total", ())] == 1
    assert got[("stadapter_adapter_evictions_total", ())] == 1
    assert got[("stadapter_adapter_activation_seconds_count", ())] == 3
    assert got[("stadapter_adapter_slots", (("state", "used"),))] == 2
    assert got[("stadapter_adapter_slots", (("state", "free"),))] == 0
    assert got[("stadapter_adapter_device_bytes", ())] == 2 * tvs[0].host_stack.nbytes


def test_warmup_runs_every_batch_size_bucket_up_to_the_maximum(tiny_trunk, tmp_path):
    tvs = task_versions(tiny_trunk, tmp_path, [(HETERO[0][0], 3)] * 2)
    seen = []
    for max_rows, want in ((6, (1, 2, 4, 6)), (8, (1, 2, 4, 8)), (1, (1,))):
        runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32), max_rows=max_rows)
        assert runner.batch_buckets() == want
        real, seen = runner.forward, []
        runner.forward = lambda clips, seen=seen, real=real: seen.append((len(clips), len({tv.uid for tv, _ in clips}))) or real(clips)
        assert runner.warmup(tvs) == len(seen)
        assert seen == [(n, 1) for n in want] + [(n, 2) for n in want if n >= 2]


def test_one_copy_back_per_batch_and_probabilities_per_clip(tiny_trunk, tmp_path):
    tvs = task_versions(tiny_trunk, tmp_path)
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32))
    copies = []
    real = runner._to_host
    runner._to_host = lambda t: copies.append(tuple(t.shape)) or real(t)
    g = torch.Generator().manual_seed(3)
    clips = [(tvs[k], torch.randn(v, 4, 3, 32, 32, generator=g)) for k, v in ((0, 3), (2, 1), (1, 2), (0, 1))]
    out = runner.forward(clips)
    assert copies == [(4, 7)]  # one [clips, C_max] tensor for the whole batch
    for (tv, views), p in zip(clips, out.probs, strict=True):
        assert p.dtype == torch.float32 and p.shape == (tv.spec.num_classes,)
        torch.testing.assert_close(p.sum(), torch.tensor(1.0), atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(p, tiny_trunk(views, tv.host_stack).softmax(-1).mean(0), atol=1e-5, rtol=0)


def test_the_slot_bank_bench_runs(tiny_trunk):
    from bench import slot_bank

    r = slot_bank.run("tiny", tiny_trunk, AdapterConfig(width=8, pre_attn=True, pre_mlp=True), batch=4, frames=4,
                      iters=1, mix_tasks=10, cold_tasks=12, cold_slots=4, cold_iters=3)
    assert set(r["modes"]["clips_per_s"]) == {"single", "gather"}
    sized, default = r["changing_mix"]["sized"], r["changing_mix"]["default_budget"]
    assert sized["registered"] == default["registered"] == 10 and sized["changing_over_single"] > 0
    assert set(sized["clips_per_s"]) == {"single", "fixed", "changing"}
    assert (sized["adapter_slots"], sized["slots"], sized["activations_per_batch"]) == (10, 10, 0)  # all resident
    assert (default["adapter_slots"], default["budget_bytes"]) == (None, 1 << 30)
    cold = r["cold"]
    assert cold["slots"] == 4 and cold["device_bytes"] == cold["device_bytes_expected"] == 4 * cold["slot_bytes"]
    assert cold["host_equals_tensor_bytes"] and cold["evictions"] == 3
    assert "gather/single" in slot_bank.table({"tiny": r})
