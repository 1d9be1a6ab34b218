"""Decode bench: stadapter.video.decode_clip vs "decode every frame, then sample".

    python bench/decode.py [--repeats 20] [--seconds 10] [--fps 30] [--size 320x240] [--gop 30]
                           [--frames 8] [--mode uniform] [--content texture pan] [--out bench_decode.json]

Encodes (in a temp dir) h264 mp4 clips with the given length, rate, size and
keyframe interval, one per ``--content``, then times, in memory (the clip as
bytes, as the server gets it):

* ``ours``: ``decode_clip``: only GOPs holding sampled frames are decoded, unneeded
  non-reference frames are dropped, decoding stops after the last sampled frame;
  the resize happens in swscale on the sampled frames only;
* ``naive``: what the public ST-Adapter code path does: decode every frame and
  convert it to RGB, then pick the sampled indices; the picked frames then get
  the very same resize / crop / normalise as ``ours`` (so only the decoding
  strategy differs, and the two outputs must be equal: ``max_abs_diff_vs_naive``).
  Its RGB conversion shares one single-threaded swscale context, the fastest way
  PyAV offers;
* ``naive_to_ndarray``: the same, but with the usual ``frame.to_ndarray(format="rgb24")``
  per frame, which in PyAV >= 16 builds a new threaded scaler for every frame (slow).

What can be saved depends on where the bits are: 8 uniform samples of a 10 s clip
with GOP 30 land in 8 of its 10 GOPs, so every sampled frame still costs its GOP's
keyframe plus the reference frames before it. ``texture`` (fresh noise every
frame) makes inter frames as costly as keyframes; ``pan`` (a camera pan over a
fixed scene) puts most bits in keyframes, like most real footage, and saves less.

The variants are timed alternately (ours, naive, ..., ours, ...) so that load from
other processes hits all alike; wall clock and process CPU time are both reported.
Prints tables to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from media import make_clip  # noqa: E402

from stadapter.config import SamplingConfig  # noqa: E402
from stadapter.video import FrameConverter, VideoLimits, decode_clip, probe, sample_indices, views_to_tensor  # noqa: E402


def naive_clip(data: bytes, cfg: SamplingConfig, to_ndarray: bool = False) -> torch.Tensor:
    """Decode every frame to RGB (as the public code does), then index; same preprocessing as ours."""
    scaler = VideoReformatter()
    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(video=0))
    if to_ndarray:
        rgb = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    else:
        rgb = np.stack([scaler.reformat(f, format="rgb24", threads=1).to_ndarray() for f in frames])
    views = [sample_indices(len(rgb), cfg, v) for v in range(cfg.temporal_views)]
    convert = FrameConverter(VideoLimits(), cfg.short_side)
    return views_to_tensor(views, {i: convert(frames[i]) for i in set(sum(views, []))}, cfg)


def timed(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per call of each function, run alternately."""
    for fn in fns.values():
        fn()  # warm up (codec init, allocator)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return wall, cpu


def bench_one(data: bytes, cfg: SamplingConfig, repeats: int) -> dict:
    """Times of ours / naive / naive_to_ndarray on one clip, and the speedups."""
    info = probe(data)
    diff = float((decode_clip(data, cfg) - naive_clip(data, cfg)).abs().max())
    wall, cpu = timed({"ours": lambda: decode_clip(data, cfg), "naive": lambda: naive_clip(data, cfg),
                       "naive_to_ndarray": lambda: naive_clip(data, cfg, to_ndarray=True)}, repeats)
    mean = {name: statistics.mean(t) for name, t in wall.items()}
    out: dict = {"bytes": len(data), "num_frames": info.num_frames}
    for name, t in wall.items():
        out[name] = {"ms_per_clip": 1e3 * mean[name], "ms_median": 1e3 * statistics.median(t),
                     "cpu_ms_per_clip": 1e3 * statistics.mean(cpu[name]),
                     "clip_frames_per_s": info.num_frames / mean[name],
                     "sampled_frames_per_s": cfg.num_frames / mean[name]}
    out["speedup"] = mean["naive"] / mean["ours"]
    out["speedup_median"] = statistics.median(wall["naive"]) / statistics.median(wall["ours"])
    out["speedup_cpu"] = statistics.mean(cpu["naive"]) / statistics.mean(cpu["ours"])
    out["speedup_vs_naive_to_ndarray"] = mean["naive_to_ndarray"] / mean["ours"]
    out["max_abs_diff_vs_naive"] = diff
    return out


def print_table(content: str, r: dict, file=sys.stderr) -> None:
    print(f"\n{content}: {r['bytes']} bytes", file=file)
    print(f"  {'':16} {'ms/clip':>9} {'cpu ms/clip':>12} {'clip frames/s':>14} {'sampled frames/s':>17}", file=file)
    for name in ("ours", "naive", "naive_to_ndarray"):
        x = r[name]
        print(f"  {name:16} {x['ms_per_clip']:9.2f} {x['cpu_ms_per_clip']:12.2f} {x['clip_frames_per_s']:14.0f} "
              f"{x['sampled_frames_per_s']:17.0f}", file=file)
    print(f"  speedup vs naive: {r['speedup']:.2f}x (mean), {r['speedup_median']:.2f}x (median), "
          f"{r['speedup_cpu']:.2f}x (cpu time); vs naive_to_ndarray {r['speedup_vs_naive_to_ndarray']:.2f}x; "
          f"max |ours - naive| = {r['max_abs_diff_vs_naive']:g}", file=file)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--gop", type=int, default=30)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--mode", choices=("uniform", "stride"), default="uniform")
    ap.add_argument("--content", nargs="+", choices=("texture", "pan"), default=["texture", "pan"],
                    help="texture: fresh noise every frame (inter frames as costly as keyframes); "
                         "pan: a pan over a fixed scene (keyframes hold most bits, like real footage)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    cfg = SamplingConfig(num_frames=args.frames, mode=args.mode)

    result: dict = {
        "clip": {"seconds": args.seconds, "fps": args.fps, "size": [w, h], "gop": args.gop, "codec": "h264",
                 "container": "mp4", "encoder": "libx264 defaults (preset medium, 3 B-frames), no scenecut"},
        "sampling": {"num_frames": cfg.num_frames, "mode": cfg.mode, "input_size": cfg.input_size},
        "repeats": args.repeats,
        "host": {"python": platform.python_version(), "av": av.__version__, "torch": torch.__version__,
                 "cpus": os.cpu_count(), "machine": platform.machine()},
        "content": {},
    }
    print(f"{args.seconds:g} s, {args.fps} fps, {w}x{h}, h264 GOP {args.gop}, in memory; "
          f"{cfg.num_frames} frames ({cfg.mode}) -> [1, {cfg.num_frames}, 3, {cfg.input_size}, {cfg.input_size}]; "
          f"mean of {args.repeats}", file=sys.stderr)
    for content in args.content:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_clip(Path(tmp) / "bench.mp4", num_frames=round(args.seconds * args.fps), fps=args.fps,
                             size=(w, h), codec="libx264", gop=args.gop, pattern=content)
            data = path.read_bytes()
        result["content"][content] = bench_one(data, cfg, args.repeats)
        print_table(content, result["content"][content])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
