"""What a finished run leaves behind: the bundle (or the trained weights) first, then metrics, then the curve.

The bundle is written before anything optional: a missing matplotlib (only the
server extra installed) costs the curve, never the trained task.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes

from stadapter import TaskSpec, save_bundle
from stadapter.fsutil import atomic_write_bytes, atomic_write_text

from .checkpoint import CHECKPOINT_NAME
from .distributed import peak_memory_mb
from .run import Run

BUNDLE_METRICS = ("method", "epochs", "kept_epoch", "steps", "train_clips", "val_clips", "val_top1", "val_top5",
                  "trainable_params")


def kept_epoch(run: Run) -> int:
    """The epoch whose tensors are written: the best validated one (``--keep best``), else the last."""
    if run.best is not None and run.cfg.keep == "best":
        return run.best.epoch
    return run.history[-1]["epoch"] if run.history else 0


def summary(run: Run) -> dict[str, Any]:
    """The run's metrics; ``val_*`` describe the kept epoch (the one the bundle holds)."""
    cfg, history = run.cfg, run.history
    n_train, trunk_params = run.model.num_trainable(), run.trunk.num_parameters
    kept = kept_epoch(run)
    rec = next((h for h in history if h["epoch"] == kept), {})
    return {
        "task": cfg.task,
        "method": cfg.method,
        "epochs": len(history),
        "steps": run.step,
        "keep": cfg.keep,
        "kept_epoch": kept,
        "train_clips": len(run.train_ds),
        "trainable_params": n_train,
        "trunk_params": trunk_params,
        "trainable_percent": 100 * n_train / trunk_params,
        "val_top1": rec.get("val_top1"),
        "val_top5": rec.get("val_top5"),
        "val_clips": rec.get("val_clips"),
        "best_val_top1": max((h["val_top1"] for h in history if "val_top1" in h), default=None),
        "seconds_per_epoch": sum(h["epoch_seconds"] for h in history) / max(len(history), 1),
        "peak_memory_mb": peak_memory_mb(run.d.device),
        "broken_clips": sorted(run.broken | (run.val_ds.broken if run.val_ds is not None else set())),
        "processes": run.d.world,
        "device": str(run.d.device),
        "history": history,
    }


def write_outputs(run: Run, metrics: dict[str, Any], run_dir: Path) -> None:
    """Rank 0: the kept epoch's bundle or weights, metrics.json (+ ``--metrics-out``), curve.png."""
    cfg, model = run.cfg, run.model
    if run.best is not None and run.best.trainable is not None and cfg.keep == "best" \
            and run.history and run.best.epoch != run.history[-1]["epoch"]:
        model.load_trainable_state(run.best.trainable)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.servable:
        adapter, weights = model.export_weights()
        spec = TaskSpec(name=cfg.task, labels=tuple(run.labels), adapter=adapter, sampling=run.sampling,
                        trunk_fingerprint=run.trunk.fingerprint, version=cfg.version, description=cfg.description,
                        metrics={k: metrics[k] for k in BUNDLE_METRICS if metrics[k] is not None})
        try:
            save_bundle(cfg.out, spec, weights, replace=cfg.force)
        except FileExistsError as e:
            raise FileExistsError(f"{e}: it appeared during training; the trained run is kept in "
                                  f"{run_dir / CHECKPOINT_NAME} (rerun with --resume auto --force to write it)") from e
        print(f"wrote bundle {cfg.out} from epoch {metrics['kept_epoch']} ({cfg.keep}; val top-1 {metrics['val_top1']})",
              file=sys.stderr)
    else:
        path = run_dir / "model.safetensors"
        atomic_write_bytes(path, safetensors_bytes(
            {k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state().items()}))
        print(f"method {cfg.method} changes the shared trunk, so it is not servable as an adapter bundle; "
              f"wrote its trained weights (epoch {metrics['kept_epoch']}) to {path}", file=sys.stderr)
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write_text(run_dir / "metrics.json", text)
    if cfg.metrics_out:
        atomic_write_text(cfg.metrics_out, text)
    written = ["metrics.json", CHECKPOINT_NAME]
    if metrics["history"]:
        try:
            from .plot import plot_curves

            plot_curves(metrics["history"], run_dir / "curve.png", f"{cfg.task} - {cfg.method}")
            written.append("curve.png")
        except ImportError as e:
            print(f"warning: no {run_dir / 'curve.png'}: {e} (pip install '.[training]' for the curve)", file=sys.stderr)
    print(f"run folder {run_dir}: {', '.join(written)}", file=sys.stderr)
