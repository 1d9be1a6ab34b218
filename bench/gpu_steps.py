"""The model-side steps of ``python -m bench.gpu_check`` (see there), each a function of one :class:`Rig`.

A step returns its figures as a dict, raises :class:`Skip` when it cannot run here (no CUDA), and raises
anything else when it fails (a result outside its tolerance is an ``AssertionError`` naming both numbers).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from bench.slot_bank import bench_cold, random_versions
from bench.timing import timed_rounds
from server.config import ServerConfig
from server.engine.batcher import Batcher
from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots, SlotMemoryError
from stadapter import AdapterConfig, TaskAdapters

CPU = torch.device("cpu")
BUDGET = 1 << 32  # slot bytes for the checks' runners (on CUDA capped by the free memory)


class Skip(Exception):
    """The step cannot run here; its message says why ("no CUDA")."""


@dataclass(frozen=True)
class Shape:
    """What the check runs on: a trunk config, its tasks and its batch sizes."""

    model: str
    frames: int
    full_tasks: int  # adapters in every block
    last_tasks: int  # adapters in the last ``last_blocks`` blocks only (their clips can share the prefix)
    last_blocks: int
    width: int
    batches: tuple[int, ...]
    iters: int  # timed calls per figure
    warmup: int  # untimed calls before them (the dry run times every call once, cold: its figures mean nothing)
    h2d_bytes: int


SHAPES = {
    "vitb": Shape("ViT-B-16", 8, 6, 2, 4, 384, (1, 8, 32), 5, 1, 256 << 20),
    "tiny": Shape("test-vit-tiny", 4, 1, 2, 1, 8, (1, 2, 4), 1, 0, 1 << 20),
}


@dataclass
class Rig:
    """The trunk (float32 and the serving dtype, on the device; float32 on CPU for references) and the tasks."""

    shape: Shape
    device: torch.device
    dtype: torch.dtype  # serving dtype
    trunk: Any  # float32, on the device
    serve_trunk: Any  # ``dtype``, on the device
    cpu_trunk: Any  # float32, on CPU
    tvs: list
    last: list  # the tasks adapting only the last blocks
    trunk_dir: Any  # the trunk folder (another dtype is loaded from it)
    peak_flops: dict = field(default_factory=dict)  # dtype name -> the device's peak FLOP/s (given or from its name)
    cache: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def views(self, n: int, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        S = self.trunk.image_size
        return [torch.randn(1, self.shape.frames, 3, S, S, generator=g) for _ in range(n)]

    def mixed_clips(self, seed: int = 0) -> list:
        """A clip per task, and one more clip given to both last-block tasks (one request naming both)."""
        own = self.views(len(self.tvs) + 1, seed)
        return [(tv, v) for tv, v in zip(self.tvs, own[:-1], strict=True)] + [(tv, own[-1]) for tv in self.last[:2]]

    def shared_clips(self, seed: int = 1) -> list:
        """The last-block tasks alone: one clip given to both (their rows share its prefix), one to the first."""
        a, b = self.views(2, seed)
        return [(self.last[0], a), (self.last[1], a), (self.last[0], b)]

    def runner(self, trunk: Any, dtype: torch.dtype, device: torch.device | None = None, **kw) -> ModelRunner:
        return ModelRunner(trunk, AdapterSlots(BUDGET, device or self.device, dtype), **kw)


def make_rig(shape: Shape, device: torch.device, dtype: torch.dtype, trunk_dir) -> Rig:
    from stadapter import load_trunk

    trunk = load_trunk(trunk_dir, device=device)
    serve = trunk if dtype == torch.float32 else load_trunk(trunk_dir, device=device, dtype=dtype)
    cpu = trunk if device.type == "cpu" else load_trunk(trunk_dir)
    full = AdapterConfig(width=shape.width, pre_attn=True, pre_mlp=True)
    last = AdapterConfig(width=shape.width, pre_attn=True, pre_mlp=True, layers=shape.last_blocks)
    tvs = random_versions(trunk, full, shape.full_tasks, seed=1, frames=shape.frames)
    tail = random_versions(trunk, last, shape.last_tasks, seed=2, frames=shape.frames)
    return Rig(shape, device, dtype, trunk, serve, cpu, tvs + tail, tail, trunk_dir)


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _within(name: str, diff: float, tol: float) -> None:
    if not diff <= tol:
        raise AssertionError(f"{name}: max abs difference {diff:.3g} is over the tolerance {tol:g}")


@contextlib.contextmanager
def no_tf32():
    """float32 as float32 on CUDA: cuDNN convolutions may use TF32 by default (their batch size picks the kernel)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cpu_reference(rig: Rig, name: str) -> list[Tensor]:
    """The probabilities of batch ``name`` (:func:`batches`) on CPU in float32 (computed once)."""
    if name not in rig.cache:
        rig.cache[name] = rig.runner(rig.cpu_trunk, torch.float32, CPU).forward(batches(rig)[name]).probs
    return rig.cache[name]


