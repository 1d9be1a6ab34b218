"""The paper's transfer table in miniature, on the embedded trunk and the synthetic tasks.

Trains, with ``python -m training.train`` (one subprocess per run, so peak memory
is per run), five ways of adapting the frozen image trunk to video, on an
appearance task (``shapes``) and a temporal task (``motion``):

* ``linear``          head only on the frame-mean CLS feature, lr 1e-2
* ``full``            every trunk parameter + head (frame mean), lr 3e-4
* ``partial``         last trunk block + ln_post + head (frame mean), lr 1e-3
* ``st-adapter``      ST-Adapters (width 32, before MHSA and MLP, kernel 3,1,1) + head, trunk frozen, lr 1e-2
* ``st-adapter-k1``   the same with temporal kernel 1 (no temporal mixing)
* ``st-adapter-last2`` / ``st-adapter-last1``  ST-Adapters in the last 2 / last 1 of the 4 blocks only
  (``--layers``): the blocks below run once per clip for several tasks in serving (the shared prefix)

Prints a table (trainable parameters and % of the trunk, top-1 on each task,
seconds per training epoch on the temporal task, peak memory) and writes JSON.
Expected shape (the paper's RQ1-3): st-adapter >= 90% on the temporal task while
linear, full and kernel-1 stay near chance (25%), with < 10% of the parameters.

    python -m bench.transfer_table --out runs/transfer_table.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from bench.report import emit_json

ADAPTER = ["--adapter-width", "32", "--pre-attn", "--pre-mlp"]
ROWS: dict[str, list[str]] = {
    "linear": ["--method", "linear", "--lr", "1e-2"],
    "full": ["--method", "full", "--lr", "3e-4"],
    "partial": ["--method", "partial", "--partial-blocks", "1", "--lr", "1e-3"],
    "st-adapter": ["--method", "st-adapter", *ADAPTER, "--adapter-kernel", "3,1,1", "--lr", "1e-2"],
    "st-adapter-k1": ["--method", "st-adapter", *ADAPTER, "--adapter-kernel", "1,1,1", "--lr", "1e-2"],
    # adapters in the last half / last quarter of the 4 blocks only: what a shared trunk prefix saves in serving
    "st-adapter-last2": ["--method", "st-adapter", *ADAPTER, "--adapter-kernel", "3,1,1", "--layers", "2", "--lr", "1e-2"],
    "st-adapter-last1": ["--method", "st-adapter", *ADAPTER, "--adapter-kernel", "3,1,1", "--layers", "1", "--lr", "1e-2"],
}
TASKS = {"shapes": "appearance", "motion": "temporal"}


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")


def make_data(work: Path, task: str, num_train: int, num_val: int, seed: int) -> Path:
    out = work / "data" / task
    info = out / "dataset.json"
    want = {"task": task, "num_train": num_train, "num_val": num_val, "seed": seed}
    if info.is_file() and all(json.loads(info.read_text()).get(k) == v for k, v in want.items()):
        return out
    run([sys.executable, "-m", "training.synthetic", "--task", task, "--out", str(out), "--num-train", str(num_train),
         "--num-val", str(num_val), "--seed", str(seed)], work / f"synthetic-{task}.log")
    return out


def train_one(work: Path, trunk: Path, row: str, task: str, data: Path, epochs: int, reuse: bool) -> dict:
    metrics = work / f"{row}-{task}.json"
    if reuse and metrics.is_file():
        return json.loads(metrics.read_text())
    flip = ["--flip"] if TASKS[task] == "appearance" else ["--no-flip"]
    cmd = [sys.executable, "-m", "training.train", "--trunk", str(trunk), "--task", task, "--data-root", str(data),
           "--train-list", str(data / "train.txt"), "--val-list", str(data / "val.txt"), "--labels", str(data / "labels.txt"),
           *ROWS[row], *flip, "--epochs", str(epochs), "--batch-size", "32", "--num-frames", "8", "--cache",
           "--workers", "0", "--seed", "0", "--no-progress", "--run-dir", str(work / f"run-{row}-{task}"),
           "--out", str(work / "bundles" / f"{row}-{task}"), "--force", "--metrics-out", str(metrics),
           "--keep", "last"]  # scratch bundles; the last epoch's top-1, not one picked on the reported val set
    t0 = time.perf_counter()
    run(cmd, work / f"{row}-{task}.log")
    print(f"  {row:14s} {task:7s} top-1 {100 * json.loads(metrics.read_text())['val_top1']:5.1f}%  "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return json.loads(metrics.read_text())


def table(rows: list[dict]) -> str:
    head = ("| method | trainable params | % of trunk | top-1 appearance (shapes) | top-1 temporal (motion) "
            "| s / epoch (motion) | peak memory (MiB) |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.2f}% | "
                     f"{100 * r['top1_appearance']:.1f}% | {100 * r['top1_temporal']:.1f}% | "
                     f"{r['seconds_per_epoch']:.1f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.transfer_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--trunk", type=Path, default=Path("model_repository/trunk"))
    p.add_argument("--work", type=Path, default=Path("runs/transfer-table"))
    p.add_argument("--out", type=Path, default=None, help="JSON results (also printed)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--appearance-train", type=int, default=600)
    p.add_argument("--appearance-epochs", type=int, default=5)
    p.add_argument("--temporal-train", type=int, default=1000)
    p.add_argument("--temporal-epochs", type=int, default=8)
    p.add_argument("--val", type=int, default=200, help="validation clips per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse finished runs' metrics found in --work")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = {
        "shapes": make_data(args.work, "shapes", args.appearance_train, args.val, args.seed),
        "motion": make_data(args.work, "motion", args.temporal_train, args.val, args.seed + 1),
    }
    epochs = {"shapes": args.appearance_epochs, "motion": args.temporal_epochs}
    rows = []
    for row in args.rows:
        m = {t: train_one(args.work, args.trunk, row, t, data[t], epochs[t], args.reuse) for t in TASKS}
        rows.append({
            "method": row,
            "trainable_params": m["motion"]["trainable_params"],
            "trainable_percent": m["motion"]["trainable_percent"],
            "top1_appearance": m["shapes"]["val_top1"],
            "top1_temporal": m["motion"]["val_top1"],
            "top5_temporal": m["motion"]["val_top5"],
            "seconds_per_epoch": m["motion"]["seconds_per_epoch"],
            "peak_memory_mb": max(m[t]["peak_memory_mb"] for t in TASKS),
        })
    result = {
        "trunk": str(args.trunk),
        "trunk_params": m["motion"]["trunk_params"],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "chance": 0.25,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print(table(rows))
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
