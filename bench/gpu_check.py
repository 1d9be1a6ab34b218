"""One short check of the CUDA paths on a lent GPU machine (about 5 minutes on one H100).

    python -m bench.gpu_check [--out gpu_check.json] [--server]       # make gpu-check
    python -m bench.gpu_check --device cpu --shape tiny               # the dry run (part of the test suite)

Steps, in order (``bench.gpu_steps`` holds the model-side ones):

* ``pytest_cuda``: ``tests/server/test_gpu.py`` (the CUDA tests) in a subprocess;
* on a random ViT-B/16 trunk with 8 tasks, two of them adapting only the last 4 blocks (``--shape tiny``:
  the test trunk, 3 tasks): ``mixed_logits`` (a mixed batch vs each clip alone and vs CPU float32),
  ``staging_stress`` (each side-stream copy delayed while the next batch stages on another thread: results
  equal the sequential run), ``activation_order`` (a cold task's activation staged while the forward that read
  its slot is still queued, its copy held back on the side stream: both results right, the staging not blocked,
  the activation time the copy's), ``sync_audit`` (``torch.cuda.set_sync_debug_mode``: one sync per batch),
  ``h2d_bandwidth`` (GB/s pinned vs pageable, uint8 vs float32), ``throughput`` (clips/s at batch 1, 8 and
  32, one task and mixed, raw forwards and through the real batcher), ``cold_slots`` (evictions; too many
  ``--adapter-slots`` refused), ``fp16``, ``bf16_train_step`` and ``mfu`` (FLOPs counted with attention
  unfused, over the forward's time and the card's peak);
* ``server_tests`` (only with ``--server``): the real server's integration tests, on this GPU.

Each step records its figures, or its failure (the exception's text), or why it was skipped ("no CUDA"),
and the next one still runs. Everything goes to one JSON file (``--out``) and a short table on stdout.
The imports are checked first: a missing wheel (a GPU machine may lack PyAV and open_clip) is named, with
the commands that carry it there. Exit status: 0 all ran or were skipped, 1 a step failed, 3 imports missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
# module -> the wheel that provides it (pinned where this project resolved a version); all installed --no-deps
WHEELS = {"open_clip": "open_clip_torch==3.3.0", "ftfy": "ftfy", "wcwidth": "wcwidth", "regex": "regex",
          "av": "av==18.1.0", "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "pygments": "pygments"}
NEEDED = ("open_clip", "ftfy", "wcwidth", "regex", "av")  # the trunk is an open_clip model; the server imports PyAV
TEST_ONLY = ("pytest", "pluggy", "iniconfig", "pygments")  # pytest_cuda and server_tests
# the card's peak dense FLOP/s by dtype (NVIDIA's data sheets; fp32 without TF32), matched in order on its name
PEAKS = (("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51.2e12}),
         ("H100", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12}),
         ("H200", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 66.9e12}),
         ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}))


def missing_modules() -> list[str]:
    return [m for m in WHEELS if importlib.util.find_spec(m) is None]


def install_recipe(missing: list[str]) -> str:
    """The commands that bring the missing wheels here (none of them reach an index from a GPU machine)."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = " ".join(WHEELS[m] for m in missing)
    return (f"missing: {', '.join(missing)}. On a machine with the package index:\n"
            f"  pip download --no-deps --only-binary=:all: --python-version {py} --platform manylinux_2_28_x86_64 "
            f"-d wheels {wheels}\n"
            f"carry wheels/ here (av is about 36 MB), then:\n  python -m pip install --no-deps wheels/*.whl")


def device_info(torch: Any, device: Any) -> dict:
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda, free_bytes=free,
                    total_bytes=total)
    return info


def peak_flops(name: str, given_tflops: Optional[float]) -> dict:
    if given_tflops:
        return {k: given_tflops * 1e12 for k in ("bfloat16", "float16", "float32")}
    return next((dict(p) for key, p in PEAKS if key in name), {})


def run_step(fn: Callable[[], dict]) -> dict:
    """One step's record: its figures and "ok", the reason it was "skipped", or the failure's text."""
    from bench.gpu_steps import Skip

    t0 = time.perf_counter()
    try:
        rec = {"status": "ok", **fn()}
    except Skip as e:
        rec = {"status": "skipped", "reason": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001 - a failed step is recorded and the next one runs
        where = traceback.extract_tb(e.__traceback__)[-1]
        rec = {"status": "failed", "error": f"{type(e).__name__}: {e}",
               "at": f"{Path(where.filename).name}:{where.lineno}"}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def pytest_step(args_: list[str], timeout_s: float, need_cuda: bool, cuda: bool) -> Callable[[], dict]:
    def step() -> dict:
        from bench.gpu_steps import Skip

        if need_cuda and not cuda:
            raise Skip("no CUDA")
        lacking = [m for m in TEST_ONLY if importlib.util.find_spec(m) is None]
        if "pytest" in lacking:
            raise RuntimeError(install_recipe(lacking))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args_]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        if proc.returncode != 0:
            hint = f" ({install_recipe(lacking)})" if lacking else ""
            raise RuntimeError(f"pytest exit {proc.returncode}: " + " | ".join(tail[-5:]) + hint)
        return {"command": " ".join(cmd[1:]), "summary": tail[-1] if tail else ""}

    return step


