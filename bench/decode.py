"""Decode bench: stadapter.video.decode_clip vs "decode every frame, then sample".

    python -m bench.decode [--repeats 20] [--seconds 10] [--fps 30] [--size 320x240] [--gop 30]
                           [--frames 8] [--mode uniform] [--content texture pan] [--out bench_decode.json]
                           [--libraries [--lib-sizes 320x240 1280x720] [--lib-gops 30 60] [--lib-repeats 7]
                            [--lib-modes uniform stride] [--lib-content pan] [--skip-naive]]
                           [--fast-seek [--fast-content pan texture]]

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

Other decoders (``--libraries``)
--------------------------------
With ``--libraries`` the bench also compares, on the very same clips and frame
indices, raw RGB uint8 frames at the sampled indices (no resize / crop), bytes in
memory to frames out, one decoding thread each:

* ``stadapter``: ``decode_frames`` (the frames ``decode_clip`` starts from);
* ``torchcodec exact`` / ``torchcodec approx``: ``VideoDecoder(bytes, seek_mode=...,
  num_ffmpeg_threads=1).get_frames_at(indices)`` (exact scans the whole file first);
* ``decord``: ``VideoReader(BytesIO(bytes), num_threads=1).get_batch(indices)``;
* ``pyav decode-all``: decode every frame (``thread_count=1``), convert only the
  sampled ones (single-threaded swscale): the cheapest "decode everything".

Clips: every ``--lib-sizes`` x ``--lib-gops`` (default 320x240 and 1280x720, GOP 30
and 60; ``--seconds`` / ``--fps``, content ``--lib-content``), each sampled with every
``--lib-modes`` (uniform, stride 16; ``--frames`` frames). Times are the median of
``--lib-repeats`` runs (default 7), rows timed alternately. Every row's frames are
checked against stadapter's: ``max |diff|`` 0 means pixel-identical. A library that
is not installed gets a row saying so (``pip install .[bench]``), one that fails the
error it raised.

The fast sampling mode (``--fast-seek``)
----------------------------------------
With ``--fast-seek`` the bench also times, on clips of every ``--lib-sizes`` x ``--lib-gops`` and
each ``--fast-content``, ``decode_clip`` exact vs ``seek="keyframe"`` (each sample moved to the
cheapest frame of its segment, see ``stadapter.video.sampling``) and the floor (only the keyframes
the moved frames hang from), through :func:`bench.fast_seek.run_clips`; ``python -m bench.fast_seek``
runs the same rows alone and adds top-1 on the demo tasks in both modes.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from bench.report import emit_json
from bench.timing import timed_samples
from stadapter.config import SamplingConfig
from stadapter.video import FrameConverter, VideoLimits, decode_clip, decode_frames, probe, sample_indices, views_to_tensor
from stadapter.video.synthetic import make_clip


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


def bench_one(data: bytes, cfg: SamplingConfig, repeats: int) -> dict:
    """Times of ours / naive / naive_to_ndarray on one clip, and the speedups."""
    info = probe(data)
    diff = float((decode_clip(data, cfg) - naive_clip(data, cfg)).abs().max())
    wall, cpu = timed_samples({"ours": lambda: decode_clip(data, cfg), "naive": lambda: naive_clip(data, cfg),
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


def _not_installed(name: str):
    def run(data: bytes, idx: list[int]) -> np.ndarray:
        raise ModuleNotFoundError(f"{name} is not installed")
    return run


def _torchcodec(mode: str):
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception:  # ImportError, or its native libraries failing to load (OSError / RuntimeError)
        return _not_installed("torchcodec")

    def run(data: bytes, idx: list[int]) -> np.ndarray:
        decoder = VideoDecoder(data, seek_mode=mode, num_ffmpeg_threads=1, dimension_order="NHWC")
        return decoder.get_frames_at(idx).data.numpy()
    return run


def _decord():
    try:
        import decord
    except Exception:
        return _not_installed("decord")

    def run(data: bytes, idx: list[int]) -> np.ndarray:
        return decord.VideoReader(io.BytesIO(data), num_threads=1).get_batch(idx).asnumpy()
    return run


def _stadapter(data: bytes, idx: list[int]) -> np.ndarray:
    return decode_frames(data, idx)


def _pyav_decode_all(data: bytes, idx: list[int]) -> np.ndarray:
    want, scaler, got = set(idx), VideoReformatter(), {}
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        stream.thread_count = 1
        for i, f in enumerate(c.decode(stream)):
            if i in want:
                got[i] = scaler.reformat(f, format="rgb24", threads=1).to_ndarray()
    return np.stack([got[i] for i in idx])


def library_decoders() -> dict:
    return {"stadapter": _stadapter, "torchcodec exact": _torchcodec("exact"),
            "torchcodec approx": _torchcodec("approximate"), "decord": _decord(),
            "pyav decode-all": _pyav_decode_all}


def bench_libraries(data: bytes, idx: list[int], repeats: int) -> dict:
    """Median ms of each library reading frames ``idx`` from ``data``; max |diff| vs stadapter's frames."""
    ref = decode_frames(data, idx).astype(np.int16)
    rows: dict = {}
    runs: dict = {}
    for name, fn in library_decoders().items():
        try:
            frames = np.asarray(fn(data, idx))  # also the warm-up
        except ModuleNotFoundError as e:
            rows[name] = {"status": "not installed", "detail": str(e)}
            continue
        except Exception as e:  # a library failing on this clip is a result, not a crash
            rows[name] = {"status": "error", "detail": f"{type(e).__name__}: {e}"[:200]}
            continue
        if frames.shape != ref.shape:
            diff = None
        else:
            diff = int(np.abs(frames.astype(np.int16) - ref).max())
        rows[name] = {"status": "ok", "shape": list(frames.shape), "max_abs_diff_vs_stadapter": diff}
        runs[name] = fn
    times, _ = timed_samples({name: functools.partial(fn, data, idx) for name, fn in runs.items()}, repeats,
                             warmup=0)  # the check above was the warm-up
    for name, t in times.items():
        rows[name].update(ms_median=1e3 * statistics.median(t), ms_runs=[1e3 * x for x in t])
    base = rows["stadapter"].get("ms_median")
    for row in rows.values():
        if base and row.get("ms_median"):
            row["x_stadapter_time"] = row["ms_median"] / base
    return rows


