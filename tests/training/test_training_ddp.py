"""torchrun with 2 CPU processes (gloo): trains, and only rank 0 writes one bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stadapter import read_bundle
from training.synthetic import SyntheticConfig, generate


def test_torchrun_two_processes_on_gloo(tiny_trunk_dir, tmp_path):
    data = tmp_path / "data"
    generate(SyntheticConfig("shapes", num_train=16, num_val=4, seed=2, size=32, frames=8), data)
    tasks = tmp_path / "tasks"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training.train",
        "--trunk", str(tiny_trunk_dir), "--task", "shapes", "--data-root", str(data),
        "--train-list", str(data / "train.txt"), "--val-list", str(data / "val.txt"), "--labels", str(data / "labels.txt"),
        "--out", str(tasks / "shapes" / "1"), "--run-dir", str(tmp_path / "run"), "--metrics-out", str(tmp_path / "m.json"),
        "--epochs", "2", "--batch-size", "4", "--num-frames", "4", "--adapter-width", "8", "--workers", "0",
        "--device", "cpu", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["steps"] == 4  # 16 clips / (2 processes x 4) per step x 2 epochs
    assert metrics["val_clips"] == 4  # the val shards add up to the whole set
    assert [p.name for p in tasks.iterdir()] == ["shapes"] and [p.name for p in (tasks / "shapes").iterdir()] == ["1"]
    assert read_bundle(tasks / "shapes" / "1").spec.metrics["val_clips"] == 4
    assert proc.stdout.count('"method": "st-adapter"') == 1  # rank 0 alone prints the summary
