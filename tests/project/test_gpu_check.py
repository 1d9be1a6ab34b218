"""``make gpu-check``'s script, dry-run on CPU: every step runs or says why it was skipped, into one JSON file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]
STEPS = {"pytest_cuda", "setup", "mixed_logits", "staging_stress", "activation_order", "sync_audit", "h2d_bandwidth", "throughput",
         "cold_slots", "fp16", "bf16_train_step", "mfu", "server_tests"}
NEED_CUDA = {"pytest_cuda", "activation_order", "sync_audit", "h2d_bandwidth", "fp16"}


def test_the_gpu_check_dry_runs_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--shape", "tiny", "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"started", "shape", "args", "imports", "device", "dtype", "steps", "seconds"} <= set(result)
    assert result["device"]["type"] == "cpu" and result["imports"]["missing"] == []
    steps = result["steps"]
    assert set(steps) == STEPS
    for name, rec in steps.items():
        assert rec["status"] in ("ok", "skipped"), (name, rec)
        assert isinstance(rec["seconds"], float)
        if rec["status"] == "skipped":
            assert rec["reason"].startswith("skipped: "), (name, rec)
        assert name in proc.stdout  # the table has a row per step
    assert {k for k, r in steps.items() if r["reason" if r["status"] == "skipped" else "status"] == "skipped: no CUDA"} \
        == NEED_CUDA
    assert steps["server_tests"]["reason"] == "skipped: not asked (--server)"
    mixed = steps["mixed_logits"]
    assert mixed["shared_prefix"]["shared_rows"] == 1 and mixed["all_tasks"]["tasks"] == 3
    assert max(m["max_abs_vs_alone"] for m in mixed.values() if isinstance(m, dict)) <= 1e-4
    assert steps["staging_stress"]["max_abs_vs_sequential"] <= 1e-6
    assert {"batch_1", "batch_2", "batch_4"} <= set(steps["throughput"])
    assert steps["cold_slots"]["evictions"] >= 1 and steps["mfu"]["flops_per_forward"] > 0


def test_a_failed_step_is_recorded_and_the_next_one_runs():
    def broken() -> dict:
        raise ValueError("the logits differ")

    rec = gpu_check.run_step(broken)
    assert rec["status"] == "failed" and rec["error"] == "ValueError: the logits differ" and "seconds" in rec
    assert "failed" in gpu_check.table({"broken": rec, "next": gpu_check.run_step(lambda: {"x": 1})})


def test_missing_wheels_are_named_with_the_commands_that_bring_them():
    text = gpu_check.install_recipe(["av", "open_clip"])
    assert "missing: av, open_clip" in text
    assert "pip download --no-deps" in text and "av==18.1.0 open_clip_torch==3.3.0" in text
    assert "pip install --no-deps wheels/*.whl" in text


def test_without_pyav_the_check_stops_first_and_says_which_wheels_to_carry(tmp_path, monkeypatch, capsys):
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--shape", "tiny", "--out", str(out)]) == 3
    result = json.loads(out.read_text())
    assert result["imports"]["missing"] == ["av"] and "steps" not in result
    assert "av==18.1.0" in capsys.readouterr().err
