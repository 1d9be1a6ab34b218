"""The fast sampling mode (``SamplingConfig.seek="keyframe"``) against exact sampling: decode time and top-1.

    python -m bench.fast_seek [--clips-only | --eval-only] [--repeats 7] [--seconds 10] [--fps 30]
                              [--sizes 320x240 1280x720] [--gops 60] [--content pan texture]
                              [--eval-clips 200] [--eval-frames 16 240] [--eval-gop 60] [--eval-seed 1000]
                              [--bundle NAME=TASK_DIR ...] [--out bench_fast_seek.json]

Clips (as ``bench/decode.py`` makes them: libx264 defaults, 3 B-frames, no scenecut, mp4, in
memory): for every size x GOP x content, 8 frames sampled uniformly (and stride 16) to model input
``[1, 8, 3, 224, 224]`` with ``decode_clip``, exact vs keyframe, timed alternately, median of
``--repeats`` (process CPU time, steadier than wall clock on a shared machine; both are in the
JSON). ``floor`` decodes only the keyframes the moved frames hang from (the keyframe at or
before each): no mode that keeps one frame per segment can decode less, so ``exact / floor`` bounds
the speed-up. Each keyframe-mode result is checked to equal exact decoding of the moved indices
(``decode_views``; ``max|d|`` 0).

Eval: task bundles (default the demo tasks, ``model_repository/tasks/{motion,shapes}/1``; more with
``--bundle name=dir``, the task read from task.json) on fresh clips drawn by ``training.synthetic``
with ``--eval-seed`` (not a training seed), MPEG-4 in mp4 as the training clips (qscale 2) but with a
keyframe every ``--eval-gop`` frames, one set per ``--eval-frames`` length (the path spans the clip
whatever its length); plus the ``samples/<task>/`` clips. Reports top-1 in both modes, decode
CPU milliseconds per clip in both, the share of sampled frames that moved, and how often the two modes
agree. Prints tables to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
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

from bench.report import emit_json
from bench.timing import timed_samples
from stadapter.config import SamplingConfig
from stadapter.video import decode_clip, decode_views, keyframes, probe, sample_plan
from stadapter.video.synthetic import encode_frames, make_clip

ROOT = Path(__file__).resolve().parents[1]  # the demo model_repository/ and samples/


def median_ms(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall-clock and process-CPU ms of each function, run alternately after one warm-up call each
    (:func:`bench.timing.timed_samples`; decoding is single-threaded here, so CPU time is the steadier)."""
    wall, cpu = timed_samples(fns, repeats)
    return {name: {"wall_ms": 1e3 * statistics.median(wall[name]), "cpu_ms": 1e3 * statistics.median(cpu[name])}
            for name in fns}


def floor_views(data: bytes, plan: list[list[int]]) -> list[list[int]]:
    """The keyframe at or before each moved frame (what decoding them must start from)."""
    keys = keyframes(data) or [0]
    return [[max(k for k in keys if k <= i) for i in view] for view in plan]


def bench_clip(data: bytes, cfg: SamplingConfig, repeats: int) -> dict:
    fast = cfg.replace(seek="keyframe")
    plan, exact_plan = sample_plan(data, fast), sample_plan(data, cfg)
    floor = floor_views(data, plan)
    diff = float((decode_clip(data, fast) - decode_views(data, plan, cfg)).abs().max())
    ms = median_ms({"exact": lambda: decode_clip(data, cfg), "keyframe": lambda: decode_clip(data, fast),
                     "floor": lambda: decode_views(data, floor, cfg)}, repeats)
    return {"exact_indices": exact_plan[0], "keyframe_indices": plan[0], "keyframes": keyframes(data), "ms": ms,
            "speedup_cpu": ms["exact"]["cpu_ms"] / ms["keyframe"]["cpu_ms"],
            "speedup_wall": ms["exact"]["wall_ms"] / ms["keyframe"]["wall_ms"],
            "speedup_bound_cpu": ms["exact"]["cpu_ms"] / ms["floor"]["cpu_ms"],
            "max_abs_diff_vs_exact_decoding_of_moved": diff}


