"""Windows over a long clip: one ClassifyWindows call vs each window sent as its own clip through Classify.

    python -m bench.windows [--seconds 60] [--rounds 5] [--in-flight 8] [--out bench_windows.json]

A repository with a random tiny trunk (``test-vit-tiny``: 2 blocks, width 32, 32 px) and one
task (8 frames, uniform sampling, adapters in every block). The server runs in a subprocess on
127.0.0.1 with its defaults (sandboxed decoder processes, ``--max-batch-size 32``) but
``--window-decoders 2`` (a timeline split between both decoder workers). The clip is
``--seconds`` of 64x48 h264 at 30 fps (GOP 30) of a moving pattern; for each (window, stride):

* ``windows``: one ``ClassifyWindows`` call; the clip is uploaded once and decoded once, front to
  back, and its windows are computed in batches;
* ``one_decoder``: the same call on a second server with ``--window-decoders 1``, the server default
  (the video in one decoder worker, front to back; the main server splits it between both workers,
  each part found by one seek), so ``split`` = one_decoder / windows shows what the split gains;
* ``per_window``: every window cut beforehand (not timed) into its own clip of the same frames,
  encoded the same way, sent as ``Classify`` calls, ``--in-flight`` at once (default 8, so they can
  share forwards and both decoder workers; 1 = one after the other): one upload, one worker round
  trip and one decode per window.

Rounds alternate the two (:func:`bench.timing.timed_rounds`); the figure is seconds of video
classified per second of wall time (the clip's covered seconds / the median round time), and
``speedup`` = windows / per_window (goal >= 3 at stride = window). The server's CPU seconds per
call (the server process and its decoder processes, from /proc) are reported too: on few cores
the wall-clock ratio follows the CPU saved (at stride = window both paths decode about the same
frames; one call saves the uploads, the worker round trips and the re-encoded GOPs). Prints a
table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import emit_json
from bench.timing import timed_rounds

FPS, SIZE, TASK = 30, (64, 48), "timeline"
CASES = ((2.0, 2.0), (2.0, 1.0))  # (window_s, stride_s)
IN_FLIGHT = 8


def pictures(start: int, count: int, size: tuple[int, int] = SIZE):
    """Frames ``start .. start + count - 1`` of a pattern that moves one pixel per frame."""
    import numpy as np

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(start, start + count):
        yield np.stack([(xx + i) % 256, (yy * 2 + i) % 256, (xx + yy + 3 * i) % 256], axis=-1).astype(np.uint8)


def encode(start: int, count: int) -> bytes:
    from stadapter.video.synthetic import encode_frames

    return encode_frames(pictures(start, count), fps=FPS, gop=FPS)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its live descendants, from /proc (0 where unreadable)."""
    tick, total, todo, seen = os.sysconf("SC_CLK_TCK"), 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def build_repository(root: Path) -> Path:
    from bench.tasks import random_bundle
    from stadapter import AdapterConfig, SamplingConfig, init_trunk, load_trunk

    init_trunk("test-vit-tiny", "random", root / "trunk", seed=0)
    trunk = load_trunk(root / "trunk")
    random_bundle(trunk, root / "tasks" / TASK / "1", TASK, AdapterConfig(width=8, pre_attn=True, pre_mlp=True),
                  SamplingConfig(num_frames=8, input_size=32), 5, seed=0, std=0.1)
    return root


