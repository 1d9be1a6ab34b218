"""Several tasks per clip: one request for 4 tasks vs 4 requests for the same clip, over gRPC end to end.

    python -m bench.multi_task [--trunk tiny|vit-b-16] [--rounds 15] [--out bench_multi_task.json]

A repository with a random trunk (``tiny``: ``test-vit-tiny``, 2 blocks, width 32, 32 px;
``vit-b-16``: ViT-B/16's shape, 12 blocks, width 768, 224 px, random weights) and 8 tasks,
all with one sampling (8 frames): 4 with full-depth adapters (every block, before attention
and before the MLP) and 4 with adapters in the last half of the blocks only. The server
runs in a subprocess on 127.0.0.1 (sandboxed decoder processes, the default). For each
depth and clip:

* ``one_request``: ``Classify`` with ``tasks=[t0..t3]`` (one upload, one decode; with
  last-half adapters the patch embedding and the first half of the blocks run once for
  the clip, not once per task);
* ``four_requests``: 4 ``Classify`` calls for the same clip in flight at once (4 uploads,
  4 decodes; their rows may share a forward, never a prefix: each has its own frames).

Rounds alternate all four (:func:`bench.timing.timed_rounds`), both depths side by side
in one server; the figure is the median wall time per clip, and ``speedup`` =
four_requests / one_request (goals: >= 1.0 full depth, >= 1.6 last half). The server's
``stadapter_decode_seconds_count`` and ``stadapter_shared_prefix_rows_total`` are read
around one call of each. Prints a table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import emit_json
from bench.timing import timed_rounds

TASKS = 4
DEPTHS = ("full", "half")  # adapters in every block | in the last half of the blocks
CLIPS = {"64x48 1 s": dict(frames=30, size=(64, 48)), "320x240 10 s": dict(frames=300, size=(320, 240))}
TRUNKS = {  # name -> (open_clip model, description, adapter width, clips measured)
    "tiny": ("test-vit-tiny", "test-vit-tiny (2 blocks, width 32, 32 px)", 8, tuple(CLIPS)),
    "vit-b-16": ("ViT-B-16", "ViT-B/16 shape (12 blocks, width 768, 224 px), random weights", 384, ("64x48 1 s",)),
}
FRAMES = 8


def task_names(depth: str) -> list[str]:
    return [f"{depth}{i}" for i in range(TASKS)]


def encode_clip(frames: int, size: tuple[int, int], fps: int = 30, gop: int = 30) -> bytes:
    """An h264 mp4 of a pattern that moves one pixel per frame (PyAV, in memory)."""
    import numpy as np

    from stadapter.video.synthetic import encode_frames

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pictures = (np.stack([(xx + i) % 256, (yy * 2 + i) % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
                for i in range(frames))
    return encode_frames(pictures, fps=fps, gop=gop)


def build_repository(root: Path, trunk_name: str = "tiny") -> Path:
    from bench.tasks import random_bundle
    from stadapter import AdapterConfig, SamplingConfig, init_trunk, load_trunk

    model, _, width, _ = TRUNKS[trunk_name]
    init_trunk(model, "random", root / "trunk", seed=0)
    trunk = load_trunk(root / "trunk")
    layers = {"full": 0, "half": trunk.num_blocks // 2}
    sampling = SamplingConfig(num_frames=FRAMES, input_size=trunk.image_size)
    for depth in DEPTHS:
        cfg = AdapterConfig(width=width, pre_attn=True, pre_mlp=True, layers=layers[depth])
        for i, name in enumerate(task_names(depth)):
            random_bundle(trunk, root / "tasks" / name / "1", name, cfg, sampling, 5, seed=i, std=0.1,
                          labels=[f"{name}-{c}" for c in range(5)])
    return root


def counters(url: str) -> dict[str, float]:
    """The server's decode count and shared-prefix rows."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    want = ("stadapter_decode_seconds_count", "stadapter_shared_prefix_rows_total")
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in want}
    return {n: found.get(n, 0.0) for n in want}


def run(rounds: int, trunk_name: str = "tiny") -> dict:
    from clients import Client
    from server.process import ServerProcess

    _, described, width, clips = TRUNKS[trunk_name]
    out: dict = {"tasks": TASKS, "rounds": rounds, "trunk": described, "frames": FRAMES,
                 "adapters": {"full": f"every block, pre-attn + pre-MLP, width {width}",
                              "half": f"the last half of the blocks, pre-attn + pre-MLP, width {width}"},
                 "clips": []}
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp) / "repo", trunk_name)
        with ServerProcess(repo, "--allow-insecure-admin", "--poll-interval-s", "0", "--max-batch-size", str(TASKS),
                           env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}, timeout=600) as srv, \
                Client(srv.address, timeout_s=600) as c, ThreadPoolExecutor(TASKS) as pool:
            for label in clips:
                data = encode_clip(**CLIPS[label])
                fns = {}
                for depth in DEPTHS:
                    names = task_names(depth)

                    def one(names=names, data=data) -> None:
                        assert all(not isinstance(r, Exception) for r in c.classify(data, names))

                    def four(names=names, data=data) -> None:
                        list(pool.map(lambda one_task: c.classify(data, one_task), names))

                    fns[f"{depth} one_request"], fns[f"{depth} four_requests"] = one, four
                seen: dict[str, dict[str, float]] = {}
                for name, fn in fns.items():  # one call of each, counted
                    before = counters(srv.metrics_url)
                    fn()
                    seen[name] = {k: v - before[k] for k, v in counters(srv.metrics_url).items()}
                t = timed_rounds(fns, rounds)
                for depth in DEPTHS:
                    one_s, four_s = t[f"{depth} one_request"], t[f"{depth} four_requests"]
                    out["clips"].append({
                        "clip": label, "depth": depth, "bytes": len(data), "one_request_ms": one_s * 1e3,
                        "four_requests_ms": four_s * 1e3, "speedup": four_s / one_s,
                        "decodes_one_request": seen[f"{depth} one_request"]["stadapter_decode_seconds_count"],
                        "decodes_four_requests": seen[f"{depth} four_requests"]["stadapter_decode_seconds_count"],
                        "shared_prefix_rows_one_request": seen[f"{depth} one_request"]["stadapter_shared_prefix_rows_total"],
                        "shared_prefix_rows_four_requests":
                            seen[f"{depth} four_requests"]["stadapter_shared_prefix_rows_total"]})
    return out


def print_table(r: dict, file=sys.stderr) -> None:
    print(f"{r['tasks']} tasks, {r['trunk']}, {r['frames']} frames; median of {r['rounds']} rounds", file=file)
    for depth, what in r["adapters"].items():
        print(f"  {depth}: {what}", file=file)
    print(f"{'clip':<14} {'depth':<6} {'bytes':>8} {'1 request ms':>13} {'4 requests ms':>14} {'speedup':>8} "
          f"{'decodes':>8} {'shared rows':>12}", file=file)
    for e in r["clips"]:
        print(f"{e['clip']:<14} {e['depth']:<6} {e['bytes']:>8} {e['one_request_ms']:>13.1f} {e['four_requests_ms']:>14.1f} "
              f"{e['speedup']:>7.2f}x {int(e['decodes_one_request'])} vs {int(e['decodes_four_requests'])} "
              f"{int(e['shared_prefix_rows_one_request']):>5} vs {int(e['shared_prefix_rows_four_requests'])}", file=file)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trunk", choices=tuple(TRUNKS), default="tiny")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    r = run(args.rounds, args.trunk)
    print_table(r)
    emit_json(r, args.out)
    return r


if __name__ == "__main__":
    main()