def run_clips(args) -> list[dict]:
    out = []
    n = round(args.seconds * args.fps)
    for size in args.sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        for gop in args.gops:
            for content in args.content:
                with tempfile.TemporaryDirectory() as tmp:
                    path = make_clip(Path(tmp) / "bench.mp4", num_frames=n, fps=args.fps, size=(w, h),
                                     codec="libx264", gop=gop, pattern=content)
                    data = path.read_bytes()
                for label, cfg in (("uniform", SamplingConfig(num_frames=8)),
                                   ("stride16", SamplingConfig(num_frames=8, mode="stride", stride=16))):
                    r = bench_clip(data, cfg, args.repeats)
                    out.append({"size": [w, h], "gop": gop, "content": content, "sampling": label,
                                "num_frames": probe(data).num_frames, "bytes": len(data), **r})
                    print_clip_rows(out[-1:])
    return out


def print_clip_rows(rows: list[dict], file=sys.stderr) -> None:
    for r in rows:
        m = {k: v["cpu_ms"] for k, v in r["ms"].items()}
        print(f"  {r['size'][0]}x{r['size'][1]} gop{r['gop']} {r['content']:7} {r['sampling']:8} cpu ms: "
              f"exact {m['exact']:7.1f}  keyframe {m['keyframe']:7.1f}  floor {m['floor']:7.1f}  "
              f"speed-up {r['speedup_cpu']:5.2f}x (wall {r['speedup_wall']:5.2f}x; bound {r['speedup_bound_cpu']:5.2f}x)  "
              f"max|d| {r['max_abs_diff_vs_exact_decoding_of_moved']:g}", file=file, flush=True)


# --- eval ------------------------------------------------------------------------------------------


def encode_mpeg4(frames: np.ndarray, gop: int, fps: int = 8) -> bytes:
    """uint8 [F, S, S, 3] -> MPEG-4 Part 2 in mp4 bytes, as training.synthetic writes, with keyframe interval ``gop``."""
    return encode_frames(frames, fps=fps, codec="mpeg4", options={"qscale": "2"}, gop=gop, threads=1)


def eval_set(task: str, clips: int, frames: int, gop: int, seed: int) -> list[tuple[bytes, int]]:
    from training.synthetic import TASKS, clip_rng

    t = TASKS[task]
    return [(encode_mpeg4(t.draw(clip_rng(seed, "val", i), i % len(t.labels), 64, frames), gop), i % len(t.labels))
            for i in range(clips)]


def evaluate(clf, clips: list[tuple[bytes, int]]) -> dict:
    """Top-1 and decode CPU ms per clip, exact vs keyframe; moved share; agreement."""
    exact = clf.spec.sampling.replace(seek="exact")
    fast = exact.replace(seek="keyframe")
    hits = {"exact": 0, "keyframe": 0}
    ms: dict[str, list[float]] = {"exact": [], "keyframe": []}
    moved = total = agree = 0
    for data, label in clips:
        answers = {}
        for name, cfg in (("exact", exact), ("keyframe", fast)):  # alternate: load hits both alike
            t = time.process_time()
            views = decode_clip(data, cfg)
            ms[name].append(1e3 * (time.process_time() - t))
            with torch.no_grad():
                answers[name] = int(clf.predict_views(views).argmax())
            hits[name] += answers[name] == label
        agree += answers["exact"] == answers["keyframe"]
        a, b = sample_plan(data, exact), sample_plan(data, fast)
        moved += sum(x != y for va, vb in zip(a, b, strict=True) for x, y in zip(va, vb, strict=True))
        total += sum(len(v) for v in a)
    n = max(len(clips), 1)
    return {"clips": len(clips), "top1_exact": hits["exact"] / n, "top1_keyframe": hits["keyframe"] / n,
            "agreement": agree / n, "moved_share": moved / max(total, 1),
            "decode_cpu_ms_exact": statistics.mean(ms["exact"]) if clips else 0.0,
            "decode_cpu_ms_keyframe": statistics.mean(ms["keyframe"]) if clips else 0.0}


