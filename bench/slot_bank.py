"""Slot-bank bench: a changing task mix, cold tasks on a full bank, one task vs a mixed batch.

    python -m bench.slot_bank [--skip-vitb] [--out bench_slot_bank.json]

Also run by ``python -m bench.serving`` (same figures, in its JSON and table). For each
trunk (the tiny test trunk, ViT-B/16's shape with random weights), on task versions
built in memory as the registry builds them (random weights, no files):

* ``modes``: one batch of ``batch`` clips, one task (the fast path: views of its slot)
  vs 8 tasks mixed with a per-row slot index (``gather``); clips/s of each;
* ``changing_mix``: ``mix_tasks`` (64) registered, every batch a fresh random mix of 8 of
  them, vs a fixed mix of 8 and a one-task batch of the same size (rounds interleaved),
  through the server's runner, twice: ``sized`` (the bank
  holds every registered task: ``--adapter-slots 64``) and ``default_budget``
  (``--cache-bytes`` default, 1 GiB: 37 ViT-B/16 slots); ratio changing/single (goal
  >= 0.95), fixed/single (what mixing costs), changing/fixed (what a changing mix adds)
  and activations per batch;
* ``cold``: ``cold_tasks`` registered on ``cold_slots`` device slots (the budget set to
  exactly that many slots): host bytes per task vs its tensor bytes, device bytes vs
  slots x slot bytes, p50/p99 of a one-clip forward whose task is cold (activated by
  that forward, evicting the least recently used) and of one whose task is resident.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.report import emit_json

MIX = 8  # tasks per mixed batch


def random_versions(trunk, adapter, n: int, num_classes: int = 10, seed: int = 0, frames: int = 2) -> list:
    """``n`` TaskVersions with random host stacks, as ``TaskRegistry.load_version`` builds them (``frames`` per clip)."""
    from server.registry.registry import TaskVersion
    from stadapter import SamplingConfig, TaskSpec
    from stadapter.bank import AdapterStack, expected_shapes

    shapes = expected_shapes(adapter, trunk.dim, trunk.num_blocks, num_classes)
    sampling = SamplingConfig(num_frames=frames, input_size=trunk.image_size)
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        state = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes.items()}
        spec = TaskSpec(name=f"task{k}", labels=tuple(f"c{i}" for i in range(num_classes)), adapter=adapter,
                        sampling=sampling, trunk_fingerprint=trunk.fingerprint)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        out.append(TaskVersion(spec, AdapterStack.from_state_dict(adapter, state, trunk.num_blocks), Path("."), nbytes))
    return out


def _runner(trunk, budget: int, on_event=None, slots: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from server.engine.model import ModelRunner
    from server.engine.slots import AdapterSlots

    return ModelRunner(trunk, AdapterSlots(budget, torch.device(device), dtype, on_event=on_event, slots=slots))


def bench_modes(trunk, tvs: list, batch: int, frames: int, iters: int) -> dict:
    from bench.timing import timed_rounds

    S = trunk.image_size
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(1, frames, 3, S, S, generator=g) for _ in range(batch)]
    single = [(tvs[0], v) for v in views]
    mixed = [(tvs[b % MIX], v) for b, v in enumerate(views)]
    runner = _runner(trunk, 1 << 40)
    t = timed_rounds({"single": lambda: runner.forward(single), "gather": lambda: runner.forward(mixed)}, iters, warmup=1)
    cps = {k: batch / v for k, v in t.items()}
    return {"batch": batch, "frames": frames, "tasks": MIX, "clips_per_s": cps,
            "gather_over_single": cps["gather"] / cps["single"]}


def bench_changing_mix(trunk, tvs: list, batch: int, frames: int, iters: int, budget: int = 1 << 30,
                       slots: int = 0) -> dict:
    """One task vs a fixed mix of 8 vs a fresh random mix of 8 of ``tvs`` every batch, rounds interleaved.

    ``slots``: the bank's fixed slot count (``--adapter-slots``); 0 = sized by ``budget`` (``--cache-bytes``).
    fixed/single is what mixing costs; changing/fixed what a changing mix adds (lookups, activations).
    """
    S = trunk.image_size
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(1, frames, 3, S, S, generator=g) for _ in range(batch)]
    runner = _runner(trunk, budget, slots=slots)
    rng = random.Random(0)

    def changing():
        mix = rng.sample(tvs, MIX)
        return runner.forward([(mix[b % MIX], v) for b, v in enumerate(views)])

    single = [(tvs[0], v) for v in views]
    fixed = [(tvs[b % MIX], v) for b, v in enumerate(views)]
    for tv in tvs:  # steady state: every registered task activated once (those the bank holds stay)
        with runner.slots.lease([tv]):
            pass
    arms = {"single": lambda: runner.forward(single), "fixed": lambda: runner.forward(fixed), "changing": changing}
    for fn in arms.values():  # warm-up: allocator, first-call costs
        fn()
    times: dict[str, list[float]] = {k: [] for k in arms}
    act0 = runner.slots.activations
    acts = {k: 0 for k in arms}
    for _ in range(iters):
        for name, fn in arms.items():
            a0 = runner.slots.activations
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            acts[name] += runner.slots.activations - a0
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # least disturbed by other load on the machine
    return {"batch": batch, "frames": frames, "registered": len(tvs), "tasks_per_batch": MIX,
            "budget_bytes": None if slots else budget, "adapter_slots": slots or None,
            "slots": runner.slots.used + runner.slots.free, "device_bytes": runner.slots.bytes,
            "clips_per_s": {k: batch / v for k, v in med.items()},
            "changing_over_single": med["single"] / med["changing"],
            "fixed_over_single": med["single"] / med["fixed"],
            "changing_over_fixed": med["fixed"] / med["changing"],
            "best_of_rounds": {"changing_over_single": best["single"] / best["changing"],
                               "fixed_over_single": best["single"] / best["fixed"]},
            "activations_per_batch": acts["changing"] / iters,
            "activations_total": runner.slots.activations - act0}


def bench_cold(trunk, tvs: list, slots: int, frames: int, iters: int, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> dict:
    """``device``/``dtype``: where the trunk is and the slots serve (``trunk`` must be there already)."""
    from stadapter.bank import SlotBank, TaskShape

    probe = SlotBank(trunk.dim, "meta", dtype)
    slot_bytes = probe.slot_bytes([TaskShape.of(tv.host_stack) for tv in tvs])
    act_s: list[float] = []
    runner = _runner(trunk, slots * slot_bytes, on_event=lambda e, s: act_s.append(s) if e == "activation" else None,
                     device=device, dtype=dtype)
    S = trunk.image_size
    v = torch.randn(1, frames, 3, S, S, generator=torch.Generator().manual_seed(2))
    for tv in tvs[:slots]:  # fill every slot
        with runner.slots.lease([tv]):
            pass
    runner.forward([(tvs[0], v)])  # warm-up
    act_s.clear()
    cold, warm = [], []
    nxt = slots
    for _ in range(iters):
        tv = tvs[nxt % len(tvs)]  # never resident: LRU order walks the registered tasks
        nxt += 1
        t0 = time.perf_counter()
        runner.forward([(tv, v)])
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        runner.forward([(tv, v)])  # the same task again: resident
        warm.append(time.perf_counter() - t0)

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    host = [tv.host_stack.nbytes for tv in tvs]
    return {"registered": len(tvs), "slots": runner.slots.used + runner.slots.free, "slot_bytes": slot_bytes,
            "device_bytes": runner.slots.bytes, "device_bytes_expected": slots * slot_bytes,
            "host_bytes_per_task": statistics.mean(host), "tensor_bytes_per_task": statistics.mean(tv.nbytes for tv in tvs),
            "host_equals_tensor_bytes": all(h == tv.nbytes for h, tv in zip(host, tvs, strict=True)),
            "evictions": runner.slots.evictions, "iters": iters,
            "cold_forward_ms": {"p50": 1e3 * pct(cold, 0.5), "p99": 1e3 * pct(cold, 0.99)},
            "warm_forward_ms": {"p50": 1e3 * pct(warm, 0.5), "p99": 1e3 * pct(warm, 0.99)},
            "activation_ms": {"p50": 1e3 * pct(act_s, 0.5), "p99": 1e3 * pct(act_s, 0.99)}}


def run(name: str, trunk, adapter, batch: int, frames: int, iters: int, mix_tasks: int, cold_tasks: int,
        cold_slots: int, cold_iters: int) -> dict:
    t0 = time.perf_counter()
    tvs = random_versions(trunk, adapter, max(mix_tasks, cold_tasks))
    out = {"modes": bench_modes(trunk, tvs, batch, frames, iters),
           "changing_mix": {  # a bank sized for the registered tasks (--adapter-slots) and the default budget
               "sized": bench_changing_mix(trunk, tvs[:mix_tasks], batch, frames, iters, slots=mix_tasks),
               "default_budget": bench_changing_mix(trunk, tvs[:mix_tasks], batch, frames, iters)}}
    print(f"[{name}] slot bank: modes and changing mix done", file=sys.stderr)
    out["cold"] = bench_cold(trunk, tvs[:cold_tasks], cold_slots, frames, cold_iters)
    out["seconds"] = time.perf_counter() - t0
    return out


def table(runs: dict) -> str:
    rows = [("trunk", "batch x T", "single c/s", "gather c/s", "gather/single",
             "changing/single (fixed/single) act/batch: sized | 1 GiB", "tasks/slots", "cold p50/p99 ms",
             "warm p50/p99 ms", "activation p50 ms")]
    for name, r in runs.items():
        m, k = r["modes"], r["cold"]
        mix = " | ".join(f"{c['changing_over_single']:.2f} ({c['fixed_over_single']:.2f}) {c['activations_per_batch']:.1f}"
                         f" on {c['slots']}" for c in (r["changing_mix"]["sized"], r["changing_mix"]["default_budget"]))
        rows.append((name, f"{m['batch']}x{m['frames']}", f"{m['clips_per_s']['single']:.1f}",
                     f"{m['clips_per_s']['gather']:.1f}", f"{m['gather_over_single']:.2f}", mix,
                     f"{k['registered']}/{k['slots']}",
                     f"{k['cold_forward_ms']['p50']:.1f}/{k['cold_forward_ms']['p99']:.1f}",
                     f"{k['warm_forward_ms']['p50']:.1f}/{k['warm_forward_ms']['p99']:.1f}",
                     f"{k['activation_ms']['p50']:.2f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def main(argv=None) -> int:
    import tempfile

    from stadapter import AdapterConfig, init_trunk, load_trunk

    p = argparse.ArgumentParser(prog="python -m bench.slot_bank", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny-batch", type=int, default=32)
    p.add_argument("--tiny-iters", type=int, default=20)
    p.add_argument("--skip-vitb", action="store_true")
    p.add_argument("--vitb-batch", type=int, default=8)
    p.add_argument("--vitb-iters", type=int, default=3)
    p.add_argument("--vitb-cold-tasks", type=int, default=72, help="ViT-B/16 tasks for the cold test (27 MB each)")
    p.add_argument("--vitb-cold-iters", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-slots-") as tmp:
        init_trunk("test-vit-tiny", "random", Path(tmp) / "tiny", seed=0)
        runs["tiny"] = run("tiny", load_trunk(Path(tmp) / "tiny"), AdapterConfig(width=8, pre_attn=True, pre_mlp=True),
                           args.tiny_batch, 8, args.tiny_iters, 64, 1000, 64, 200)
        if not args.skip_vitb:
            init_trunk("ViT-B-16", "random", Path(tmp) / "vitb", seed=0)
            runs["vit-b-16"] = run("vit-b-16", load_trunk(Path(tmp) / "vitb"), AdapterConfig(width=384, pre_attn=True),
                                   args.vitb_batch, 2, args.vitb_iters, 64, args.vitb_cold_tasks, 64, args.vitb_cold_iters)
    print(table(runs), file=sys.stderr)
    emit_json(runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
