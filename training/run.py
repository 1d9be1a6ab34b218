"""Everything one training run builds before its first step: data, model, optimiser, and the state it advances."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Subset

from stadapter import SamplingConfig, TaskSpec, VideoTrunk, load_trunk

from .config import TrainConfig
from .data import AugmentConfig, VideoDataset, read_labels, read_list, scan_class_folders
from .distributed import Dist, amp_dtype, grad_scaler
from .methods import LINEAR_EXPORT_ADAPTER, VideoModel
from .optim import make_optimizer


@dataclass
class Best:
    """The epoch with the best validation top-1 so far and its trained tensors (on the CPU; main rank only)."""

    epoch: int
    val_top1: float
    trainable: Optional[dict[str, Tensor]]


@dataclass
class Run:
    cfg: TrainConfig
    d: Dist
    trunk: VideoTrunk
    sampling: SamplingConfig
    labels: list[str]
    model: VideoModel
    net: torch.nn.Module  # the model, DDP-wrapped with several processes
    train_ds: VideoDataset
    val_ds: Optional[VideoDataset]
    sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: Optional[DataLoader]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dtype: Optional[torch.dtype]
    # advanced by the loop, restored by a resume:
    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)
    best: Optional[Best] = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.model.trainable_parameters()]


def build_datasets(cfg: TrainConfig, sampling: SamplingConfig) -> tuple[VideoDataset, Optional[VideoDataset], list[str]]:
    aug = AugmentConfig(mode=cfg.augment, flip=cfg.flip)  # type: ignore[arg-type]
    if cfg.train_list:
        labels = read_labels(cfg.labels)
        train = read_list(cfg.train_list, cfg.data_root, len(labels))
        val = read_list(cfg.val_list, cfg.data_root, len(labels)) if cfg.val_list else None
    else:
        fixed = read_labels(cfg.labels) if cfg.labels else None
        train, labels = scan_class_folders(cfg.train_dir, fixed)
        val = scan_class_folders(cfg.val_dir, labels)[0] if cfg.val_dir else None
    kw: dict[str, Any] = dict(skip_broken=cfg.skip_broken, cache=cfg.cache, seed=cfg.seed)
    train_ds = VideoDataset(train, sampling, train=True, aug=aug, **kw)
    val_ds = VideoDataset(val, sampling, train=False, **kw) if val else None
    return train_ds, val_ds, labels


def collate(batch):
    frames = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    broken = [b[2] for b in batch if b[2]]  # paths of clips replaced because they would not decode
    return frames, labels, broken


def check_task_spec(cfg: TrainConfig, trunk: VideoTrunk, sampling: SamplingConfig, labels: list[str]) -> None:
    """Refuse, before training, what would make the bundle unwritable at the end (task name, labels, version)."""
    if cfg.servable:
        adapter = cfg.adapter() if cfg.method == "st-adapter" else LINEAR_EXPORT_ADAPTER
        TaskSpec(name=cfg.task, labels=tuple(labels), adapter=adapter, sampling=sampling,
                 trunk_fingerprint=trunk.fingerprint, version=cfg.version, description=cfg.description)


def build(cfg: TrainConfig, d: Dist) -> Run:
    torch.manual_seed(cfg.seed)
    trunk = load_trunk(cfg.trunk)
    sampling = cfg.sampling(trunk.image_size)
    train_ds, val_ds, labels = build_datasets(cfg, sampling)
    check_task_spec(cfg, trunk, sampling, labels)
    dtype = amp_dtype(d.device)
    model = VideoModel(trunk, cfg.method, len(labels), cfg.adapter() if cfg.method == "st-adapter" else None,  # type: ignore[arg-type]
                       cfg.partial_blocks, cfg.dropout)
    if dtype is not None and not model.trunk_trainable:
        trunk.to(dtype)  # frozen: keep it in half precision on the GPU
    model.to(d.device)

    if cfg.cache:
        for ds in (train_ds, val_ds):
            if ds is not None and ds.preload() and d.main:
                print(f"skipped {len(ds.broken)} broken clips: {sorted(ds.broken)[:5]}", file=sys.stderr)
    # Every clip is seen each epoch (no batchnorm here, so a short last batch is harmless); with
    # several processes the sampler pads by repeating clips so all ranks take the same number of steps.
    sampler: DistributedSampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    loader_kw: dict[str, Any] = dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=d.device.type == "cuda",
                                     persistent_workers=cfg.workers > 0)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, **loader_kw)
    val_loader = None
    if val_ds is not None:
        shard = Subset(val_ds, range(d.rank, len(val_ds), d.world))
        val_loader = DataLoader(shard, batch_size=max(1, cfg.batch_size // max(sampling.num_views, 1)), shuffle=False,
                                **loader_kw)

    steps_per_epoch = len(train_loader)
    opt, sched = make_optimizer(model.trainable_parameters(), cfg.lr, cfg.weight_decay,
                                int(round(cfg.warmup_epochs * steps_per_epoch)), steps_per_epoch * cfg.epochs)
    net: torch.nn.Module = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return Run(cfg, d, trunk, sampling, labels, model, net, train_ds, val_ds, sampler, train_loader, val_loader,
               opt, sched, grad_scaler(dtype), dtype)