def batches(rig: Rig) -> dict[str, list]:
    return {"all_tasks": rig.mixed_clips(), "shared_prefix": rig.shared_clips()}


def mixed_logits(rig: Rig) -> dict:
    """Every task in one batch, and the last-block tasks sharing a clip's prefix (float32, the device), vs each
    clip alone and vs CPU float32."""
    out: dict[str, Any] = {}
    runner = rig.runner(rig.trunk, torch.float32)
    for name, clips in batches(rig).items():
        with no_tf32(), torch.inference_mode():
            got = runner.forward(clips)
            alone = [rig.trunk(v.to(rig.device), tv.host_stack.to(rig.device)).softmax(-1).mean(0).cpu()
                     for tv, v in clips]
        vs_alone, vs_cpu = _max_diff(got.probs, alone), _max_diff(got.probs, cpu_reference(rig, name))
        _within(f"{name}: mixed vs alone", vs_alone, 1e-4)
        _within(f"{name}: device vs CPU", vs_cpu, 1e-4)
        out[name] = {"clips": len(clips), "tasks": got.tasks, "shared_rows": got.shared_rows,
                     "max_abs_vs_alone": vs_alone, "max_abs_vs_cpu_fp32": vs_cpu}
    if out["shared_prefix"]["shared_rows"] != 1:
        raise AssertionError(f"the shared-prefix batch shared {out['shared_prefix']['shared_rows']} rows, not 1")
    return out


def staging_stress(rig: Rig, count: int = 6, delay_s: float = 0.005, gpu_cycles: int = 20_000_000) -> dict:
    """The next batch staged on another thread while one computes, each side-stream copy delayed (a host sleep,
    and on CUDA a kernel that spins on the side stream first): the results equal running them one by one."""
    work = [(rig.mixed_clips if i % 2 else rig.shared_clips)(seed=10 + i) for i in range(count)]
    runner = rig.runner(rig.trunk, torch.float32)
    sequential = [runner.forward(b).probs for b in work]
    real = runner._to_device

    def delayed(inputs: list[Tensor]) -> Tensor:
        time.sleep(delay_s)
        if rig.cuda:
            torch.cuda._sleep(gpu_cycles)  # on the side stream: the copy below lands late
        return real(inputs)

    runner._to_device = delayed  # type: ignore[method-assign]
    overlapped = []
    with ThreadPoolExecutor(1, thread_name_prefix="stage") as stager:
        nxt = stager.submit(runner.stage, work[0])
        for i in range(count):
            staged = nxt.result()
            if i + 1 < count:
                nxt = stager.submit(runner.stage, work[i + 1])
            overlapped.append(runner.run(staged).probs)
    diff = max(_max_diff(a, b) for a, b in zip(sequential, overlapped, strict=True))
    _within("staged vs sequential", diff, 1e-6)
    return {"batches": count, "side_stream": rig.cuda, "max_abs_vs_sequential": diff}


