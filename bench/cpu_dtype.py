"""CPU serving dtypes side by side: float32 (the CPU default before) against the bf16 ways of serving.

    python -m bench.serving --cpu-dtype [--batch 2 --frames 8 --iters 2 --agreement-clips 48 --out F.json]

* speed: ViT-B/16's shape (random weights; 12 x 384 adapters before attention, 8 tasks,
  mixed batches of ``batch`` clips of ``frames`` frames, one view each) through the server's
  forward (:class:`server.engine.model.ModelRunner`, trunk prepared as the server prepares it),
  the variants interleaved round by round (a shared machine drifts): ``fp32``; ``bf16-eager``
  (the trunk cast to bf16, nothing else); ``bf16-packed`` (what ``--dtype auto`` serves on a CPU
  with AMX or AVX512-BF16 without int8: bf16 with the block weights packed once for oneDNN); ``int8`` (``--quantize
  int8``: those block linears in int8, the rest in bf16). Which of them the defaults (``--dtype auto
  --quantize auto``) serve, and why. Clips/s, the
  ratio to fp32, the largest probability difference from fp32, and each variant's start-up
  cost: the trunk's preparation (packing) and the first forward (a warm-up forward's share).
* agreement: the transfer table's tasks as trained in ``model_repository/`` (the embedded
  trunk, ``shapes`` and ``motion``), on clips drawn like their validation clips
  (:mod:`training.synthetic`), each clip under both tasks in one mixed batch: top-1
  agreement of each other variant with fp32, the largest probability difference, and
  each variant's top-1 against the clips' true labels.

Prints a table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from bench.report import emit_json
from bench.timing import timed_samples

VARIANTS = ("fp32", "bf16-eager", "bf16-packed", "int8")


def make_runner(repo: Path, variant: str, max_rows: int):
    """A ModelRunner over ``repo``'s trunk and tasks as ``variant`` serves them; (runner, tasks, seconds the trunk's
    preparation took: what the variant adds to the server's start-up)."""
    from server.config import ServerConfig
    from server.engine.model import ModelRunner, prepare_trunk
    from server.engine.slots import AdapterSlots
    from server.registry.registry import TaskRegistry
    from stadapter import load_trunk

    cpu = torch.device("cpu")
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    trunk = load_trunk(repo / "trunk", device=cpu, dtype=dtype)
    t0 = time.perf_counter()
    if variant == "bf16-eager":
        trunk.chunk_bytes = ServerConfig.cpu_chunk_bytes
    else:
        packed = prepare_trunk(trunk, cpu, dtype, ServerConfig.cpu_chunk_bytes, int8=variant == "int8")
        assert packed == (variant in ("bf16-packed", "int8")), f"{variant}: weights packed = {packed}"
    prepare_s = time.perf_counter() - t0
    reg = TaskRegistry(repo, trunk)
    reg.sync()
    runner = ModelRunner(trunk, AdapterSlots(1 << 40, cpu, dtype), max_rows=max_rows)
    return runner, reg.tasks, prepare_s


def served_default(repo: Path) -> dict:
    """Which variant the server's defaults (``--dtype auto --quantize auto``) serve ``repo``'s trunk as here, and the
    startup log's note of why (for ``int8``, the probe clip's measured distance)."""
    from server.config import ServerConfig
    from server.engine.model import resolve_dtype
    from server.engine.quantize import prepare_served_trunk
    from stadapter import load_trunk

    cpu = torch.device("cpu")
    dtype = resolve_dtype(ServerConfig.dtype, cpu)
    trunk = load_trunk(repo / "trunk", device=cpu, dtype=dtype)
    prepared = prepare_served_trunk(trunk, cpu, dtype, ServerConfig.cpu_chunk_bytes, ServerConfig.quantize)
    variant = "int8" if prepared.int8 else "bf16-packed" if prepared.packed else "fp32"
    return {"variant": variant, "note": prepared.note}


