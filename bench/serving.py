"""Serving bench: mixed-task batching vs the naive alternatives, gRPC end to end vs the raw forward, memory.

    python -m bench.serving [--out bench_serving.json] [--skip-vitb] [--vitb-batch 8 --vitb-frames 2]
    python -m bench.serving --cpu-dtype [...]   # CPU dtypes side by side: see bench.cpu_dtype

For each trunk (the tiny test trunk, and ViT-B/16's shape with random weights):

* forward (decode excluded, frames are random tensors, 8 tasks):
  - ``single``: one task, a batch of ``batch`` clips (the library's fast path);
  - ``mixed``: 8 tasks in one batch of ``batch`` clips (the server's forward: device
    slot bank + per-row slot index), ratio mixed/single (goal >= 0.9);
  - ``per_task``: the same clips as one forward per task (8 smaller batches);
  - ``swap``: one model, adapter weights loaded into it per request, one clip per forward;
    ratio mixed/swap (goal >= 3).
* end to end: the server in a subprocess on 127.0.0.1, an asyncio gRPC client keeping
  ``concurrency`` requests in flight with pre-encoded clips of 8 tasks. With
  ``decode=excluded`` the server process memoises decode (each distinct clip is decoded
  once, during warm-up), so it and the raw forward both leave decode out; ratio
  e2e/raw (goal >= 0.8). With ``decode=included`` it decodes every request; the decode
  share is decode time / (decode + compute) from the server's own metrics.
* memory: the device bytes of one more slot vs the bundle's tensor bytes, and the
  process RSS growth per task loaded.
* slot bank (:mod:`bench.slot_bank`): one task vs a mixed batch (per-row gather), a changing task mix
  over 64 registered tasks, cold tasks on a full bank of 64 slots.

The machine this runs on matters: the client, gRPC and the model share its cores,
so where cores are few the client's own work lowers the end-to-end figures. Prints
a table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from bench.report import emit_json
from bench.tasks import NUM_TASKS, build_repository
from bench.timing import rss_bytes, timed_rounds

# --- setup -----------------------------------------------------------------------------------------


def synthetic_clips(n: int, frames: int = 16, w: int = 96, h: int = 72) -> list[bytes]:
    """Small MPEG-4 clips (a square moving over noise), distinct per index."""
    from stadapter.video.synthetic import encode_frames

    def pictures(s: int):
        base = np.random.default_rng(s).integers(0, 255, (h, w, 3), dtype=np.uint8)
        for i in range(frames):
            img = base.copy()
            x = (i * 4 + s * 7) % (w - 16)
            img[20:36, x:x + 16] = 255
            yield img

    return [encode_frames(pictures(s), fps=15, codec="mpeg4") for s in range(n)]


# --- forward-level comparisons -----------------------------------------------------------------------


def bench_forward(repo: Path, batch: int, frames: int, iters: int, only_mixed: bool = False) -> dict:
    from server.config import ServerConfig
    from server.engine.model import ModelRunner, dtype_name, resolve_dtype
    from server.engine.quantize import prepare_served_trunk
    from server.engine.slots import AdapterSlots
    from server.registry.registry import TaskRegistry
    from stadapter import TaskAdapters, load_trunk

    cpu = torch.device("cpu")
    dtype = resolve_dtype(ServerConfig.dtype, cpu)  # the server's default here (bf16 on a CPU with bf16 matrix units)
    trunk = load_trunk(repo / "trunk", dtype=dtype)
    # as the server runs it (--quantize auto: int8 linears on ViT-B/16 here): the raw side is the same forward
    prepare_served_trunk(trunk, cpu, dtype, ServerConfig.cpu_chunk_bytes, ServerConfig.quantize)
    reg = TaskRegistry(repo, trunk)
    reg.sync()
    tvs = [reg.tasks[f"task{k}"] for k in range(NUM_TASKS)]
    runner = ModelRunner(trunk, AdapterSlots(1 << 40, cpu, dtype))
    S = trunk.image_size
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(1, frames, 3, S, S, generator=g) for _ in range(batch)]  # one view per clip
    mixed = [(tvs[b % NUM_TASKS], views[b]) for b in range(batch)]
    single = [(tvs[0], v) for v in views]
    by_task = [[(tv, v) for tv2, v in mixed if tv2 is tv] for tv in tvs]

    spec = tvs[0].spec
    model = TaskAdapters(spec.adapter, trunk.dim, trunk.num_blocks, spec.num_classes).eval().to(dtype)
    states = {tv.name: dict(read_tensors(tv.path)) for tv in tvs}

    @torch.inference_mode()
    def swap():
        for tv, v in mixed:
            model.load_state_dict(states[tv.name])  # what a one-model-per-process user does per request
            trunk(v.to(dtype), model.stack()).float().softmax(-1).mean(0)

    if only_mixed:
        return {"raw_mixed_clips_per_s": batch / timed_rounds({"mixed": lambda: runner.forward(mixed)}, iters)["mixed"]}
    t = timed_rounds({"single": lambda: runner.forward(single), "mixed": lambda: runner.forward(mixed),
                      "per_task": lambda: [runner.forward(part) for part in by_task if part], "swap": swap},
                     iters, warmup=1 if iters < 3 else 2)
    t_single, t_mixed, t_per_task, t_swap = t["single"], t["mixed"], t["per_task"], t["swap"]
    cps = lambda t: batch / t  # noqa: E731
    return {
        "batch": batch, "frames": frames, "tasks": NUM_TASKS, "dtype": dtype_name(dtype), "int8": trunk.int8,
        "clips_per_s": {"single": cps(t_single), "mixed": cps(t_mixed), "per_task": cps(t_per_task), "swap": cps(t_swap)},
        "mixed_over_single": t_single / t_mixed,
        "mixed_over_per_task": t_per_task / t_mixed,
        "mixed_over_swap": t_swap / t_mixed,
        "raw_mixed_clips_per_s": cps(t_mixed),
    }


def read_tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter.safetensors")).items()


def bench_memory(repo: Path) -> dict:
    from server.engine.slots import AdapterSlots
    from server.registry.registry import TaskRegistry
    from stadapter import load_trunk, read_bundle

    trunk = load_trunk(repo / "trunk")
    bundle_bytes = read_bundle(repo / "tasks" / "task0" / "1").nbytes
    slots = AdapterSlots(1 << 40, torch.device("cpu"), torch.float32, chunk=1)
    reg = TaskRegistry(repo, trunk)
    rss0 = rss_bytes()
    reg.sync()
    rss1 = rss_bytes()
    before = slots.bytes
    tvs = list(reg.tasks.values())
    with slots.lease([tvs[0]]):  # one task activated into a one-slot bank
        pass
    per_task_cache = slots.bytes - before
    return {
        "bundle_tensor_bytes": bundle_bytes,
        "cache_bytes_per_task": per_task_cache,
        "cache_over_bundle": per_task_cache / bundle_bytes,
        "rss_bytes_per_task_loaded": (rss1 - rss0) / len(tvs),
        "trunk_parameter_bytes": sum(p.numel() * p.element_size() for p in trunk.parameters()),
    }


# --- end to end over gRPC ----------------------------------------------------------------------------


async def _drive(address: str, clips: list[bytes], n: int, concurrency: int, warmup: int) -> float:
    import grpc

    from stadapter_api.v1 import inference_pb2 as pb
    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=opts) as ch:
        stub = pb_grpc.VideoClassifierStub(ch)
        counter = iter(range(10 ** 9))

        async def worker(limit: int):
            while True:
                i = next(counter)
                if i >= limit:
                    return
                await stub.Classify(pb.ClassifyRequest(task=f"task{i % NUM_TASKS}", clip=clips[i % len(clips)]))

        await asyncio.gather(*(worker(warmup) for _ in range(concurrency)))
        counter = iter(range(10 ** 9))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(n) for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


def _server_stats(metrics_url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    vals = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.labels or set(s.labels) == {"le"}:
                vals[s.name] = s.value if "le" not in s.labels else vals.get(s.name)
    return vals


def bench_e2e(repo: Path, clips: list[bytes], batch: int, n: int, concurrency: int, threads: int, memo: bool) -> dict:
    from server.process import ServerProcess

    env = {"OMP_NUM_THREADS": str(threads), "STADAPTER_BENCH_MEMO_DECODE": "1" if memo else None}
    args = ("--max-batch-size", str(batch), "--max-queue-delay-ms", "20", "--max-queue-size", "4096",
            "--decode-workers", "2", "--poll-interval-s", "0")
    launcher = [sys.executable, "-m", "bench.serving", "--serve"]
    with ServerProcess(repo, *args, env=env, timeout=300, launcher=launcher) as srv:
        before = _server_stats(srv.metrics_url)
        cps = asyncio.run(_drive(srv.address, clips, n, concurrency, warmup=max(concurrency, len(clips))))
        after = _server_stats(srv.metrics_url)
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    clips_done = d("stadapter_batch_size_sum")
    out = {"clips_per_s": cps, "requests": n, "concurrency": concurrency,
           "mean_batch_clips": clips_done / max(d("stadapter_batch_size_count"), 1),
           "decode_ms_per_clip": 1e3 * d("stadapter_decode_seconds_sum") / max(d("stadapter_decode_seconds_count"), 1),
           "compute_ms_per_clip": 1e3 * d("stadapter_compute_seconds_sum") / max(clips_done, 1)}
    dec, comp = out["decode_ms_per_clip"], out["compute_ms_per_clip"]
    out["decode_share"] = dec / (dec + comp) if dec + comp else 0.0
    return out


class MemoisedDecoder:
    """A server decoding backend that decodes each distinct (clip, sampling) once and then answers from memory
    (through ``server.app``'s ``wrap_decoder`` hook): the server's time is then the model's."""

    def __init__(self, inner):
        self.inner = inner
        self.memo: dict = {}  # the event loop's thread only: no lock needed

    async def decode(self, clip, sampling, limits, timeout_s, deadline=None):
        import hashlib

        key = (hashlib.blake2b(bytes(clip), digest_size=16).digest(), sampling)
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = await self.inner.decode(clip, sampling, limits, timeout_s, deadline)
        return hit

    def windows(self, clip, sampling, limits, job, timeout_s, deadline=None):
        return self.inner.windows(clip, sampling, limits, job, timeout_s, deadline)

    def close(self) -> None:
        self.inner.close()


def serve_with_memoised_decode(argv: list[str]) -> int:
    """``python -m bench.serving --serve SERVER_ARGS``: the server, decoding each distinct clip once if asked."""
    from server.__main__ import main as server_main

    memo = os.environ.get("STADAPTER_BENCH_MEMO_DECODE") == "1"
    return server_main(argv, wrap_decoder=MemoisedDecoder if memo else None)


# --- report ------------------------------------------------------------------------------------------


def run_model(name: str, model: str, adapter, input_size: int, batch: int, frames: int, iters: int,
              e2e_requests: int, concurrency: int, threads: int, work: Path, cold_tasks: int, cold_iters: int) -> dict:
    from bench import slot_bank
    from stadapter import load_trunk

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    repo = build_repository(work / name, model, adapter, frames, input_size)
    print(f"[{name}] repository built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    fwd = bench_forward(repo, batch, frames, iters)
    print(f"[{name}] forward done", file=sys.stderr)
    clips = synthetic_clips(16)
    e2e = bench_e2e(repo, clips, batch, e2e_requests, concurrency, threads, memo=True)
    e2e_dec = bench_e2e(repo, clips, batch, e2e_requests, concurrency, threads, memo=False)
    print(f"[{name}] end to end done", file=sys.stderr)
    # the raw forward again, after the end-to-end runs: a busy shared machine drifts, so the
    # e2e/raw ratio uses the mean of the raw throughput measured before and after
    raw_after = bench_forward(repo, batch, frames, iters, only_mixed=True)["raw_mixed_clips_per_s"]
    raw = (fwd["raw_mixed_clips_per_s"] + raw_after) / 2
    mem = bench_memory(repo)
    slots = slot_bank.run(name, load_trunk(repo / "trunk"), adapter, batch, frames, iters, 64, cold_tasks, 64, cold_iters)
    return {
        "model": model, "adapter": adapter.to_dict(), "input_size": input_size,
        "forward": fwd,
        "e2e_decode_excluded": e2e,
        "e2e_decode_included": e2e_dec,
        "raw_mixed_clips_per_s": {"before": fwd["raw_mixed_clips_per_s"], "after": raw_after, "mean": raw},
        "e2e_over_raw": e2e["clips_per_s"] / raw,
        "memory": mem,
        "slot_bank": slots,
        "seconds": time.perf_counter() - t0,
    }


def table(results: dict) -> str:
    rows = [("trunk", "batch x T", "single c/s", "mixed c/s", "per-task c/s", "swap c/s", "mixed/single",
             "mixed/swap", "e2e c/s", "e2e/raw", "decode share", "cache B/task", "bundle B")]
    for name, r in results["runs"].items():
        f, m = r["forward"], r["memory"]
        c = f["clips_per_s"]
        rows.append((name, f"{f['batch']}x{f['frames']}", f"{c['single']:.1f}", f"{c['mixed']:.1f}",
                     f"{c['per_task']:.1f}", f"{c['swap']:.1f}", f"{f['mixed_over_single']:.2f}",
                     f"{f['mixed_over_swap']:.2f}", f"{r['e2e_decode_excluded']['clips_per_s']:.1f}",
                     f"{r['e2e_over_raw']:.2f}", f"{r['e2e_decode_included']['decode_share']:.2f}",
                     f"{m['cache_bytes_per_task']}", f"{m['bundle_tensor_bytes']}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        return serve_with_memoised_decode(argv[1:])
    if argv[:1] == ["--cpu-dtype"]:  # float32 and the bf16 ways side by side on a CPU (bench.cpu_dtype)
        from bench import cpu_dtype

        return cpu_dtype.main(argv[1:])
    from stadapter import AdapterConfig

    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=2, help="torch threads for ViT-B/16 (bench process and server)")
    p.add_argument("--tiny-threads", type=int, default=1,
                   help="torch threads for the tiny trunk (its ~10 ms forwards suffer most from a busy machine)")
    p.add_argument("--tiny-batch", type=int, default=32)
    p.add_argument("--tiny-frames", type=int, default=8)
    p.add_argument("--tiny-iters", type=int, default=20)
    p.add_argument("--tiny-requests", type=int, default=640)
    p.add_argument("--skip-vitb", action="store_true")
    p.add_argument("--vitb-batch", type=int, default=8, help="clips per batch for ViT-B/16 (32 on a GPU)")
    p.add_argument("--vitb-frames", type=int, default=2)
    p.add_argument("--vitb-iters", type=int, default=2)
    p.add_argument("--vitb-requests", type=int, default=16)
    p.add_argument("--vitb-cold-tasks", type=int, default=72, help="ViT-B/16 tasks for the cold-task test (27 MB each)")
    p.add_argument("--vitb-cold-iters", type=int, default=10)
    args = p.parse_args(argv)
    results = {"host": {"cpus": os.cpu_count(), "torch_threads": {"tiny": args.tiny_threads, "vit-b-16": args.threads},
                        "cuda": torch.cuda.is_available(),
                        "torch": torch.__version__}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        tiny_adapter = AdapterConfig(width=8, pre_attn=True, pre_mlp=True)
        results["runs"]["tiny"] = run_model("tiny", "test-vit-tiny", tiny_adapter, 32, args.tiny_batch, args.tiny_frames,
                                            args.tiny_iters, args.tiny_requests, 2 * args.tiny_batch, args.tiny_threads,
                                            work, 1000, 200)
        if not args.skip_vitb:
            vitb_adapter = AdapterConfig(width=384, pre_attn=True, pre_mlp=False)  # the paper's 12 x 384
            results["runs"]["vit-b-16"] = run_model("vit-b-16", "ViT-B-16", vitb_adapter, 224, args.vitb_batch,
                                                    args.vitb_frames, args.vitb_iters, args.vitb_requests,
                                                    2 * args.vitb_batch, args.threads, work, args.vitb_cold_tasks,
                                                    args.vitb_cold_iters)
    from bench import slot_bank

    print(table(results), file=sys.stderr)
    print(slot_bank.table({k: r["slot_bank"] for k, r in results["runs"].items()}), file=sys.stderr)
    emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