def headline(name: str, rec: dict) -> str:
    """A few words of a step's figures for the table."""
    if rec["status"] != "ok":
        return rec.get("reason") or rec.get("error", "")[:100]
    f = {
        "pytest_cuda": lambda r: r["summary"],
        "setup": lambda r: f"{r['model']}, {r['tasks']} tasks ({r['last_block_tasks']} adapting the last blocks only)",
        "server_tests": lambda r: r["summary"],
        "mixed_logits": lambda r: f"vs alone {_worst(r, 'max_abs_vs_alone'):.1e}, vs CPU {_worst(r, 'max_abs_vs_cpu_fp32'):.1e}"
        f", {r['shared_prefix']['shared_rows']} row shared",
        "staging_stress": lambda r: f"vs sequential {r['max_abs_vs_sequential']:.1e} over {r['batches']} batches",
        "activation_order": lambda r: f"vs alone {max(r['max_abs_vs_alone'].values()):.1e}, staged in {r['stage_b_s']:.3f} s"
        f" beside a {r['delay_s']:.3f} s delay, copy {r['activation_s'] * 1e3:.2f} ms",
        "sync_audit": lambda r: " ".join(f"{k}={v}" for k, v in r["syncs_per_batch"].items()),
        "h2d_bandwidth": lambda r: " ".join(f"{k} {v['GB_per_s']:.1f}" for k, v in r.items() if isinstance(v, dict))
        + " GB/s",
        "throughput": lambda r: " ".join(
            f"b{k[6:]}: {v['raw_clips_per_s']['single']:.0f}/{v['raw_clips_per_s']['mixed']:.0f}"
            f" ({v['batcher_clips_per_s']['mixed']:.0f})" for k, v in r.items() if k.startswith("batch_"))
        + " clips/s single/mixed (batcher mixed)",
        "cold_slots": lambda r: f"cold p50 {r['cold_forward_ms']['p50']:.1f} ms, warm {r['warm_forward_ms']['p50']:.1f},"
        f" {r['evictions']} evictions",
        "fp16": lambda r: f"vs CPU {_worst(r, 'max_abs_vs_cpu_fp32'):.1e}",
        "bf16_train_step": lambda r: f"{r['step_s'] * 1e3:.0f} ms/step, loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}",
        "mfu": lambda r: f"{r['gflops_per_image']:.1f} GFLOP/image, {r['achieved_tflops']:.1f} TFLOP/s"
        + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] else ", peak unknown"),
    }.get(name)
    try:
        return f(rec) if f else ""
    except (KeyError, TypeError, ValueError) as e:
        return f"(no headline: {e})"


def _worst(rec: dict, key: str) -> float:
    return max(v[key] for v in rec.values() if isinstance(v, dict))


def table(steps: dict) -> str:
    rows = [("step", "status", "s", "figures")] + [(k, r["status"], f"{r['seconds']:.1f}", headline(k, r))
                                                   for k, r in steps.items()]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda where available)")
    p.add_argument("--shape", choices=("vitb", "tiny"), default="vitb", help="ViT-B/16 with 8 tasks, or the tiny dry run")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="the serving dtype (auto: the server's rule)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON file of every step's record")
    p.add_argument("--server", action="store_true", help="also run the real server's integration tests, last")
    p.add_argument("--skip", action="append", default=[], metavar="STEP", help="leave a step out (repeatable)")
    p.add_argument("--peak-tflops", type=float, help="the card's peak for the MFU (default: from its name)")
    p.add_argument("--pytest-timeout-s", type=float, default=150)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "shape": args.shape, "args": vars(args)}
    missing = missing_modules()
    result["imports"] = {"missing": missing, "install": install_recipe(missing) if missing else None}
    if missing:
        print(install_recipe(missing), file=sys.stderr)
    if any(m in missing for m in NEEDED):
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 3

    import torch

    from bench import gpu_steps
    from server.engine.model import resolve_device, resolve_dtype
    from stadapter import init_trunk

    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    dtype = resolve_dtype(args.dtype, device)
    result["device"] = device_info(torch, device)
    result["dtype"] = str(dtype).split(".")[1]
    steps: dict[str, dict] = {}
    result["steps"] = steps

    def record(name: str, fn: Callable[[], dict]) -> None:
        steps[name] = {"status": "skipped", "reason": "skipped: --skip", "seconds": 0.0} if name in args.skip \
            else run_step(fn)
        print(f"[gpu_check] {name}: {steps[name]['status']} ({steps[name]['seconds']:.1f} s)", file=sys.stderr)
        if cuda:
            torch.cuda.empty_cache()

    record("pytest_cuda", pytest_step(["-m", "gpu", "tests/server/test_gpu.py"], args.pytest_timeout_s, True, cuda))
    shape = gpu_steps.SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rig: dict[str, Any] = {}

        def setup() -> dict:
            init_trunk(shape.model, "random", Path(tmp) / "trunk", seed=0)
            r = rig["rig"] = gpu_steps.make_rig(shape, device, dtype, Path(tmp) / "trunk")
            r.peak_flops = peak_flops(result["device"].get("name", ""), args.peak_tflops)
            return {"model": shape.model, "tasks": len(r.tvs), "last_block_tasks": len(r.last),
                    "trunk_parameters": r.trunk.num_parameters}

        record("setup", setup)
        for name, fn in gpu_steps.STEPS.items():
            record(name, (lambda fn=fn: fn(rig["rig"])) if "rig" in rig else _failed_setup)
    record("server_tests", pytest_step(["-x", "tests/server/test_server_integration.py"], 2 * args.pytest_timeout_s,
                                       False, cuda) if args.server else _not_asked)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(steps))
    print(f"{result['device'].get('name', device.type)}, {result['dtype']}, {result['seconds']} s -> {args.out}")
    return 1 if any(r["status"] == "failed" for r in steps.values()) else 0


def _failed_setup() -> dict:
    raise RuntimeError("setup failed: no trunk to run on")


def _not_asked() -> dict:
    from bench.gpu_steps import Skip

    raise Skip("not asked (--server)")


if __name__ == "__main__":
    sys.exit(main())
