"""Train one task on the frozen trunk and write a servable task bundle.

Single process (CPU laptop or one GPU)::

    python -m training.train --trunk model_repository/trunk --data-root data/motion \\
        --train-list data/motion/train.txt --val-list data/motion/val.txt --labels data/motion/labels.txt \\
        --task motion --method st-adapter --epochs 12 --out runs/motion/bundle

Several processes (``torchrun``; NCCL on GPUs, gloo on CPU; only rank 0 writes)::

    torchrun --nproc_per_node 4 -m training.train ... (same flags)

The recipe follows the public ST-Adapter code: frozen trunk (bf16/fp16 on CUDA,
fp32 on CPU), AdamW without decay on biases, per-step linear warmup then cosine,
gradient clipping, head dropout, evaluation with softmax averaged over the test
views. ``--resume auto`` continues from ``<run-dir>/checkpoint.pt`` at the same
step (checkpoints are written after every epoch). The bundle holds the epoch with
the best validation top-1 (``--keep last`` for the last epoch); an existing
``--out`` is refused unless ``--force``.

The pieces: :mod:`.config` (flags), :mod:`.run` (build), :mod:`.checkpoint`
(save / resume), :mod:`.loop` (one epoch, evaluation), :mod:`.outputs` (bundle,
metrics, curve).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from . import checkpoint
from .config import TrainConfig, build_parser, parse_args
from .data import BrokenVideoError, DataError
from .distributed import Dist, barrier, env_rank, setup_dist, teardown
from .loop import evaluate, track_best, train_one_epoch
from .outputs import summary, write_outputs
from .run import Run, build

__all__ = ["TrainConfig", "build_parser", "main", "parse_args", "train"]


def check_out(cfg: TrainConfig) -> None:
    """An existing bundle folder is replaced only with ``--force`` (checked before any training)."""
    if cfg.servable and not cfg.force and Path(cfg.out).exists():
        raise FileExistsError(f"--out {cfg.out} already exists")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole training; returns the final metrics (on every rank)."""
    if env_rank() == 0:  # only rank 0 writes it; torchrun stops the others if this one fails
        check_out(cfg)
    d = setup_dist(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        teardown(d)


def _announce(run: Run, run_dir: Path) -> None:
    cfg, n_train, trunk_params = run.cfg, run.model.num_trainable(), run.trunk.num_parameters
    print(f"{cfg.task}: method {cfg.method}, {n_train:,} trainable parameters ({100 * n_train / trunk_params:.2f}% of the "
          f"{trunk_params:,}-parameter trunk), {len(run.train_ds)} train clips, {run.steps_per_epoch} steps/epoch x "
          f"{cfg.epochs} epochs, {run.d.world} process(es) on {run.d.device}; run folder {run_dir}", file=sys.stderr)


def _log_epoch(run: Run, rec: dict[str, Any]) -> None:
    val = ""
    if "val_top1" in rec:
        val = f", val top-1 {100 * rec['val_top1']:.1f}%"
        if "val_top5" in rec:
            val += f" top-5 {100 * rec['val_top5']:.1f}%"
    print(f"epoch {rec['epoch']}/{run.cfg.epochs}: step {rec['step']}, loss {rec['train_loss']:.4f}, "
          f"{rec['clips_per_second']:.1f} clips/s, {rec['epoch_seconds']:.1f} s{val}", file=sys.stderr)


def _train(cfg: TrainConfig, d: Dist) -> dict[str, Any]:
    run_dir = cfg.resolved_run_dir()
    run = build(cfg, d)
    ckpt_path = run_dir / checkpoint.CHECKPOINT_NAME
    resume = checkpoint.resume_path(cfg, run_dir)
    if resume is not None:
        warnings = checkpoint.resume(run, resume)
        if d.main:
            print(f"resumed from {resume} at epoch {run.start_epoch}, step {run.step}", file=sys.stderr)
        checkpoint.report(warnings, d.main)
    if d.main:
        _announce(run, run_dir)

    run.model.train()
    for epoch in range(run.start_epoch, cfg.epochs):
        if cfg.max_steps and run.step >= cfg.max_steps:
            break
        rec = train_one_epoch(run, epoch)
        last = epoch + 1 == cfg.epochs or bool(cfg.max_steps and run.step >= cfg.max_steps)
        if run.val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            rec.update(evaluate(run.model, run.val_loader, d, run.dtype))
        run.history.append(rec)
        track_best(run, rec)
        if d.main:
            _log_epoch(run, rec)
            checkpoint.save(ckpt_path, checkpoint.checkpoint_state(run, epoch + 1))
        if last:
            break

    metrics = summary(run)
    if d.main:
        write_outputs(run, metrics, run_dir)
    barrier(d)
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(argv)
    try:
        metrics = train(cfg)
    except FileExistsError as e:
        print(f"error: {e} (pass --force to replace it)", file=sys.stderr)
        return 2
    except (DataError, BrokenVideoError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if env_rank() == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
