"""Builders for tiny trunks and task bundles shared by the test suite (no network, seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from stadapter import AdapterConfig, SamplingConfig, TaskAdapters, TaskSpec, VideoTrunk, init_trunk, save_bundle

TINY_MODEL = "test-vit-tiny"  # stadapter/model_configs/test-vit-tiny.json: 32 px, patch 8, width 32, 2 blocks
TINY_SAMPLING = SamplingConfig(num_frames=4, input_size=32)


def make_trunk_dir(out: Path, seed: int = 0) -> Path:
    init_trunk(TINY_MODEL, "random", out, seed=seed)
    return out


def make_task_adapters(
    trunk: VideoTrunk,
    num_classes: int,
    cfg: AdapterConfig = AdapterConfig(width=8, pre_attn=True, pre_mlp=True),
    seed: int = 0,
    std: float = 0.2,
) -> TaskAdapters:
    """Adapters with random (non-identity) weights so that tasks give different answers."""
    g = torch.Generator().manual_seed(seed)
    ta = TaskAdapters(cfg, trunk.dim, trunk.num_blocks, num_classes)
    with torch.no_grad():
        for p in ta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return ta


def make_bundle(
    trunk: VideoTrunk,
    out: Path,
    name: str = "toy",
    labels: Optional[Sequence[str]] = None,
    cfg: AdapterConfig = AdapterConfig(width=8, pre_attn=True, pre_mlp=True),
    sampling: SamplingConfig = TINY_SAMPLING,
    version: int = 1,
    seed: int = 0,
) -> Path:
    labels = list(labels or [f"{name}-class-{i}" for i in range(3)])
    ta = make_task_adapters(trunk, len(labels), cfg, seed)
    spec = TaskSpec(name=name, labels=tuple(labels), adapter=cfg, sampling=sampling,
                    trunk_fingerprint=trunk.fingerprint, version=version)
    return save_bundle(out, spec, ta)
