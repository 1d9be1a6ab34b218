"""Random task bundles for the benches: real bundles on disk whose adapter weights are seeded noise."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from stadapter import AdapterConfig, SamplingConfig, TaskAdapters, TaskSpec, VideoTrunk, save_bundle


def random_bundle(trunk: VideoTrunk, out: Path, name: str, adapter: AdapterConfig, sampling: SamplingConfig,
                  num_classes: int, seed: int, std: float = 0.02, labels: Optional[Sequence[str]] = None) -> Path:
    """Save a bundle of task ``name`` at ``out`` whose every parameter is ``N(0, std)`` from ``seed``.

    Labels default to ``c0 .. c{num_classes-1}``. Different seeds give tasks that answer differently.
    """
    ta = TaskAdapters(adapter, trunk.dim, trunk.num_blocks, num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    spec = TaskSpec(name=name, labels=tuple(labels if labels is not None else (f"c{i}" for i in range(num_classes))),
                    adapter=adapter, sampling=sampling, trunk_fingerprint=trunk.fingerprint)
    return save_bundle(out, spec, ta)


NUM_TASKS = 8  # the random tasks of a bench repository


def build_repository(root: Path, model: str, adapter, num_frames: int, input_size: int, num_classes: int = 10) -> Path:
    """A repository with a random trunk of ``model`` and NUM_TASKS random task bundles."""
    from stadapter import init_trunk, load_trunk

    init_trunk(model, "random", root / "trunk", seed=0)
    trunk = load_trunk(root / "trunk")
    sampling = SamplingConfig(num_frames=num_frames, input_size=input_size)
    for k in range(NUM_TASKS):
        random_bundle(trunk, root / "tasks" / f"task{k}" / "1", f"task{k}", adapter, sampling, num_classes, seed=100 + k)
    return root
