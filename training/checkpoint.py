"""Training checkpoints: what a resume needs to continue exactly where a run stopped.

A checkpoint (``<run-dir>/checkpoint.pt``, written by rank 0 after every epoch,
fsynced and renamed into place) holds the trained tensors, the optimiser,
scheduler and loss-scaler states, the config it was trained under, every random
generator's state (torch CPU and CUDA, Python's ``random``, NumPy's global one),
the history, and the best epoch so far with its tensors (for ``--keep best``).
Only tensors and plain values: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from stadapter.fsutil import atomic_file

from .config import MODEL_FIELDS, SCHEDULE_FIELDS, TrainConfig
from .run import Best, Run

CHECKPOINT_NAME = "checkpoint.pt"


def rng_states() -> dict[str, Any]:
    """Every random generator a training step or user code may draw from."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo :func:`rng_states`: the next random numbers are the ones the saving process would have drawn."""
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        for i, s in enumerate(states.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state({"bit_generator": n["bit_generator"],
                             "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                             "has_gauss": n["has_gauss"], "gauss": n["gauss"]})


def checkpoint_state(run: Run, epoch: int) -> dict[str, Any]:
    """The checkpoint after ``epoch`` (1-based) epochs."""
    best = run.best
    return {
        "method": run.cfg.method, "trunk_fingerprint": run.trunk.fingerprint, "epoch": epoch, "step": run.step,
        "config": run.cfg.to_dict(),
        "trainable": {k: v.detach().cpu() for k, v in run.model.trainable_state().items()},
        "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "scaler": run.scaler.state_dict(),
        "rng": rng_states(), "history": run.history, "broken": sorted(run.broken),
        # the best epoch's tensors, unless they are this epoch's (then "trainable" holds them once)
        "best": None if best is None else {"epoch": best.epoch, "val_top1": best.val_top1,
                                           "trainable": None if best.epoch == epoch else best.trainable},
    }


def save(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a crash leaves the previous one whole."""
    with atomic_file(path) as f:
        torch.save(state, f)


def load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises many kinds (zip, pickle, EOF)
        raise ValueError(f"{path} is not a readable training checkpoint: {e}") from e


def resume_path(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None; ``--resume FILE`` that does not exist is an error."""
    if cfg.resume == "auto":
        path = run_dir / CHECKPOINT_NAME
        return path if path.is_file() else None
    if not cfg.resume:
        return None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ValueError(f"--resume {path}: no such checkpoint")
    return path


def _differences(saved: dict[str, Any], cfg: TrainConfig, names: tuple[str, ...]) -> list[str]:
    now = cfg.to_dict()
    return [f"--{n.replace('_', '-')} {saved[n]} -> {now[n]}" for n in names if n in saved and saved[n] != now[n]]


def resume(run: Run, path: Path) -> list[str]:
    """Load ``path`` into ``run``; returns warnings (a changed schedule, nothing left to train)."""
    cfg, ck = run.cfg, load(path)
    if ck["method"] != cfg.method or ck["trunk_fingerprint"] != run.trunk.fingerprint:
        raise ValueError(f"{path}: checkpoint is for method {ck['method']!r} on trunk {ck['trunk_fingerprint'][:12]}…, "
                         f"not {cfg.method!r} on {run.trunk.fingerprint[:12]}…")
    saved = ck.get("config", {})  # checkpoints written before the config was stored have none
    shape = _differences(saved, cfg, MODEL_FIELDS)
    if shape:
        raise ValueError(f"{path}: checkpoint was trained with other model settings ({', '.join(shape)})")
    run.model.load_trainable_state(ck["trainable"])
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    if ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    restore_rng_states(ck["rng"] if "rng" in ck else {"torch": ck["torch_rng"]})
    run.start_epoch, run.step, run.history = int(ck["epoch"]), int(ck["step"]), list(ck["history"])
    run.broken = set(ck.get("broken", ()))
    if ck.get("best"):
        b = ck["best"]
        run.best = Best(int(b["epoch"]), float(b["val_top1"]), b["trainable"] if b["trainable"] is not None else ck["trainable"])
    warnings = []
    changed = _differences(saved, cfg, SCHEDULE_FIELDS)
    if changed:
        warnings.append(f"the learning-rate schedule differs from the checkpoint's ({', '.join(changed)}); "
                        f"from step {run.step} the new one applies")
    if run.start_epoch >= cfg.epochs or (cfg.max_steps and run.step >= cfg.max_steps):
        limit = f"{cfg.epochs} epochs" + (f", --max-steps {cfg.max_steps}" if cfg.max_steps else "")
        warnings.append(f"{path} is at epoch {run.start_epoch} (step {run.step}), past the end of the schedule "
                        f"({limit}): nothing is left to train; the outputs are written from the checkpoint")
    return warnings


def report(messages: list[str], main: bool) -> None:
    if main:
        for m in messages:
            print(f"warning: {m}", file=sys.stderr)
