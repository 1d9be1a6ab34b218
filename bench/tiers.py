"""Start-up with many tasks: time to ready and resident memory of a real server, 2 tasks vs many.

    python -m bench.tiers [--tasks 1000] [--repeat 1] [--out tiers.json]

Builds two repositories on the tiny test trunk (``test-vit-tiny``, random weights): the 2-task one the tests use,
and one of ``--tasks`` tasks, each with its own random weights (distinct files, nothing shared). Starts
``python -m server`` on each (CPU, float32, the warm-up on, as served) and reports the seconds from the process's
start to its ready file, the server's VmRSS once ready, then the first request's latency for a task never used
(its weights read on that request where the server loads lazily) and a second request's. Run it from a checkout to
measure that checkout's server (the comparison with an older commit: run the same file from that commit's tree).

Prints a table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.refused_rss import rss_kb
from bench.report import emit_json


def build(root: Path, trunk_dir: Path, n: int) -> Path:
    """A repository of ``n`` tasks with distinct random weights on the trunk in ``trunk_dir``."""
    import shutil

    from bench.tasks import random_bundle
    from stadapter import AdapterConfig, SamplingConfig, load_trunk

    shutil.copytree(trunk_dir, root / "trunk")
    trunk = load_trunk(root / "trunk")
    adapter, sampling = AdapterConfig(width=8, pre_attn=True, pre_mlp=True), SamplingConfig(num_frames=8, input_size=32)
    for k in range(n):
        random_bundle(trunk, root / "tasks" / f"task{k}" / "1", f"task{k}", adapter, sampling, 5, seed=100 + k)
    return root


def measure(repo: Path, clip: bytes, last_task: str) -> dict:
    import grpc

    from server.process import ServerProcess
    from stadapter_api.v1 import inference_pb2 as pb
    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    t0 = time.monotonic()
    with ServerProcess(repo, "--device", "cpu", "--dtype", "float32", "--port", "0", "--metrics-port", "0",
                       "--http-port", "-1", "--poll-interval-s", "0", env={"OMP_NUM_THREADS": "1"}, timeout=600) as srv:
        ready_s = time.monotonic() - t0
        rss = rss_kb(srv.proc.pid) * 1024
        stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
        times = []
        for _ in range(2):
            t = time.monotonic()
            stub.Classify(pb.ClassifyRequest(task=last_task, clip=clip), timeout=120)
            times.append(time.monotonic() - t)
        rss_after = rss_kb(srv.proc.pid) * 1024
    return {"ready_s": round(ready_s, 3), "rss_ready_bytes": rss, "rss_after_bytes": rss_after,
            "first_request_s": round(times[0], 4), "second_request_s": round(times[1], 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import numpy as np

    from stadapter import init_trunk
    from stadapter.video.synthetic import encode_frames

    frames = np.random.default_rng(0).integers(0, 255, (16, 72, 96, 3), dtype=np.uint8)
    clip = encode_frames(list(frames), fps=8, codec="mpeg4")
    results = {"tasks": {}}
    with tempfile.TemporaryDirectory(prefix="bench-tiers-") as tmp:
        trunk_dir = Path(tmp) / "trunk"
        init_trunk("test-vit-tiny", "random", trunk_dir, seed=0)
        for n in (2, args.tasks):
            t = time.monotonic()
            repo = build(Path(tmp) / f"repo{n}", trunk_dir, n)
            built_s = time.monotonic() - t
            results["tasks"][str(n)] = {**measure(repo, clip, f"task{n - 1}"), "build_s": round(built_s, 1)}
    print(f"{'tasks':>6} {'ready s':>8} {'RSS MiB':>8} {'RSS after':>9} {'1st req s':>9} {'2nd req s':>9}", file=sys.stderr)
    for n, r in results["tasks"].items():
        print(f"{n:>6} {r['ready_s']:>8.2f} {r['rss_ready_bytes'] / 2**20:>8.1f} {r['rss_after_bytes'] / 2**20:>9.1f} "
              f"{r['first_request_s']:>9.3f} {r['second_request_s']:>9.3f}", file=sys.stderr)
    emit_json(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
