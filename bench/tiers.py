"""Thousands of tasks on one server: the disk, host and device tiers under Zipf and uniform request mixes.

    python -m bench.tiers [--shape nano|vit-b16] [--tasks 10000] [--requests 2000] [--concurrency 8]
                          [--host-budget-mib 64] [--adapter-slots 64] [--mixes zipf,uniform] [--work DIR] [--out F]

``--shape nano``: on the embedded trunk (``model_repository/trunk``) a repository of ``--tasks`` tasks shaped as the
demo's ``motion`` task, each with its own random weights (``bench.tier_mix``), and a 2-task one like it.
``--shape vit-b16``: the same on a ViT-B/16 trunk with random weights, tasks of 12 x 384 adapters before attention
and 400 classes, ``--frames`` frames per clip at 224 px. Every server is
``python -m server`` on the CPU in float32 with the warm-up on, each distinct clip decoded once (``bench.serving``'s
memoised decoder: the figures are the model's and the tiers', not the decoder's), one clip for every request.

* time to ready (process start to ready file), the server's CPU seconds to ready (less moved by other work on a
  shared machine than the wall time) and VmRSS once ready: the 2-task repository vs ``--tasks`` (``--mixes none``:
  only these);
* per mix (``zipf``: s = ``--zipf-s``; ``uniform``), on a fresh tiered server (``--host-cache-bytes`` =
  ``--host-budget-mib``, ``--adapter-slots``): throughput, the tier that served each batch task (device slot
  already, host copy, disk read: the server's counters), p50/p99 latency of cold requests (a task's first: read
  from disk), repeats and hot ones (the 10 most drawn tasks), peak RSS (VmHWM) against trunk + host budget;
* the same request sequence on a server where every task the mix draws is resident (host budget and device slots
  for all of them, each drawn task requested once before the timing): the throughput the tiers are compared with;
  ``--rounds N`` runs the two N times, alternated, and gives each round's throughput ratio and their median.

Prints a table to stderr and JSON to stdout (and ``--out``). ``--work`` keeps the repositories between runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bench import tier_mix
from bench.refused_rss import rss_kb
from bench.report import emit_json

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "model_repository"
TEMPLATE_TASK = "motion"
LAUNCHER = [sys.executable, "-m", "bench.serving", "--serve"]  # the server, each distinct clip decoded once


def shape_source(work: Path, shape: str, frames: int) -> tuple[Path, Path]:
    """The trunk folder and template bundle of ``shape`` (vit-b16: made under ``work`` once)."""
    if shape == "nano":
        return EMBEDDED / "trunk", EMBEDDED / "tasks" / TEMPLATE_TASK / "1"
    trunk_dir, template = work / "vit-b16-trunk", work / "vit-b16-template"
    if not (template / "task.json").exists():
        from bench.tasks import random_bundle
        from stadapter import AdapterConfig, SamplingConfig, init_trunk, load_trunk

        if not (trunk_dir / "trunk.json").exists():
            init_trunk("ViT-B-16", "random", trunk_dir, seed=0)
        random_bundle(load_trunk(trunk_dir), template, "template", AdapterConfig(width=384, pre_attn=True, pre_mlp=False),
                      SamplingConfig(num_frames=frames, input_size=224), 400, seed=0)
    return trunk_dir, template


def repository(work: Path, n: int, shape: str, trunk_dir: Path, template: Path) -> tuple[Path, int, float]:
    """The ``n``-task repository under ``work`` (built unless there): its path, one task's bytes, build seconds."""
    root = work / f"{shape}-repo{n}"
    done = root / ".built"
    t0 = time.monotonic()
    if done.exists():
        return root, int(done.read_text()), 0.0
    if root.exists():
        import shutil

        shutil.rmtree(root)
    nbytes = tier_mix.build_repository(root, trunk_dir, template, n)
    done.write_text(str(nbytes))
    return root, nbytes, round(time.monotonic() - t0, 1)


def server(repo: Path, *flags: str):
    from server.process import ServerProcess

    return ServerProcess(repo, "--device", "cpu", "--dtype", "float32", "--http-port", "-1", "--poll-interval-s", "0",
                         "--max-queue-size", "4096", "--max-queue-delay-ms", "5", *flags,
                         env={"OMP_NUM_THREADS": "1", "STADAPTER_BENCH_MEMO_DECODE": "1"}, timeout=900,
                         launcher=LAUNCHER)