def activation_order(rig: Rig, gpu_cycles: int = 1_000_000_000) -> dict:
    """A one-slot bank (float32): task b is staged, evicting a, while a's forward still waits behind a delay on the
    compute stream, and b's write is itself held back by a delay on the side stream. Both results equal each task
    alone (b's write waited for a's forward, b's forward for b's write), b's staging did not wait for a's forward,
    and b's activation time is its copy's, not the delays'."""
    if not rig.cuda:
        raise Skip("no CUDA")
    a, b = rig.tvs[0], rig.tvs[1]
    v = rig.views(1, 60)[0]
    with no_tf32():
        want = [rig.runner(rig.trunk, torch.float32).forward([(tv, v)]).probs[0] for tv in (a, b)]
    t0 = time.perf_counter()
    torch.cuda._sleep(gpu_cycles)
    rig.sync()
    delay_s = time.perf_counter() - t0
    told: list[float] = []
    slots = AdapterSlots(0, rig.device, torch.float32, slots=1, on_event=lambda e, s: told.append(s) if e == "activation" else None)
    runner = ModelRunner(rig.trunk, slots)
    runner.forward([(a, v)])  # a in the slot, first calls warm
    real, held = runner._to_host, {}

    def stage_b_first(t: Tensor) -> Tensor:  # a's lease has ended, its forward is queued behind the delay
        if not held:
            with torch.cuda.stream(runner._side_stream()):
                torch.cuda._sleep(gpu_cycles)  # b's write lands late
            t0 = time.perf_counter()
            held["b"] = runner.stage([(b, v)])
            held["stage_s"] = time.perf_counter() - t0
        return real(t)

    runner._to_host = stage_b_first  # type: ignore[method-assign]
    with no_tf32():
        staged_a = runner.stage([(a, v)])
        torch.cuda._sleep(gpu_cycles)  # on the compute stream: a's forward runs late
        got_a = runner.run(staged_a).probs[0]
        got_b = runner.run(held["b"]).probs[0]
    diffs = {"a": _max_diff([got_a], [want[0]]), "b": _max_diff([got_b], [want[1]])}
    for name, d in diffs.items():
        _within(f"task {name} beside the other's activation", d, 1e-5)
    if not held["stage_s"] < delay_s / 2:
        raise AssertionError(f"staging b took {held['stage_s']:.3f} s: it waited for a's forward ({delay_s:.3f} s delay)")
    if not told or not 0 < told[-1] < delay_s:
        raise AssertionError(f"b's activation time {told[-1:]} is not its copy's alone (the delays are {delay_s:.3f} s)")
    host = {k: v for k, v in torch.cuda.host_memory_stats().items() if "bytes" in k}  # the pinned staging's cost
    return {"max_abs_vs_alone": diffs, "delay_s": delay_s, "stage_b_s": held["stage_s"], "activation_s": told[-1],
            "slot_bytes": slots.bytes, "pinned_host_bytes": host}


def sync_audit(rig: Rig) -> dict:
    """Synchronising CUDA calls per batch (``torch.cuda.set_sync_debug_mode``): one each, the copy back."""
    if not rig.cuda:
        raise Skip("no CUDA")
    runner = rig.runner(rig.serve_trunk, rig.dtype)
    kinds = {"mixed": rig.mixed_clips(seed=20), "one_task": [(rig.tvs[0], v) for v in rig.views(4, 21)],
             "shared_prefix": [(tv, v) for v in rig.views(2, 22) for tv in rig.last[:2]]}
    for clips in kinds.values():
        runner.forward(clips)  # warm: activations and first calls are not what is audited
    syncs = {}
    for name, clips in kinds.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                runner.forward(clips)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs[name] = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    counts = {k: len(v) for k, v in syncs.items()}
    if any(n > 1 for n in counts.values()):
        raise AssertionError(f"more than one synchronisation per batch: {counts}; first: {syncs}")
    return {"syncs_per_batch": counts}


