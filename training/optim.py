"""AdamW without decay on biases and norms, and a per-step linear warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Biases and 1-D tensors (norm scales, embeddings' biases) get no weight decay, as in the public recipe."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named:
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step`` (0-based): linear warmup to 1, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, warmup_steps: int, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(named, weight_decay)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup_steps, total_steps))
    return opt, sched
