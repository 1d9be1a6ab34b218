"""One training epoch and one evaluation pass over a built :class:`~training.run.Run`."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .distributed import Dist
from .methods import VideoModel
from .run import Best, Run

LOG_INTERVAL_S = 1.0  # the progress bar's loss is read back from the device at most this often
TOP5_MIN_CLASSES = 6  # top-5 accuracy means something only with more than 5 classes


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with open_clip
        return None
    return tqdm(total=total, desc=desc, mininterval=1.0, leave=False, dynamic_ncols=True)


def _finite_or_raise(value: float, epoch: int, first_step: int, step: int) -> None:
    if not torch.isfinite(torch.tensor(value)):
        raise FloatingPointError(f"the training loss was {value} in epoch {epoch + 1} (steps {first_step + 1}-{step}); "
                                 f"lower --lr")


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Train ``epoch`` (0-based); returns its record (loss, lr, speed). The loss stays on the device
    until it is logged: the progress bar reads it at most every ``LOG_INTERVAL_S``, the record at the end."""
    cfg, d = run.cfg, run.d
    run.sampler.set_epoch(epoch)
    run.train_ds.set_epoch(epoch)
    bar = progress_bar(run.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and d.main)
    t0 = last_log = time.perf_counter()
    first_step, seen = run.step, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)  # sum of loss x clips
    for frames, target, bad in run.train_loader:
        run.broken.update(n for b in bad for n in b.split(", "))
        frames, target = frames.to(d.device, non_blocking=True), target.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=run.dtype, enabled=run.dtype is not None):
            logits = run.net(frames)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            run.scaler.unscale_(run.opt)
            torch.nn.utils.clip_grad_norm_(run.params, cfg.clip_grad)
        run.scaler.step(run.opt)
        run.scaler.update()
        run.sched.step()
        run.step += 1
        loss_sum += loss.detach() * target.shape[0]
        seen += target.shape[0]
        if bar is not None:
            bar.update(1)
            now = time.perf_counter()
            if now - last_log >= LOG_INTERVAL_S:
                last_log, value = now, loss.item()
                _finite_or_raise(value, epoch, first_step, run.step)
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{run.sched.get_last_lr()[0]:.2e}",
                                clips_s=f"{seen * d.world / (now - t0):.1f}")
        if cfg.max_steps and run.step >= cfg.max_steps:
            break
    if bar is not None:
        bar.close()
    epoch_time = time.perf_counter() - t0
    loss_total, seen_total = d.all_sum([loss_sum.item(), float(seen)])
    _finite_or_raise(loss_total, epoch, first_step, run.step)
    return {
        "epoch": epoch + 1,
        "step": run.step,
        "train_loss": loss_total / max(seen_total, 1),
        "lr": run.sched.get_last_lr()[0],
        "epoch_seconds": epoch_time,
        "clips_per_second": seen_total / max(epoch_time, 1e-9),
        "train_broken": len(run.broken),
    }


@torch.no_grad()
def evaluate(model: VideoModel, loader: DataLoader, d: Dist, dtype: Optional[torch.dtype]) -> dict[str, float]:
    """Top-1 (and top-5 with more than 5 classes) with softmax averaged over each clip's views;
    sums are reduced over ranks."""
    model.eval()
    c1 = c5 = n = broken = 0.0
    for views, labels, bad in loader:
        B, V = views.shape[:2]
        views, labels = views.to(d.device, non_blocking=True), labels.to(d.device)
        with torch.autocast(d.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(views.flatten(0, 1))  # [B*V, C]
        probs = logits.float().softmax(-1).view(B, V, -1).mean(1)  # [B, C]
        ok = labels >= 0
        top = probs.topk(min(5, probs.shape[1]), dim=1).indices  # [B, k]
        c1 += float(((top[:, 0] == labels) & ok).sum())
        c5 += float(((top == labels[:, None]).any(1) & ok).sum())
        n += float(ok.sum())
        broken += len(bad)
    c1, c5, n, broken = d.all_sum([c1, c5, n, broken])
    model.train()
    out: dict[str, float] = {"val_top1": c1 / max(n, 1)}
    if model.head.out_features >= TOP5_MIN_CLASSES:
        out["val_top5"] = c5 / max(n, 1)
    out.update(val_clips=int(n), val_broken=int(broken))
    return out


def track_best(run: Run, rec: dict[str, Any]) -> None:
    """Remember this epoch's tensors if its validation top-1 is the best so far (ties: the later epoch)."""
    if run.cfg.keep != "best" or "val_top1" not in rec:
        return
    if run.best is None or rec["val_top1"] >= run.best.val_top1:
        state = ({k: v.detach().to("cpu", copy=True) for k, v in run.model.trainable_state().items()}
                 if run.d.main else None)  # only rank 0 writes the outputs
        run.best = Best(rec["epoch"], rec["val_top1"], state)
