"""Rebuild the embedded demo tasks: data, training, bundles, sample clips.

For each demo task this runs, in order, the exact commands it prints:

1. ``python -m training.synthetic`` (seeded clips + list files) into ``--data``;
2. ``python -m training.train`` on the embedded trunk into
   ``model_repository/tasks/<task>/1`` (``--force``: it replaces the shipped bundle; the metrics land in its task.json);
3. copies one validation clip per class (never seen in training) to
   ``samples/<task>/`` with ``labels.json`` (file -> true label).

Usage::

    python -m training.make_demo                       # both tasks
    python -m training.make_demo --tasks motion --dry-run   # print the commands only
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from stadapter.fsutil import atomic_write_bytes, atomic_write_text

from .data import read_labels, read_list

# One entry per demo task: synthetic data size and the training recipe.
DEMO_TASKS: dict[str, dict] = {
    "shapes": {
        "synthetic": ["--num-train", "800", "--num-val", "200", "--seed", "0"],
        "train": ["--epochs", "6", "--adapter-width", "32", "--pre-attn", "--pre-mlp", "--flip",
                  "--lr", "3e-3", "--batch-size", "32", "--num-frames", "8"],
        "description": "Which shape moves through the clip (appearance task; synthetic demo).",
    },
    "motion": {
        "synthetic": ["--num-train", "1200", "--num-val", "300", "--seed", "0"],
        "train": ["--epochs", "12", "--adapter-width", "32", "--pre-attn", "--pre-mlp", "--no-flip",
                  "--lr", "1e-2", "--batch-size", "32", "--num-frames", "8"],
        "description": "Which way the object moves: left, right, up or down (temporal task; synthetic demo).",
    },
}


def commands(task: str, data: Path, repo: Path, trunk: Path, workers: int) -> list[list[str]]:
    spec, d = DEMO_TASKS[task], data / task
    py = sys.executable
    return [
        [py, "-m", "training.synthetic", "--task", task, "--out", str(d), *spec["synthetic"]],
        [py, "-m", "training.train", "--trunk", str(trunk), "--task", task, "--data-root", str(d),
         "--train-list", str(d / "train.txt"), "--val-list", str(d / "val.txt"), "--labels", str(d / "labels.txt"),
         "--method", "st-adapter", *spec["train"], "--cache", "--workers", str(workers), "--seed", "0",
         "--description", spec["description"], "--run-dir", str(data / f"run-{task}"),
         "--out", str(repo / "tasks" / task / "1"), "--force"],  # rebuilding the shipped bundle is the point
    ]


def copy_samples(task: str, data: Path, samples: Path) -> dict[str, str]:
    """One validation clip per class -> samples/<task>/<label>.mp4, plus labels.json."""
    d = data / task
    labels = read_labels(d / "labels.txt")  # the trainer's readers: the same classes, whatever the names hold
    chosen: dict[int, Path] = {}
    for sample in read_list(d / "val.txt", d, len(labels)):
        chosen.setdefault(sample.label, sample.path)
    out = samples / task
    out.mkdir(parents=True, exist_ok=True)
    truth = {}
    for lab, path in sorted(chosen.items()):
        name = f"{labels[lab]}.mp4"
        atomic_write_bytes(out / name, path.read_bytes())
        truth[name] = labels[lab]
    atomic_write_text(out / "labels.json", json.dumps(truth, indent=2) + "\n")
    return truth


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.make_demo", description="Rebuild the embedded demo tasks.")
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS), choices=list(DEMO_TASKS))
    p.add_argument("--data", type=Path, default=Path("runs/demo-data"), help="where the synthetic clips go")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--trunk", type=Path, default=Path("model_repository/trunk"))
    p.add_argument("--samples", type=Path, default=Path("samples"))
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    for task in args.tasks:
        for cmd in commands(task, args.data, args.repo, args.trunk, args.workers):
            print("$ " + shlex.join(["python"] + cmd[1:]), flush=True)
            if not args.dry_run:
                subprocess.run(cmd, check=True)
        if not args.dry_run:
            print(json.dumps({task: copy_samples(task, args.data, args.samples)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