def max_prob_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def speed(work: Path, batch: int, frames: int, iters: int) -> dict:
    from bench.tasks import NUM_TASKS, build_repository
    from stadapter import AdapterConfig

    t0 = time.perf_counter()
    repo = build_repository(work / "vit-b-16", "ViT-B-16", AdapterConfig(width=384, pre_attn=True, pre_mlp=False),
                            frames, 224)
    print(f"[cpu-dtype] ViT-B/16 repository built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(1, frames, 3, 224, 224, generator=g) for _ in range(batch)]
    runs, prepare, first = {}, {}, {}
    for v in VARIANTS:
        runner, tasks, prepare[v] = make_runner(repo, v, batch)
        clips = [(tasks[f"task{b % NUM_TASKS}"], views[b]) for b in range(batch)]
        t1 = time.perf_counter()
        probs = runner.forward(clips).probs
        first[v] = time.perf_counter() - t1
        runs[v] = (runner, clips, probs)
    wall, _ = timed_samples({v: (lambda r=r, c=c: r.forward(c)) for v, (r, c, _) in runs.items()}, iters, warmup=0)
    med = {v: sorted(t)[len(t) // 2] for v, t in wall.items()}
    return {
        "model": "ViT-B-16", "batch": batch, "frames": frames, "tasks": min(batch, NUM_TASKS), "iters": iters,
        "seconds": wall,
        "clips_per_s": {v: batch / med[v] for v in VARIANTS},
        "over_fp32": {v: med["fp32"] / med[v] for v in VARIANTS},
        "max_prob_diff_vs_fp32": {v: max_prob_diff(runs[v][2], runs["fp32"][2]) for v in VARIANTS},
        "prepare_s": prepare, "first_forward_s": first, "served_default": served_default(repo),
    }


def transfer_clips(tasks: dict, per_task: int, seed: int = 1) -> list[tuple[torch.Tensor, dict[str, int]]]:
    """Clips drawn like the transfer table's validation clips of each task: (views, {task: true label})."""
    from stadapter.video import decode_clip
    from stadapter.video.synthetic import encode_frames
    from training.synthetic import TASKS, SyntheticConfig, clip_rng

    cfg = SyntheticConfig(task="shapes", num_train=0, num_val=per_task)
    out = []
    for name in ("shapes", "motion"):
        task = TASKS[name]
        for i in range(per_task):
            label = i % len(task.labels)
            pictures = task.draw(clip_rng(seed, "val", i), label, cfg.size, cfg.frames)
            data = encode_frames(pictures, fps=cfg.fps, codec="mpeg4", options={"qscale": "2"}, threads=1)
            out.append((decode_clip(data, tasks[name].spec.sampling), {name: label}))
    return out


def agreement(repo: Path, per_task: int) -> dict:
    if not (repo / "tasks" / "shapes").is_dir() or not (repo / "tasks" / "motion").is_dir():
        raise SystemExit(f"{repo}: the transfer table's tasks (shapes, motion) are not there")
    runners = {v: make_runner(repo, v, 64)[:2] for v in VARIANTS}
    clips = transfer_clips(runners["fp32"][1], per_task)
    probs: dict[str, list[torch.Tensor]] = {}
    for v, (runner, tasks) in runners.items():
        probs[v] = []
        for start in range(0, len(clips), 16):  # each clip under both tasks, in mixed batches
            part = [(tasks[name], views) for views, _ in clips[start:start + 16] for name in ("shapes", "motion")]
            probs[v] += runner.forward(part).probs
    names = [name for _ in clips for name in ("shapes", "motion")]
    truth = [labels.get(name) for _, labels in clips for name in ("shapes", "motion")]
    top1 = {v: [int(p.argmax()) for p in ps] for v, ps in probs.items()}
    out: dict = {"clips": len(clips), "answers": len(names), "tasks": ["shapes", "motion"],
                 "served_default": served_default(repo)}
    for v in VARIANTS:
        same = sum(a == b for a, b in zip(top1[v], top1["fp32"], strict=True))
        right = [(t, p) for t, p in zip(truth, top1[v], strict=True) if t is not None]
        out[v] = {"top1_agreement_with_fp32": same / len(names),
                  "max_prob_diff_vs_fp32": max_prob_diff(probs[v], probs["fp32"]),
                  "top1_accuracy": sum(t == p for t, p in right) / len(right)}
    return out


def table(result: dict) -> str:
    s, a = result["speed"], result["agreement"]
    rows = [("variant", "clips/s", "x fp32", "max dp (ViT-B)", "prepare s", "1st fwd s", "top-1 agree", "max dp (tasks)",
             "top-1 acc")]
    for v in VARIANTS:
        rows.append((v, f"{s['clips_per_s'][v]:.3f}", f"{s['over_fp32'][v]:.2f}", f"{s['max_prob_diff_vs_fp32'][v]:.2e}",
                     f"{s['prepare_s'][v]:.3f}", f"{s['first_forward_s'][v]:.1f}",
                     f"{100 * a[v]['top1_agreement_with_fp32']:.1f}%", f"{a[v]['max_prob_diff_vs_fp32']:.2e}",
                     f"{100 * a[v]['top1_accuracy']:.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for trunk, part in (("ViT-B/16", s), ("the tasks' trunk", a)):
        lines.append(f"the defaults serve {trunk} as {part['served_default']['variant']}: {part['served_default']['note']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from stadapter.devices import native_bf16

    p = argparse.ArgumentParser(prog="python -m bench.serving --cpu-dtype", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="ViT-B/16 clips per forward (tasks mixed)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--iters", type=int, default=2, help="timed rounds (after one untimed forward each)")
    p.add_argument("--agreement-clips", type=int, default=48, help="clips per transfer-table task")
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="holds the tasks shapes, motion")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"host": {"cpus": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                             "native_bf16": native_bf16(torch.device("cpu")),
                             "cpu_capabilities": {k: v for k, v in torch.cpu.get_capabilities().items()
                                                  if k in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_f")}}}
    t0 = time.perf_counter()
    result["agreement"] = agreement(args.repository, args.agreement_clips)
    print(f"[cpu-dtype] agreement done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-dtype-") as tmp:
        result["speed"] = speed(Path(tmp), args.batch, args.frames, args.iters)
    result["seconds"] = time.perf_counter() - t0
    print(table(result), file=sys.stderr)
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