def run_eval(args) -> list[dict]:
    from stadapter.api import load_classifier

    rows = []
    for name, task_dir in args.bundle:
        clf = load_classifier(ROOT / "model_repository/trunk" if args.trunk is None else args.trunk, task_dir)
        task = clf.spec.name
        for frames in args.eval_frames:
            r = evaluate(clf, eval_set(task, args.eval_clips, frames, args.eval_gop, args.eval_seed))
            rows.append({"bundle": name, "task": task, "set": f"{args.eval_clips} fresh clips, {frames} frames, "
                         f"GOP {args.eval_gop}", **r})
            print_eval_rows(rows[-1:])
        samples = sorted((ROOT / "samples" / task).glob("*.mp4"))
        if samples:
            clips = [(p.read_bytes(), clf.labels.index(p.stem)) for p in samples]
            rows.append({"bundle": name, "task": task, "set": f"samples/{task} ({len(clips)} clips)",
                         "keyframes": {p.name: keyframes(p.read_bytes()) for p in samples}, **evaluate(clf, clips)})
            print_eval_rows(rows[-1:])
    return rows


def print_eval_rows(rows: list[dict], file=sys.stderr) -> None:
    for r in rows:
        print(f"  {r['bundle']:18} {r['set']:36} top-1 exact {100 * r['top1_exact']:5.1f}%  keyframe "
              f"{100 * r['top1_keyframe']:5.1f}%  agree {100 * r['agreement']:5.1f}%  moved {100 * r['moved_share']:5.1f}%  "
              f"decode cpu {r['decode_cpu_ms_exact']:6.2f} / {r['decode_cpu_ms_keyframe']:6.2f} ms "
              f"({r['decode_cpu_ms_exact'] / max(r['decode_cpu_ms_keyframe'], 1e-9):4.2f}x)", file=file, flush=True)


def _bundle(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"--bundle wants NAME=TASK_DIR, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips-only", action="store_true")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--sizes", nargs="+", default=["320x240", "1280x720"])
    ap.add_argument("--gops", nargs="+", type=int, default=[60])
    ap.add_argument("--content", nargs="+", choices=("pan", "texture"), default=["pan", "texture"])
    ap.add_argument("--eval-clips", type=int, default=200)
    ap.add_argument("--eval-frames", nargs="+", type=int, default=[16, 240])
    ap.add_argument("--eval-gop", type=int, default=60)
    ap.add_argument("--eval-seed", type=int, default=1000)
    ap.add_argument("--trunk", type=Path, default=None, help="trunk folder (default model_repository/trunk)")
    ap.add_argument("--bundle", type=_bundle, action="append", default=None,
                    help="NAME=TASK_DIR (repeatable; default the demo motion and shapes bundles)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.bundle = args.bundle or [("demo motion", ROOT / "model_repository/tasks/motion/1"),
                                  ("demo shapes", ROOT / "model_repository/tasks/shapes/1")]
    torch.set_num_threads(1)
    result: dict = {"host": {"python": platform.python_version(), "av": av.__version__, "torch": torch.__version__,
                             "cpus": os.cpu_count()}, "repeats": args.repeats}
    if not args.eval_only:
        print(f"decode_clip to [1, 8, 3, 224, 224], {args.seconds:g} s at {args.fps} fps, libx264 mp4; median of "
              f"{args.repeats}, alternating", file=sys.stderr)
        result["clips"] = run_clips(args)
    if not args.clips_only:
        print(f"eval: GOP {args.eval_gop}, seed {args.eval_seed}; decode CPU ms per clip exact / keyframe", file=sys.stderr)
        result["eval"] = run_eval(args)
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