def h2d_bandwidth(rig: Rig) -> dict:
    """Host-to-device GB/s from pinned and pageable memory, uint8 and float32 (the same pixels: 4x the bytes)."""
    if not rig.cuda:
        raise Skip("no CUDA")
    out = {}
    pixels = rig.shape.h2d_bytes // 4
    for dtype in (torch.uint8, torch.float32):
        dst = torch.empty(pixels, dtype=dtype, device=rig.device)
        for pinned in (True, False):
            src = torch.ones(pixels, dtype=dtype).pin_memory() if pinned else torch.ones(pixels, dtype=dtype)

            def copy(src=src, dst=dst):
                dst.copy_(src, non_blocking=True)
                rig.sync()

            t = timed_rounds({"copy": copy}, rig.shape.iters, warmup=rig.shape.warmup)["copy"]
            nbytes = src.numel() * src.element_size()
            out[f"{'pinned' if pinned else 'pageable'}_{str(dtype).split('.')[1]}"] = {
                "GB_per_s": nbytes / t / 1e9, "Gpixels_per_s": pixels / t / 1e9, "bytes": nbytes}
    return out


def _batcher_rate(runner: ModelRunner, clips: list, rows: int, rounds: int) -> float:
    """Clips/s of ``rounds`` x the clips submitted at once to the real batcher (batches of ``rows`` rows)."""

    async def main() -> float:
        b = Batcher(runner, ServerConfig(model_repository=".", max_batch_size=rows).limits, max_delay_s=0.002)
        b.start()
        try:
            await asyncio.gather(*(b.submit(tv, v, None) for tv, v in clips))  # warm
            t0 = time.perf_counter()
            await asyncio.gather(*(b.submit(tv, v, None) for _ in range(rounds) for tv, v in clips))
            return rounds * len(clips) / (time.perf_counter() - t0)
        finally:
            await b.close()

    return asyncio.run(main())


def throughput(rig: Rig) -> dict:
    """Clips/s (the serving dtype) at each batch size: one task and mixed, raw forwards and through the batcher."""
    runner = rig.runner(rig.serve_trunk, rig.dtype)
    out: dict[str, Any] = {"dtype": str(rig.dtype).split(".")[1], "frames": rig.shape.frames}
    for n in rig.shape.batches:
        views = rig.views(n, 30 + n)
        arms = {"single": [(rig.tvs[0], v) for v in views],
                "mixed": [(rig.tvs[i % len(rig.tvs)], v) for i, v in enumerate(views)]}
        fns = {k: (lambda c=c: runner.forward(c)) for k, c in arms.items()}
        raw = timed_rounds(fns, rig.shape.iters, warmup=rig.shape.warmup)
        out[f"batch_{n}"] = {
            "raw_clips_per_s": {k: n / t for k, t in raw.items()},
            "batcher_clips_per_s": {k: _batcher_rate(runner, c, n, rig.shape.iters) for k, c in arms.items()}}
    return out