def ready(repo: Path, *flags: str) -> dict:
    """Process start to ready: wall seconds, the server process's CPU seconds (less moved by a shared machine's
    load than the wall time) and its RSS."""
    t0 = time.monotonic()
    with server(repo, *flags) as srv:
        return {"ready_s": round(time.monotonic() - t0, 3), "cpu_ready_s": cpu_seconds(srv.proc.pid),
                "rss_ready_bytes": rss_kb(srv.proc.pid) * 1024}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its own, not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def run_mix(repo: Path, clip: bytes, drawn: list[int], concurrency: int, *flags: str, warm: bool = False,
            before_run: Sequence[int] = ()) -> dict:
    """One fresh server, the drawn request sequence timed; ``warm``: each drawn task requested once before;
    ``before_run``: requests sent before the timing (the tiered server's steady state)."""
    with server(repo, *flags) as srv:
        if warm:
            tier_mix.drive(srv.address, clip, sorted(set(drawn)), concurrency)
        if before_run:
            tier_mix.drive(srv.address, clip, before_run, concurrency)
        before = tier_mix.counters(srv.metrics_url)
        timed, wall = tier_mix.drive(srv.address, clip, drawn, concurrency)
        after = tier_mix.counters(srv.metrics_url)
        out = {"requests": len(drawn), "distinct_tasks": len(set(drawn)), "wall_s": round(wall, 2),
               "requests_per_s": round(len(drawn) / wall, 1), "tiers": tier_mix.tier_rates(before, after),
               "loads": int(after["loads"] - before["loads"]),
               "load_ms_mean": tier_mix.mean_ms(before, after, "load_s", "loads"),
               "activation_ms_mean": tier_mix.mean_ms(before, after, "activation_s", "activations"),
               "host_evictions": int(after["host_evictions"] - before["host_evictions"]),
               "host_bytes_end": int(after["host_bytes"]), "peak_rss_bytes": tier_mix.peak_rss_bytes(srv.proc.pid)}
        if not warm:
            out["latency"] = tier_mix.latency_classes(timed, drawn, warmed=before_run)
        else:
            out["latency"] = {"all": tier_mix.percentiles([t.seconds for t in timed])}
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=("nano", "vit-b16"), default="nano")
    p.add_argument("--frames", type=int, default=8, help="vit-b16: frames per clip")
    p.add_argument("--tasks", type=int, default=10000)
    p.add_argument("--requests", type=int, default=2000, help="requests per mix")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--host-budget-mib", type=float, default=64.0)
    p.add_argument("--adapter-slots", type=int, default=64, help="device slots of the tiered server")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--mixes", default="zipf,uniform", help="request mixes to run; 'none': time to ready only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="per mix, the tiered and the all-resident server run this many times, alternated: the "
                        "throughput ratio of each round and their median")
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="requests of the same mix (other draws) the tiered server gets before the timing: its steady "
                        "state rather than its first minutes")
    p.add_argument("--no-warmup", action="store_true",
                   help="start every server with --no-warmup (a ViT-B/16 warm-up on a CPU takes minutes per start)")
    p.add_argument("--work", help="keep the repositories here (default: a temporary folder)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    import numpy as np

    from stadapter.video.synthetic import encode_frames

    frames = np.random.default_rng(0).integers(0, 255, (16, 72, 96, 3), dtype=np.uint8)
    clip = encode_frames(list(frames), fps=8, codec="mpeg4")
    budget = int(args.host_budget_mib * 2**20)
    with tempfile.TemporaryDirectory(prefix="bench-tiers-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        trunk_dir, template = shape_source(work, args.shape, args.frames)
        small, _, _ = repository(work, 2, args.shape, trunk_dir, template)
        big, task_bytes, build_s = repository(work, args.tasks, args.shape, trunk_dir, template)
        trunk_bytes = (trunk_dir / "visual.safetensors").stat().st_size
        common = ("--no-warmup",) if args.no_warmup else ()
        tiered = (*common, "--host-cache-bytes", str(budget), "--adapter-slots", str(args.adapter_slots))
        results: dict = {
            "shape": args.shape, "tasks": args.tasks, "task_bytes": task_bytes, "all_tasks_bytes": task_bytes * args.tasks,
            "host_budget_bytes": budget, "adapter_slots": args.adapter_slots, "trunk_bytes": trunk_bytes,
            "concurrency": args.concurrency, "server_warmup": not args.no_warmup,
            "warmup_requests": args.warmup_requests, "build_s": build_s,
            "ready": {"2": ready(small, *tiered), str(args.tasks): ready(big, *tiered)}, "mixes": {}}
        for mix in [m for m in args.mixes.split(",") if m != "none"]:
            drawn = tier_mix.draw(mix, args.tasks, args.requests, args.zipf_s, args.seed)
            distinct = len(set(drawn))
            resident = (*common, "--host-cache-bytes", str(2 * task_bytes * distinct + (64 << 20)),
                        "--adapter-slots", str(distinct + 8))
            before_run = tier_mix.draw(mix, args.tasks, args.warmup_requests, args.zipf_s, args.seed + 1)
            rounds = []
            for _ in range(args.rounds):  # alternated: a shared machine's load moves one server's throughput run to run
                rounds.append({"tiered": run_mix(big, clip, drawn, args.concurrency, *tiered, before_run=before_run),
                               "resident": run_mix(big, clip, drawn, args.concurrency, *resident, warm=True)})
            results["mixes"][mix] = compared(rounds)
            print(f"[{mix}] done", file=sys.stderr)
    print(table(results), file=sys.stderr)
    emit_json(results, args.out)
    return 0


def compared(rounds: list[dict]) -> dict:
    """A mix's rounds (each ``{"tiered": run, "resident": run}``) with each round's throughput ratio and their median."""
    ratios = [round(r["tiered"]["requests_per_s"] / r["resident"]["requests_per_s"], 3) for r in rounds]
    return {"rounds": rounds, "ratios": ratios, "ratio_median": statistics.median(ratios)}


def table(r: dict) -> str:
    mib = 2**20
    n = str(r["tasks"])
    lines = [f"{r['tasks']} tasks x {r['task_bytes'] / 1024:.1f} KiB = {r['all_tasks_bytes'] / mib:.0f} MiB; host budget "
             f"{r['host_budget_bytes'] / mib:.0f} MiB, {r['adapter_slots']} device slots; trunk "
             f"{r['trunk_bytes'] / mib:.1f} MiB",
             f"ready: 2 tasks {r['ready']['2']['ready_s']:.2f} s ({r['ready']['2']['cpu_ready_s']:.2f} s CPU, "
             f"{r['ready']['2']['rss_ready_bytes'] / mib:.0f} MiB), {n} tasks {r['ready'][n]['ready_s']:.2f} s "
             f"({r['ready'][n]['cpu_ready_s']:.2f} s CPU, {r['ready'][n]['rss_ready_bytes'] / mib:.0f} MiB)",
             f"{'mix':<8} {'server':<9} {'req/s':>7} {'device':>7} {'host':>6} {'disk':>6} {'cold p50/p99 ms':>16} "
             f"{'hot p50/p99 ms':>15} {'peak RSS MiB':>12} {'load ms':>8}"]
    for mix, m in r["mixes"].items():
        for runs in m["rounds"]:
            for kind, x in runs.items():
                lat = x["latency"]
                cold, hot = lat.get("cold", lat.get("all")), lat.get("hot", lat.get("all"))
                lines.append(f"{mix:<8} {kind:<9} {x['requests_per_s']:>7.1f} {x['tiers']['device']:>7.1%} "
                             f"{x['tiers']['host']:>6.1%} {x['tiers']['disk']:>6.1%} "
                             f"{_pair(cold):>16} {_pair(hot):>15} {x['peak_rss_bytes'] / mib:>12.0f} "
                             f"{x['load_ms_mean'] if x['load_ms_mean'] is not None else '-':>8}")
        lines.append(f"{mix}: tiered / resident req/s per round {', '.join(f'{q:.2f}' for q in m['ratios'])}; "
                     f"median {m['ratio_median']:.2f}")
    return "\n".join(lines)


def _pair(p: dict) -> str:
    return "-" if not p["n"] else f"{p['p50_ms']:.1f}/{p['p99_ms']:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
