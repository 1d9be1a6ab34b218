"""Builders for tiny trunks and task bundles shared by the test suite (no network, seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from server.registry.registry import TaskRegistry, TaskVersion
from stadapter import AdapterConfig, AdapterStack, SamplingConfig, TaskAdapters, TaskSpec, VideoTrunk, init_trunk, save_bundle

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


def upload_copy(registry: TaskRegistry, source: Path) -> Path:
    upload = registry.new_upload_dir()
    for f in ("task.json", "adapter.safetensors"):
        shutil.copy(source / f, upload / f)
    return upload


HETERO = [  # width, kernel, placement, depth and class count all differ
    (AdapterConfig(width=8, pre_attn=True, pre_mlp=True), 5),
    (AdapterConfig(width=12, kernel=(5, 3, 3), pre_attn=False, pre_mlp=True, layers=1), 3),
    (AdapterConfig(width=4, kernel=(1, 1, 1), pre_attn=True), 7),
]


def task_versions(trunk, tmp_path, specs=HETERO) -> list[TaskVersion]:
    """One loaded TaskVersion per (config, classes), as the registry builds them."""
    out = []
    for i, (cfg, n) in enumerate(specs):
        ta = make_task_adapters(trunk, n, cfg, seed=10 + i)
        stack = ta.stack()
        host = AdapterStack({k: s.map(lambda t: t.detach().clone()) for k, s in stack.slots.items()},
                           stack.head_w.detach().clone(), stack.head_b.detach().clone(), stack.num_classes,
                           stack.activation)
        spec = task_spec(trunk, f"t{i}", n, cfg)
        out.append(TaskVersion(spec, host, tmp_path / f"t{i}", host.nbytes))
    return out


def task_spec(trunk, name, n, cfg):
    return TaskSpec(name=name, labels=tuple(f"c{j}" for j in range(n)), adapter=cfg, sampling=TINY_SAMPLING,
                    trunk_fingerprint=trunk.fingerprint)
