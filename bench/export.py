"""Export bench: PyTorch eager vs onnxruntime on the multi-task graph, and what adding a task costs.

    python -m bench.export [--out bench_export.json] [--shapes tiny vitb] [--provider cpu]
                           [--tiny-batch 8] [--vitb-batch 2] [--vitb-frames 8] [--repeats 5] [--threads 2]

For each trunk shape (the tiny test trunk; ViT-B/16's shape with random weights,
12x384 pre-attention adapters, 400- and 174-class heads):

* ``repository``: ``write_repository`` (export + onnx.checker + parity + config
  validation) with K tasks, then again with K+1 tasks: the wall time and model.onnx
  size of re-exporting the multi-task graph when a task is added.
  Also the onnxruntime session creation time of the new graph: the part of a Triton
  model reload that happens inside onnxruntime (Triton itself is not run here).
* ``throughput``: the same mixed-task batch, the same inputs, the same thread count:
  PyTorch eager (the exported module, fp32) vs onnxruntime on ``--provider``; median
  seconds per batch, clips/s, the ratio ort/torch, and the max abs logit difference.

Prints a table to stderr and JSON to stdout (and ``--out``). On a GPU machine run
it with ``--provider cuda`` or ``tensorrt`` (PyTorch then runs on CUDA too).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import emit_json

SHAPES = {
    # model, adapter config, head sizes of the tasks (K = len - 1 first, then all)
    "tiny": ("test-vit-tiny", {"width": 8, "pre_attn": True, "pre_mlp": True}, (3, 5, 4)),
    "vitb": ("ViT-B-16", {"width": 384, "pre_attn": True, "pre_mlp": False}, (400, 174, 101)),
}


def make_tasks(root: Path, trunk, adapter: dict, heads, num_frames: int, size: int) -> list[Path]:
    from bench.tasks import random_bundle
    from stadapter import AdapterConfig, SamplingConfig

    cfg, sampling = AdapterConfig(**adapter), SamplingConfig(num_frames=num_frames, input_size=size)
    return [random_bundle(trunk, root / f"task{k}", f"task{k}", cfg, sampling, c, seed=100 + k) for k, c in enumerate(heads)]


def bench_shape(name: str, args, work: Path) -> dict[str, Any]:
    from export.onnx_export import ExportOptions, build_model, example_inputs, load_tasks
    from export.runtime import make_session, time_calls, torch_device, torch_runner
    from export.triton import MULTITASK_MODEL, TritonOptions, write_repository
    from stadapter import init_trunk, load_trunk

    model_name, adapter, heads = SHAPES[name]
    batch = args.tiny_batch if name == "tiny" else args.vitb_batch
    frames = args.tiny_frames if name == "tiny" else args.vitb_frames
    t0 = time.perf_counter()
    init_trunk(model_name, "random", work / "trunk", seed=0)
    trunk = load_trunk(work / "trunk")
    size = trunk.image_size
    task_dirs = make_tasks(work / "tasks", trunk, adapter, heads, frames, size)
    setup_s = time.perf_counter() - t0
    opts = ExportOptions(exporter=args.exporter, check_batch=min(batch, 2))
    tri = TritonOptions(max_batch_size=32)
    repo = {}
    for k in (len(heads) - 1, len(heads)):
        bundles = load_tasks(trunk, task_dirs[:k])
        t1 = time.perf_counter()
        rep = write_repository(trunk, bundles, work / "triton", tri, opts).models[MULTITASK_MODEL]
        repo[f"{k}_tasks"] = {"wall_s": time.perf_counter() - t1, "export_s": rep.export_seconds,
                              "onnx_bytes": rep.onnx_bytes, "parity_max_abs_diff": rep.max_abs_diff}
    onnx_path = work / "triton" / MULTITASK_MODEL / "1" / "model.onnx"
    bundles = load_tasks(trunk, task_dirs)
    model = build_model(trunk, bundles, multi=True)
    inputs = example_inputs(batch, frames, size, len(bundles), seed=3)
    feeds = {"frames": inputs[0].numpy(), "task_index": inputs[1].numpy()}
    torch.set_num_threads(args.threads)
    device = torch_device(args.provider)
    torch_run = torch_runner(model.to(device), inputs, device)
    t2 = time.perf_counter()
    sess = make_session(onnx_path, args.provider, threads=args.threads)
    session_s = time.perf_counter() - t2  # what a Triton (re)load spends in onnxruntime, before warm-up
    ref = torch_run()[0].cpu().numpy()
    got = sess.run(None, feeds)[0]
    t_torch = time_calls(torch_run, args.repeats)
    t_ort = time_calls(lambda: sess.run(None, feeds), args.repeats)
    return {
        "trunk": model_name, "trunk_parameters": trunk.num_parameters, "adapter": adapter, "heads": list(heads),
        "batch": batch, "num_frames": frames, "input_size": size, "threads": args.threads, "provider": args.provider,
        "torch_device": device, "setup_s": setup_s, "repository": repo,
        "add_one_task": {
            "reexport_wall_s": repo[f"{len(heads)}_tasks"]["wall_s"],
            "onnx_bytes_delta": repo[f"{len(heads)}_tasks"]["onnx_bytes"] - repo[f"{len(heads) - 1}_tasks"]["onnx_bytes"],
            "ort_session_create_s": session_s,
        },
        "throughput": {
            "torch_s": t_torch["median_s"], "ort_s": t_ort["median_s"],
            "torch_clips_per_s": batch / t_torch["median_s"], "ort_clips_per_s": batch / t_ort["median_s"],
            "ort_over_torch": t_torch["median_s"] / t_ort["median_s"],
            "max_abs_diff": float(np.abs(ref.astype(np.float64) - got).max()),
        },
    }


def table(results: dict[str, Any]) -> str:
    rows = ["| shape | batch x T | torch clips/s | ort clips/s | ort/torch | max abs diff | export K / K+1 tasks (s) "
            "| model.onnx K / K+1 (MB) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results["shapes"].items():
        th, rp = r["throughput"], list(r["repository"].values())
        rows.append(
            f"| {name} ({r['trunk']}) | {r['batch']} x {r['num_frames']} | {th['torch_clips_per_s']:.2f} | "
            f"{th['ort_clips_per_s']:.2f} | {th['ort_over_torch']:.2f} | {th['max_abs_diff']:.2e} | "
            f"{rp[0]['wall_s']:.1f} / {rp[1]['wall_s']:.1f} | {rp[0]['onnx_bytes'] / 1e6:.2f} / {rp[1]['onnx_bytes'] / 1e6:.2f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["tiny", "vitb"])
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    p.add_argument("--tiny-batch", type=int, default=8)
    p.add_argument("--tiny-frames", type=int, default=4)
    p.add_argument("--vitb-batch", type=int, default=2)
    p.add_argument("--vitb-frames", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads = onnxruntime intra-op threads")
    p.add_argument("--workdir", help="keep trunks, bundles and graphs here (default: a temp folder)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    results: dict[str, Any] = {
        "bench": "export", "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "shapes": {},
    }
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        base = Path(args.workdir) if args.workdir else Path(tmp)
        for name in args.shapes:
            results["shapes"][name] = bench_shape(name, args, base / name)
            print(f"done {name}", file=sys.stderr)
    results["loadavg_end"] = list(os.getloadavg())
    print(table(results), file=sys.stderr)
    emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
