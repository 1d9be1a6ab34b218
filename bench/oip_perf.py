"""Triton's perf_analyzer against the server's Open Inference Protocol endpoint, vs the project's load generator.

    python -m bench.oip_perf [--concurrency 4] [--seconds 8] [--task motion] [--out runs/oip_perf.json]

One server (``python -m server`` on a copy of ``model_repository/``, the embedded trunk)
is loaded twice at the same closed-loop concurrency, one clip of ``samples/<task>/``
per request: first by ``perf_analyzer -i grpc`` through ``inference.GRPCInferenceService``
(``ModelInfer``, input ``CLIP`` as BYTES), then by ``clients.loadgen`` through the native
``Classify``. Prints JSON and a short table (throughput and latency of each).

perf_analyzer ships as a binary in the tritonclient 2.41 wheel; it needs ``libb64-0d``
(apt) and ``libcudart.so.12`` (pip ``nvidia-cuda-runtime-cu12``) to start, even on a CPU
machine. Without them this prints what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.report import emit_json
from clients.loadgen import LoadConfig, run_load
from server.demo import copy_repository
from server.frontends.oip_tensors import join_bytes_elements
from server.process import ROOT, ServerProcess


def perf_analyzer_command() -> tuple[list[str], dict[str, str]]:
    """The binary next to this Python, and an environment whose library path finds libcudart.so.12."""
    exe = Path(sys.executable).with_name("perf_analyzer")
    if not exe.is_file():
        raise SystemExit("perf_analyzer is missing: pip install 'tritonclient[grpc]==2.41.0' ships it")
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cr  # optional: only for the library path

        lib = str(Path(list(cr.__path__)[0]) / "lib")
        env["LD_LIBRARY_PATH"] = lib + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    except ImportError:
        pass
    return [str(exe)], env


def run_perf_analyzer(address: str, task: str, clip: bytes, concurrency: int, seconds: float, work: Path) -> dict:
    data = work / "input.json"
    # perf_analyzer sends b64 data as the tensor's raw buffer: for BYTES, the serialized (length-prefixed) form.
    raw = join_bytes_elements([clip])
    data.write_text(json.dumps({"data": [{"CLIP": {"b64": base64.b64encode(raw).decode()}}]}))
    report = work / "perf.csv"
    cmd, env = perf_analyzer_command()
    cmd += ["-m", task, "-u", address, "-i", "grpc", "--input-data", str(data), "--shape", "CLIP:1",
            "--concurrency-range", f"{concurrency}:{concurrency}", "-p", str(int(seconds * 1000)),
            "--max-trials", "6", "-f", str(report)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        missing = "libb64" in r.stderr or "libcudart" in r.stderr
        hint = " (needs apt libb64-0d and pip nvidia-cuda-runtime-cu12)" if missing else ""
        raise SystemExit(f"perf_analyzer failed{hint}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    (row,) = list(csv.DictReader(report.open()))
    return {
        "throughput_rps": float(row["Inferences/Second"]),
        "latency_ms": {q: float(row[f"p{q} latency"]) / 1e3 for q in (50, 90, 99)},
        "command": " ".join(cmd[1:]),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.oip_perf", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="motion")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0, help="measurement window of each tool")
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--samples", type=Path, default=ROOT / "samples")
    p.add_argument("--out", type=Path)
    ns = p.parse_args(argv)
    clip_path = sorted((ns.samples / ns.task).glob("*.mp4"))[0]
    clip = clip_path.read_bytes()
    with tempfile.TemporaryDirectory(prefix="stadapter-oip-perf-") as tmp:
        work = Path(tmp)
        repo = copy_repository(ns.repository, work / "repo")
        with ServerProcess(repo, "--poll-interval-s", "0", timeout=300, workdir=work) as srv:
            perf = run_perf_analyzer(srv.address, ns.task, clip, ns.concurrency, ns.seconds, work)
            cfg = LoadConfig(address=srv.address, tasks=(ns.task,), clips=(clip_path,), concurrency=ns.concurrency,
                             duration_s=ns.seconds)
            native = asyncio.run(run_load(cfg))
    result: dict[str, Any] = {
        "task": ns.task, "clip": clip_path.name, "clip_bytes": len(clip), "concurrency": ns.concurrency,
        "perf_analyzer_oip": perf,
        "loadgen_native": {"throughput_rps": native["throughput_rps"], "latency_ms": native["latency_ms"],
                           "errors": native["errors"]},
    }
    result["oip_over_native"] = round(perf["throughput_rps"] / native["throughput_rps"], 3)
    emit_json(result, ns.out)
    n = result["loadgen_native"]
    print(f"\n| tool (concurrency {ns.concurrency}) | clips/s | p50 ms | p99 ms |\n|---|---|---|---|")
    print(f"| perf_analyzer, ModelInfer (OIP) | {perf['throughput_rps']:.1f} | {perf['latency_ms'][50]:.1f} | "
          f"{perf['latency_ms'][99]:.1f} |")
    print(f"| clients.loadgen, Classify | {n['throughput_rps']:.1f} | {n['latency_ms']['p50']:.1f} | "
          f"{n['latency_ms']['p99']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
