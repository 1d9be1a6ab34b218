"""Several tasks per clip: one request for 4 tasks vs 4 requests for the same clip, over gRPC end to end.

    python -m bench.multi_task [--rounds 15] [--out bench_multi_task.json]

A repository with a random tiny trunk (``test-vit-tiny``: 2 blocks, width 32, 32 px)
and 4 tasks with full-depth adapters (every block, before attention and before the MLP),
all with one sampling. The server runs in a subprocess on 127.0.0.1 (sandboxed decoder
processes, the default). For each clip:

* ``one_request``: ``Classify`` with ``tasks=[t0..t3]`` (one upload, one decode);
* ``four_requests``: 4 ``Classify`` calls for the same clip in flight at once (4 uploads,
  4 decodes; their rows may share a forward too).

Rounds alternate the two (:func:`bench.timing.timed_rounds`); the figure is the median
wall time per clip, and ``speedup`` = four_requests / one_request (goal >= 1.0). The
server's ``stadapter_decode_seconds_count`` per round is reported for both. Prints a
table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.timing import timed_rounds
from bench.report import emit_json

TASKS = tuple(f"task{i}" for i in range(4))
CLIPS = {"64x48 1 s": dict(frames=30, size=(64, 48)), "320x240 10 s": dict(frames=300, size=(320, 240))}


def encode_clip(frames: int, size: tuple[int, int], fps: int = 30, gop: int = 30) -> bytes:
    """An h264 mp4 of a pattern that moves one pixel per frame (PyAV, in memory)."""
    import numpy as np

    from stadapter.video.synthetic import encode_frames

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pictures = (np.stack([(xx + i) % 256, (yy * 2 + i) % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
                for i in range(frames))
    return encode_frames(pictures, fps=fps, gop=gop)


def build_repository(root: Path) -> Path:
    from bench.tasks import random_bundle
    from stadapter import AdapterConfig, SamplingConfig, init_trunk, load_trunk

    init_trunk("test-vit-tiny", "random", root / "trunk", seed=0)
    trunk = load_trunk(root / "trunk")
    cfg = AdapterConfig(width=8, pre_attn=True, pre_mlp=True)  # every block (layers = all), both places
    sampling = SamplingConfig(num_frames=8, input_size=32)
    for i, name in enumerate(TASKS):
        random_bundle(trunk, root / "tasks" / name / "1", name, cfg, sampling, 5, seed=i, std=0.1,
                      labels=[f"{name}-{c}" for c in range(5)])
    return root


def decode_count(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "stadapter_decode_seconds_count"), 0.0)


def run(rounds: int) -> dict:
    from clients import Client
    from server.process import ServerProcess

    out: dict = {"tasks": len(TASKS), "rounds": rounds, "trunk": "test-vit-tiny (2 blocks, width 32, 32 px)",
                 "adapters": "full depth: every block, pre-attn + pre-MLP, width 8", "frames": 8, "clips": []}
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(Path(tmp) / "repo")
        with ServerProcess(repo, "--allow-insecure-admin", "--poll-interval-s", "0",
                           env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}) as srv, \
                Client(srv.address) as c, ThreadPoolExecutor(len(TASKS)) as pool:
            for label, kw in CLIPS.items():
                data = encode_clip(**kw)

                def one() -> None:
                    assert all(not isinstance(r, Exception) for r in c.classify(data, list(TASKS)))

                def four() -> None:
                    list(pool.map(lambda t: c.classify(data, t), TASKS))

                n0 = decode_count(srv.metrics_url)
                one()
                n1 = decode_count(srv.metrics_url)
                four()
                n2 = decode_count(srv.metrics_url)
                t = timed_rounds({"one_request": one, "four_requests": four}, rounds)
                out["clips"].append({"clip": label, "bytes": len(data), "one_request_ms": t["one_request"] * 1e3,
                                     "four_requests_ms": t["four_requests"] * 1e3,
                                     "speedup": t["four_requests"] / t["one_request"],
                                     "decodes_one_request": n1 - n0, "decodes_four_requests": n2 - n1})
    return out


def print_table(r: dict, file=sys.stderr) -> None:
    print(f"{r['tasks']} tasks, {r['trunk']}, {r['adapters']}, {r['frames']} frames; median of {r['rounds']} rounds",
          file=file)
    print(f"{'clip':<18} {'bytes':>8} {'1 request ms':>13} {'4 requests ms':>14} {'speedup':>8} {'decodes':>8}",
          file=file)
    for e in r["clips"]:
        print(f"{e['clip']:<18} {e['bytes']:>8} {e['one_request_ms']:>13.1f} {e['four_requests_ms']:>14.1f} "
              f"{e['speedup']:>7.2f}x {int(e['decodes_one_request'])} vs {int(e['decodes_four_requests'])}", file=file)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    r = run(args.rounds)
    print_table(r)
    emit_json(r, args.out)
    return r


if __name__ == "__main__":
    main()