def print_library_table(entries: list[dict], repeats: int, file=sys.stderr) -> None:
    print(f"\nraw RGB frames at the sampled indices, bytes in memory -> frames, 1 thread, median of {repeats} "
          f"(ms; x = time / stadapter's; max|d| vs stadapter's frames)", file=file)
    print(f"  {'clip':22} {'sampling':10} {'decoder':18} {'ms':>9} {'x':>6} {'max|d|':>7}", file=file)
    for e in entries:
        clip = f"{e['size'][0]}x{e['size'][1]} gop{e['gop']} {e['content']}"
        for name, row in e["rows"].items():
            if row["status"] != "ok":
                print(f"  {clip:22} {e['sampling']:10} {name:18} {row['status']}"
                      + (f" ({row['detail'][:60]})" if row["status"] == "error" else ""), file=file)
                continue
            d = row["max_abs_diff_vs_stadapter"]
            d = "shape" if d is None else str(d)
            print(f"  {clip:22} {e['sampling']:10} {name:18} {row['ms_median']:9.2f} "
                  f"{row.get('x_stadapter_time', float('nan')):6.2f} {d:>7}", file=file)


def run_libraries(args, frames: int) -> list[dict]:
    torch.set_num_threads(1)
    entries = []
    n = round(args.seconds * args.fps)
    for size in args.lib_sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        for gop in args.lib_gops:
            with tempfile.TemporaryDirectory() as tmp:
                path = make_clip(Path(tmp) / "bench.mp4", num_frames=n, fps=args.fps, size=(w, h),
                                 codec="libx264", gop=gop, pattern=args.lib_content)
                data = path.read_bytes()
            total = probe(data).num_frames
            for mode in args.lib_modes:
                cfg = SamplingConfig(num_frames=frames, mode=mode, stride=16)
                idx = sample_indices(total, cfg)
                label = "uniform" if mode == "uniform" else f"stride{cfg.stride}"
                entries.append({"size": [w, h], "gop": gop, "content": args.lib_content, "bytes": len(data),
                                "num_frames": total, "sampling": label, "indices": idx,
                                "rows": bench_libraries(data, idx, args.lib_repeats)})
                print_library_table(entries[-1:], args.lib_repeats) if args.lib_progress else None
    return entries


def _versions() -> dict:
    out = {"av": av.__version__}
    for name in ("torchcodec", "decord"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


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
    ap.add_argument("--libraries", action="store_true",
                    help="also compare stadapter with torchcodec, decord and PyAV decode-all (see the docstring)")
    ap.add_argument("--lib-sizes", nargs="+", default=["320x240", "1280x720"])
    ap.add_argument("--lib-gops", nargs="+", type=int, default=[30, 60])
    ap.add_argument("--lib-modes", nargs="+", choices=("uniform", "stride"), default=["uniform", "stride"])
    ap.add_argument("--lib-content", choices=("texture", "pan"), default="pan")
    ap.add_argument("--lib-repeats", type=int, default=7, help="runs per row; the median is reported")
    ap.add_argument("--lib-progress", action="store_true", help="print each clip's rows as they are done")
    ap.add_argument("--skip-naive", action="store_true", help="only the --libraries / --fast-seek comparisons")
    ap.add_argument("--fast-seek", action="store_true", help="also time the keyframe sampling mode (see the docstring)")
    ap.add_argument("--fast-content", nargs="+", choices=("texture", "pan"), default=["pan", "texture"])
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
    for content in [] if args.skip_naive else args.content:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_clip(Path(tmp) / "bench.mp4", num_frames=round(args.seconds * args.fps), fps=args.fps,
                             size=(w, h), codec="libx264", gop=args.gop, pattern=content)
            data = path.read_bytes()
        result["content"][content] = bench_one(data, cfg, args.repeats)
        print_table(content, result["content"][content])
    if args.libraries:
        result["libraries"] = {"repeats": args.lib_repeats, "seconds": args.seconds, "fps": args.fps,
                               "threads": 1, "versions": _versions(), "clips": run_libraries(args, cfg.num_frames)}
        print_library_table(result["libraries"]["clips"], args.lib_repeats)
    if args.fast_seek:
        from bench.fast_seek import run_clips

        print(f"\nfast sampling mode: decode_clip exact vs seek='keyframe', median of {args.lib_repeats}", file=sys.stderr)
        result["fast_seek"] = run_clips(argparse.Namespace(
            seconds=args.seconds, fps=args.fps, sizes=args.lib_sizes, gops=args.lib_gops, content=args.fast_content,
            repeats=args.lib_repeats))
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