def run(seconds: int, rounds: int, in_flight: int = IN_FLIGHT) -> dict:
    from clients import Client
    from server.process import ServerProcess

    total = seconds * FPS
    out: dict = {"clip": f"{seconds} s, {SIZE[0]}x{SIZE[1]} h264 at {FPS} fps, GOP {FPS}", "rounds": rounds,
                 "trunk": "test-vit-tiny (2 blocks, width 32, 32 px)", "frames_per_window": 8,
                 "per_window_in_flight": in_flight, "cases": []}
    clip = encode(0, total)
    out["clip_bytes"] = len(clip)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp) / "repo")
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with ServerProcess(repo, "--poll-interval-s", "0", "--window-decoders", "2", env=env) as srv, \
                ServerProcess(repo, "--poll-interval-s", "0", "--window-decoders", "1", env=env) as one, \
                Client(srv.address, stream_threshold_bytes=64 << 20) as c, \
                Client(one.address, stream_threshold_bytes=64 << 20) as c1, ThreadPoolExecutor(in_flight) as pool:
            for window_s, stride_s in CASES:
                length, step = round(window_s * FPS), round(stride_s * FPS)
                starts = list(range(0, total - length + 1, step))
                cuts = [encode(s, length) for s in starts]  # the same frames, one clip per window

                cpu: dict[str, list[float]] = {"windows": [], "one_decoder": [], "per_window": []}

                def timeline(name: str, server, client, window_s=window_s, stride_s=stride_s, cpu=cpu, starts=starts) -> None:
                    c0 = tree_cpu_s(server.proc.pid)
                    got = list(client.windows(clip, TASK, window_s, stride_s))
                    cpu[name].append(tree_cpu_s(server.proc.pid) - c0)
                    assert [w.index for w in got] == list(range(len(starts))), (len(got), len(starts))

                def per_window(cuts=cuts, cpu=cpu, starts=starts) -> None:
                    c0 = tree_cpu_s(srv.proc.pid)
                    got = list(pool.map(lambda cut: c.classify(cut, TASK), cuts))
                    cpu["per_window"].append(tree_cpu_s(srv.proc.pid) - c0)
                    assert len(got) == len(starts)

                t = timed_rounds({"windows": lambda: timeline("windows", srv, c),
                                  "one_decoder": lambda: timeline("one_decoder", one, c1),
                                  "per_window": per_window}, rounds)
                cpu_s = {k: statistics.median(v[-rounds:]) for k, v in cpu.items()}  # the warm-up round left out
                covered = (starts[-1] + length) / FPS
                case = {"window_s": window_s, "stride_s": stride_s, "windows": len(starts), "video_s": covered}
                for name in cpu:  # windows, one_decoder, per_window
                    case.update({f"{name}_s": t[name], f"{name}_video_s_per_s": covered / t[name],
                                 f"server_cpu_s_{name}": cpu_s[name]})
                out["cases"].append(case | {
                    "speedup": t["per_window"] / t["windows"], "split": t["one_decoder"] / t["windows"],
                    "cpu_ratio": cpu_s["per_window"] / max(cpu_s["windows"], 1e-9),
                    "per_window_upload_bytes": sum(len(b) for b in cuts),
                })
    return out


def print_table(r: dict, file=sys.stderr) -> None:
    print(f"{r['clip']} ({r['clip_bytes']} bytes), {r['trunk']}, {r['frames_per_window']} frames per window; "
          f"median of {r['rounds']} rounds; per-window clips {r['per_window_in_flight']} in flight", file=file)
    print(f"{'window/stride':<14} {'windows':>7} {'ClassifyWindows':>16} {'1 decoder':>10} {'split':>6} "
          f"{'per-window':>11} {'speedup':>8} {'server CPU s':>16} {'CPU ratio':>9}  "
          "(video s per wall s; CPU: windows / per-window)", file=file)
    for e in r["cases"]:
        print(f"{e['window_s']:g} s / {e['stride_s']:g} s".ljust(14) + f" {e['windows']:>7} "
              f"{e['windows_video_s_per_s']:>16.1f} {e['one_decoder_video_s_per_s']:>10.1f} {e['split']:>5.2f}x "
              f"{e['per_window_video_s_per_s']:>11.1f} {e['speedup']:>7.2f}x "
              f"{e['server_cpu_s_windows']:>7.2f} / {e['server_cpu_s_per_window']:<6.2f} {e['cpu_ratio']:>8.2f}x",
              file=file)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="length of the clip")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="per-window Classify calls at once")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.seconds < math.ceil(max(w for w, _ in CASES)):
        ap.error(f"--seconds must hold one window ({max(w for w, _ in CASES):g} s)")
    r = run(args.seconds, args.rounds, max(1, args.in_flight))
    print_table(r)
    emit_json(r, args.out)
    return r


if __name__ == "__main__":
    main()
