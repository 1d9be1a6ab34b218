"""Training-time transforms on decoded frames: temporal sampling, crops, flips, normalisation.

Torch only (no decoding), so the still-image pre-training shares them with the video trainer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from stadapter import SamplingConfig

Augment = Literal["jitter", "rrc", "none"]


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation.

    Args:
        mode: ``jitter`` = resize the short side to s in [S*jitter_min, S*jitter_max], random crop S
            (the public K400 recipe); ``rrc`` = random resized crop (area ``scale``, aspect ``ratio``;
            the SSv2 recipe); ``none`` = resize + centre crop.
        flip: random horizontal flips; keep off when the label depends on direction.
    """

    mode: Augment = "jitter"
    flip: bool = False
    jitter_min: float = 1.0
    jitter_max: float = 1.15
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if self.mode not in ("jitter", "rrc", "none"):
            raise ValueError(f"augmentation mode must be jitter|rrc|none, got {self.mode!r}")
        if not 1.0 <= self.jitter_min <= self.jitter_max:
            raise ValueError(f"need 1 <= jitter_min <= jitter_max, got {self.jitter_min}, {self.jitter_max}")


def train_indices(num_total: int, sampling: SamplingConfig, rng: random.Random) -> list[int]:
    """Training frame indices: a random frame per segment (uniform) or a random window (stride)."""
    T = sampling.num_frames
    if sampling.mode == "uniform":
        seg = num_total / T
        return [min(int(seg * i + rng.random() * seg), num_total - 1) for i in range(T)]
    span = (T - 1) * sampling.stride + 1
    start = rng.randint(0, max(num_total - span, 0))
    return [min(start + i * sampling.stride, num_total - 1) for i in range(T)]


def _resize(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic (antialiased when shrinking), as stadapter.video resizes for serving; clamped to [0, 1]."""
    return F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)


def augment_frames(frames: Tensor, size: int, aug: AugmentConfig, rng: random.Random) -> Tensor:
    """frames float [T, 3, H, W] in [0, 1] -> [T, 3, size, size], one crop for the whole clip."""
    _, _, H, W = frames.shape
    if aug.mode == "rrc":
        area = H * W
        for _ in range(10):
            a = area * rng.uniform(*aug.scale)
            r = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
            w, h = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < w <= W and 0 < h <= H:
                break
        else:
            w = h = min(H, W)
        y, x = rng.randint(0, H - h), rng.randint(0, W - w)
        out = _resize(frames[:, :, y : y + h, x : x + w], (size, size))
    else:
        short = size * (rng.uniform(aug.jitter_min, aug.jitter_max) if aug.mode == "jitter" else 1.0)
        scale = short / min(H, W)
        nh, nw = max(size, round(H * scale)), max(size, round(W * scale))
        out = _resize(frames, (nh, nw))
        if aug.mode == "jitter":
            y, x = rng.randint(0, nh - size), rng.randint(0, nw - size)
        else:
            y, x = (nh - size) // 2, (nw - size) // 2
        out = out[:, :, y : y + size, x : x + size]
    if aug.flip and rng.random() < 0.5:
        out = out.flip(-1)
    return out


def normalise(frames: Tensor, sampling: SamplingConfig) -> Tensor:
    mean = torch.tensor(sampling.mean, dtype=frames.dtype).view(1, 3, 1, 1)
    std = torch.tensor(sampling.std, dtype=frames.dtype).view(1, 3, 1, 1)
    return (frames - mean) / std