def cold_slots(rig: Rig) -> dict:
    """A bank of half the tasks' slots, every forward's task cold (activated, evicting); too many slots refused."""
    slots = max(1, len(rig.tvs) // 2)
    out = bench_cold(rig.serve_trunk, rig.tvs, slots, rig.shape.frames, 2 * len(rig.tvs), str(rig.device), rig.dtype)
    if out["evictions"] < 1:
        raise AssertionError(f"no eviction on {slots} slots for {len(rig.tvs)} tasks")
    if rig.cuda:
        try:
            AdapterSlots(0, rig.device, rig.dtype, slots=1 << 24).check_fits(rig.tvs)
            raise AssertionError("--adapter-slots 16777216 was not refused")
        except SlotMemoryError as e:
            out["too_many_slots_refused"] = str(e)
    else:
        out["too_many_slots_refused"] = "skipped: no CUDA"
    return out


def fp16(rig: Rig) -> dict:
    """The mixed batch served in float16 vs CPU float32."""
    if not rig.cuda:
        raise Skip("no CUDA")
    from stadapter import load_trunk

    trunk = rig.serve_trunk if rig.dtype == torch.float16 else load_trunk(rig.trunk_dir, device=rig.device,
                                                                           dtype=torch.float16)
    runner = rig.runner(trunk, torch.float16)
    out = {}
    for name, clips in batches(rig).items():
        diff = _max_diff(runner.forward(clips).probs, cpu_reference(rig, name))
        _within(f"{name}: float16 vs CPU float32", diff, 3e-2)
        out[name] = {"max_abs_vs_cpu_fp32": diff}
    return out


def bf16_train_step(rig: Rig, clips: int = 4, steps: int = 3) -> dict:
    """A task's adapters trained a few steps under bfloat16 autocast on the float32 trunk: finite, the trunk frozen."""
    cfg = AdapterConfig(width=rig.shape.width, pre_attn=True, pre_mlp=True)
    torch.manual_seed(0)
    ta = TaskAdapters(cfg, rig.trunk.dim, rig.trunk.num_blocks, 10).to(rig.device)
    opt = torch.optim.AdamW(ta.parameters(), lr=1e-3)
    x = torch.stack(rig.views(clips, 40)).squeeze(1).to(rig.device)  # [B, T, 3, S, S]
    y = torch.arange(clips, device=rig.device) % 10
    losses, times = [], []
    if rig.cuda:
        torch.cuda.reset_peak_memory_stats(rig.device)
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast(rig.device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(rig.trunk(x, ta.stack()).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rig.sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    grads = [p.grad for p in ta.parameters()]
    if not all(torch.isfinite(torch.tensor(losses))) or any(g is None or not bool(torch.isfinite(g).all()) for g in grads):
        raise AssertionError(f"non-finite loss or gradient: losses {losses}")
    if any(p.grad is not None for p in rig.trunk.parameters()):
        raise AssertionError("the frozen trunk got gradients")
    return {"clips": clips, "losses": losses, "step_s": statistics.median(times[1:] or times),
            "peak_bytes": torch.cuda.max_memory_allocated(rig.device) if rig.cuda else None}


def _count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn`` with attention unfused (the MHA fast path off, SDPA's math kernel) so that every matmul counts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops())


def mfu(rig: Rig) -> dict:
    """Model FLOPs utilisation of a one-task forward at the largest batch, in the serving dtype."""
    n = rig.shape.batches[-1]
    x = torch.stack(rig.views(n, 50)).squeeze(1).to(rig.device, rig.dtype)
    stack = rig.tvs[0].host_stack.to(rig.device, rig.dtype)

    def forward() -> None:
        with torch.inference_mode():
            rig.serve_trunk(x, stack)
        rig.sync()

    flops = _count_flops(forward)
    t = timed_rounds({"forward": forward}, rig.shape.iters, warmup=rig.shape.warmup)["forward"]
    dtype = str(rig.dtype).split(".")[1]
    peak = rig.peak_flops.get(dtype)
    return {"batch": n, "frames": rig.shape.frames, "dtype": dtype, "flops_per_forward": flops,
            "gflops_per_image": flops / (n * rig.shape.frames) / 1e9, "forward_s": t, "achieved_tflops": flops / t / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": flops / t / peak if peak else None}


STEPS: dict[str, Callable[[Rig], dict]] = {
    "mixed_logits": mixed_logits, "staging_stress": staging_stress, "activation_order": activation_order,
    "sync_audit": sync_audit,
    "h2d_bandwidth": h2d_bandwidth, "throughput": throughput, "cold_slots": cold_slots, "fp16": fp16,
    "bf16_train_step": bf16_train_step, "mfu": mfu,
}
