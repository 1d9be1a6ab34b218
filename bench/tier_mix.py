"""The parts of ``bench.tiers``: a repository of many distinct random tasks, request mixes over them (Zipf, uniform),
a closed-loop gRPC driver that times every request, and the server's tier counters.

Every task has its own random weights (seeded by its index: no two bundles hold the same bytes) in the shape of a
template task (the embedded demo's, by default), so the host tier holds and reads real, distinct bundles.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

TASK_PREFIX = "task"
STD = 0.02  # the random weights' scale (bench.tasks.random_bundle's)


def task_name(k: int) -> str:
    return f"{TASK_PREFIX}{k}"


def build_repository(root: Path, trunk_dir: Path, template: Path, n: int) -> int:
    """``root``: the trunk in ``trunk_dir`` and ``n`` tasks shaped as the bundle in ``template``, each with its own
    random weights (task k: seed k), its digest recorded as a register records it. Returns one task's tensor bytes.
    Files are written without the fsync a register does (a bench repository, rebuilt when lost)."""
    import torch

    from server.registry.folders import DIGEST_FILE, bundle_digest
    from stadapter.bundle import ADAPTER_FILE, TASK_FILE, BundleLimits, read_spec
    from stadapter.weights import read_weights, write_safetensors

    shutil.copytree(trunk_dir, root / "trunk")
    spec = read_spec(template, BundleLimits())
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in read_weights(template / ADAPTER_FILE).items()}
    nbytes = sum(int(np.prod(s)) * torch.empty((), dtype=d).element_size() for s, d in shapes.values())
    for k in range(n):
        rng = np.random.default_rng(k)
        tensors = {name: torch.from_numpy((rng.standard_normal(shape, dtype=np.float32) * STD)).to(dtype)
                   for name, (shape, dtype) in shapes.items()}
        folder = root / "tasks" / task_name(k) / "1"
        folder.mkdir(parents=True)
        write_safetensors(tensors, folder / ADAPTER_FILE, metadata={"format": "stadapter-task-v1", "task": task_name(k)})
        (folder / TASK_FILE).write_text(json.dumps(spec.replace(name=task_name(k), version=1).to_dict(), indent=2))
        (folder / DIGEST_FILE).write_text(bundle_digest(folder))  # as a register records it: a load reads, not hashes
    return nbytes


def draw(mix: str, n_tasks: int, n_requests: int, s: float, seed: int) -> list[int]:
    """Task indices of ``n_requests`` requests: ``zipf`` (rank r drawn with weight 1 / r**s, ranks given to tasks
    at random) or ``uniform``."""
    rng = np.random.default_rng(seed)
    if mix == "uniform":
        return [int(k) for k in rng.integers(0, n_tasks, n_requests)]
    if mix != "zipf":
        raise ValueError(f"unknown mix {mix!r}: zipf | uniform")
    weights = 1.0 / np.arange(1, n_tasks + 1, dtype=np.float64) ** s
    ranks = rng.choice(n_tasks, size=n_requests, p=weights / weights.sum())
    order = rng.permutation(n_tasks)  # rank -> task
    return [int(order[r]) for r in ranks]


@dataclass(frozen=True)
class Timed:
    task: int
    seconds: float


async def _drive(address: str, clip: bytes, tasks: Sequence[int], concurrency: int) -> tuple[list[Timed], float]:
    import grpc

    from stadapter_api.v1 import inference_pb2 as pb
    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    out: list[Timed] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.VideoClassifierStub(ch)
        todo = iter(tasks)

        async def worker() -> None:
            for k in todo:
                t = time.perf_counter()
                await stub.Classify(pb.ClassifyRequest(task=task_name(k), clip=clip), timeout=600)
                out.append(Timed(k, time.perf_counter() - t))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out, time.perf_counter() - t0


def drive(address: str, clip: bytes, tasks: Sequence[int], concurrency: int) -> tuple[list[Timed], float]:
    """Send one request per entry of ``tasks`` from ``concurrency`` closed-loop workers; (each timed, wall s)."""
    return asyncio.run(_drive(address, clip, tasks, concurrency))


def counters(metrics_url: str) -> dict[str, float]:
    """The server's tier counters: task loads (disk), device-slot activations (host -> device) and hits."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    want = {"stadapter_task_loads_total": "loads", "stadapter_adapter_activations_total": "activations",
            "stadapter_adapter_hits_total": "hits", "stadapter_host_evictions_total": "host_evictions",
            "stadapter_host_bytes": "host_bytes", "stadapter_task_load_seconds_sum": "load_s",
            "stadapter_adapter_activation_seconds_sum": "activation_s"}
    out = dict.fromkeys(want.values(), 0.0)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in want and sample.labels.get("result", "ok") == "ok":
                out[want[sample.name]] += sample.value
    return out


def tier_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Of the batch tasks the run served: in a device slot already, copied from host memory, read from disk."""
    d = {k: after[k] - before[k] for k in ("loads", "activations", "hits")}
    uses = d["hits"] + d["activations"]
    if not uses:
        return {"device": 0.0, "host": 0.0, "disk": 0.0}
    return {"device": round(d["hits"] / uses, 4), "host": round((d["activations"] - d["loads"]) / uses, 4),
            "disk": round(d["loads"] / uses, 4)}


def mean_ms(before: dict[str, float], after: dict[str, float], seconds: str, count: str) -> float | None:
    """The mean of a histogram's observations over the run (its sum's growth over ``count``'s), in ms."""
    n = after[count] - before[count]
    return round(1e3 * (after[seconds] - before[seconds]) / n, 2) if n else None


def latency_classes(timed: Sequence[Timed], drawn: Sequence[int], top: int = 10,
                    warmed: Sequence[int] = ()) -> dict[str, dict]:
    """p50/p99 ms of ``cold`` requests (their task's first on the server, after the ``warmed`` ones: its weights
    read from disk), ``repeat`` (every later one, any tier) and ``hot`` (repeats of the ``top`` most drawn tasks)."""
    counts: dict[int, int] = {}
    for k in drawn:
        counts[k] = counts.get(k, 0) + 1
    hot = set(sorted(counts, key=counts.__getitem__, reverse=True)[:top])
    seen: set[int] = set(warmed)
    classes: dict[str, list[float]] = {"cold": [], "repeat": [], "hot": []}
    for t in timed:  # in completion order: a task's first completed request is the one that loaded it
        if t.task not in seen:
            seen.add(t.task)
            classes["cold"].append(t.seconds)
        else:
            classes["repeat"].append(t.seconds)
            if t.task in hot:
                classes["hot"].append(t.seconds)
    return {name: percentiles(v) for name, v in classes.items()}


def percentiles(seconds: Sequence[float]) -> dict:
    if not seconds:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    ms = np.asarray(seconds) * 1e3
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
