"""Train one task on the frozen trunk and write a servable task bundle.

Single process (CPU laptop or one GPU)::

    python -m training.train --trunk model_repository/trunk --data-root data/motion \\
        --train-list data/motion/train.txt --val-list data/motion/val.txt --labels data/motion/labels.txt \\
        --task motion --method st-adapter --epochs 12 --out model_repository/tasks/motion/1

Several processes (``torchrun``; NCCL on GPUs, gloo on CPU; only rank 0 writes)::

    torchrun --nproc_per_node 4 -m training.train ... (same flags)

The recipe follows the public ST-Adapter code: frozen trunk (bf16/fp16 on CUDA,
fp32 on CPU), AdamW without decay on biases, per-step linear warmup then cosine,
gradient clipping, head dropout, evaluation with softmax averaged over the test
views. ``--resume auto`` continues from ``<run-dir>/checkpoint.pt`` at the same
step (checkpoints are written after every epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler, Subset

from stadapter import AdapterConfig, SamplingConfig, TaskSpec, load_trunk, save_bundle
from stadapter.config import CLIP_MEAN, CLIP_STD

from .data import AugmentConfig, BrokenVideoError, DataError, VideoDataset, read_labels, read_list, scan_class_folders
from .methods import METHODS, VideoModel
from .optim import make_optimizer
from .plot import plot_curves


@dataclass(frozen=True)
class TrainConfig:
    trunk: str
    task: str
    out: str = ""
    data_root: str = ""
    train_list: str = ""
    val_list: str = ""
    labels: str = ""
    train_dir: str = ""
    val_dir: str = ""
    method: str = "st-adapter"
    adapter_width: int = 64
    adapter_kernel: tuple[int, int, int] = (3, 1, 1)
    pre_attn: bool = True
    pre_mlp: bool = False
    layers: int = 0
    adapter_activation: str = "none"
    partial_blocks: int = 1
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    dropout: float = 0.5
    label_smoothing: float = 0.0
    num_frames: int = 8
    sampling_mode: str = "uniform"
    stride: int = 4
    temporal_views: int = 1
    spatial_views: int = 1
    resize: int = 0
    augment: str = "jitter"
    flip: bool = False
    workers: int = 2
    cache: bool = False
    skip_broken: bool = False
    seed: int = 0
    device: str = ""
    resume: str = ""
    run_dir: str = ""
    metrics_out: str = ""
    version: int = 1
    description: str = ""
    eval_every: int = 1
    max_steps: int = 0  # stop after this many optimiser steps in total (0 = run all epochs); for tests
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if bool(self.train_list) == bool(self.train_dir):
            raise ValueError("give either --train-list (with --data-root and --labels) or --train-dir (class folders)")
        if self.train_list and not self.labels:
            raise ValueError("--train-list needs --labels (one class name per line)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs and --batch-size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.method in ("st-adapter", "linear") and not self.out:
            raise ValueError(f"--out (the bundle folder) is required for --method {self.method}")

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(
            width=self.adapter_width,
            kernel=tuple(self.adapter_kernel),
            pre_attn=self.pre_attn,
            pre_mlp=self.pre_mlp,
            layers=self.layers,
            activation=self.adapter_activation,  # type: ignore[arg-type]
        )

    def sampling(self, input_size: int) -> SamplingConfig:
        return SamplingConfig(
            num_frames=self.num_frames,
            mode=self.sampling_mode,  # type: ignore[arg-type]
            stride=self.stride,
            temporal_views=self.temporal_views,
            spatial_views=self.spatial_views,
            input_size=input_size,
            resize=self.resize,
            mean=CLIP_MEAN,
            std=CLIP_STD,
        )

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / f"{self.task}-{self.method}"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_dist(requested: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = requested.startswith("cuda") or (not requested and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asked for CUDA but torch sees no GPU")
    if want_cuda:
        device = torch.device("cuda", local) if world > 1 or not requested else torch.device(requested)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        if not want_cuda:  # share the cores between the processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(rank, world, local, device)


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
    kw = dict(skip_broken=cfg.skip_broken, cache=cfg.cache, seed=cfg.seed)
    train_ds = VideoDataset(train, sampling, train=True, aug=aug, **kw)
    val_ds = VideoDataset(val, sampling, train=False, **kw) if val else None
    return train_ds, val_ds, labels


def collate(batch):
    frames = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    broken = [b[2] for b in batch if b[2]]  # paths of clips replaced because they would not decode
    return frames, labels, broken


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


@torch.no_grad()
def evaluate(model: VideoModel, loader: DataLoader, d: Dist, dtype: Optional[torch.dtype]) -> dict[str, float]:
    """Top-1 / top-5 with softmax averaged over each clip's views; sums are reduced over ranks."""
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
    return {"val_top1": c1 / max(n, 1), "val_top5": c5 / max(n, 1), "val_clips": int(n), "val_broken": int(broken)}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, mininterval=1.0, leave=False, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm comes with open_clip
        return None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the whole training; returns the final metrics (on every rank)."""
    d = setup_dist(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    run_dir = cfg.resolved_run_dir()
    trunk = load_trunk(cfg.trunk)
    sampling = cfg.sampling(trunk.image_size)
    train_ds, val_ds, labels = build_datasets(cfg, sampling)
    dtype = amp_dtype(d.device)
    model = VideoModel(trunk, cfg.method, len(labels), cfg.adapter() if cfg.method == "st-adapter" else None,
                       cfg.partial_blocks, cfg.dropout)
    if dtype is not None and not model.trunk_trainable:
        trunk.to(dtype)  # frozen: keep it in half precision on the GPU
    model.to(d.device)
    trunk_params = trunk.num_parameters
    n_train = model.num_trainable()

    if cfg.cache:
        for ds in (train_ds, val_ds):
            if ds is not None and ds.preload() and d.main:
                print(f"skipped {len(ds.broken)} broken clips: {sorted(ds.broken)[:5]}", file=sys.stderr)
    # Every clip is seen each epoch (no batchnorm here, so a short last batch is harmless); with
    # several processes the sampler pads by repeating clips so all ranks take the same number of steps.
    sampler = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    loader_kw = dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=d.device.type == "cuda",
                     persistent_workers=cfg.workers > 0)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, **loader_kw)
    val_loader = None
    if val_ds is not None:
        shard = Subset(val_ds, range(d.rank, len(val_ds), d.world))
        val_loader = DataLoader(shard, batch_size=max(1, cfg.batch_size // max(sampling.num_views, 1)), shuffle=False, **loader_kw)

    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    opt, sched = make_optimizer(model.trainable_parameters(), cfg.lr, cfg.weight_decay,
                                int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    start_epoch, step, history, broken_names = 0, 0, [], set()

    ckpt_path = run_dir / "checkpoint.pt"
    resume = ckpt_path if cfg.resume == "auto" else Path(cfg.resume) if cfg.resume else None
    if resume is not None and cfg.resume != "auto" and not resume.is_file():
        raise ValueError(f"--resume {resume}: no such checkpoint")
    if resume is not None and resume.is_file():
        ck = torch.load(resume, map_location="cpu", weights_only=True)
        if ck["method"] != cfg.method or ck["trunk_fingerprint"] != trunk.fingerprint:
            raise ValueError(f"{resume}: checkpoint is for method {ck['method']!r} on trunk {ck['trunk_fingerprint'][:12]}…, "
                             f"not {cfg.method!r} on {trunk.fingerprint[:12]}…")
        model.load_trainable_state(ck["trainable"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["torch_rng"])
        start_epoch, step, history = int(ck["epoch"]), int(ck["step"]), list(ck["history"])
        if d.main:
            print(f"resumed from {resume} at epoch {start_epoch}, step {step}", file=sys.stderr)

    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    params = [p for _, p in model.trainable_parameters()]
    if d.main:
        print(f"{cfg.task}: method {cfg.method}, {n_train:,} trainable parameters ({100 * n_train / trunk_params:.2f}% of the "
              f"{trunk_params:,}-parameter trunk), {len(train_ds)} train clips, {steps_per_epoch} steps/epoch x {cfg.epochs} "
              f"epochs, {d.world} process(es) on {d.device}", file=sys.stderr)

    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and d.main)
        t0, loss_sum, seen, epoch_steps = time.perf_counter(), 0.0, 0, 0
        for frames, target, bad in train_loader:
            broken_names.update(n for b in bad for n in b.split(", "))
            frames, target = frames.to(d.device, non_blocking=True), target.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=dtype, enabled=dtype is not None):
                logits = net(frames)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            step += 1
            epoch_steps += 1
            loss_sum += loss.item() * target.shape[0]
            seen += target.shape[0]
            if bar is not None:
                bar.update(1)
                rate = seen * d.world / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}", clips_s=f"{rate:.1f}")
            if cfg.max_steps and step >= cfg.max_steps:
                break
        if bar is not None:
            bar.close()
        epoch_time = time.perf_counter() - t0
        loss_total, seen_total = d.all_sum([loss_sum, float(seen)])
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_total / max(seen_total, 1),
            "lr": sched.get_last_lr()[0],
            "epoch_seconds": epoch_time,
            "clips_per_second": seen_total / max(epoch_time, 1e-9),
            "train_broken": len(broken_names),
        }
        last = epoch + 1 == cfg.epochs or bool(cfg.max_steps and step >= cfg.max_steps)
        if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
            rec.update(evaluate(model, val_loader, d, dtype))
        history.append(rec)
        if d.main:
            val = f", val top-1 {100 * rec['val_top1']:.1f}% top-5 {100 * rec['val_top5']:.1f}%" if "val_top1" in rec else ""
            print(f"epoch {epoch + 1}/{cfg.epochs}: step {step}, loss {rec['train_loss']:.4f}, "
                  f"{rec['clips_per_second']:.1f} clips/s, {epoch_time:.1f} s{val}", file=sys.stderr)
            _save_checkpoint(ckpt_path, {
                "method": cfg.method, "trunk_fingerprint": trunk.fingerprint, "epoch": epoch + 1, "step": step,
                "trainable": {k: v.detach().cpu() for k, v in model.trainable_state().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "torch_rng": torch.get_rng_state(),
                "history": history,
            })
        if last:
            break

    final = history[-1] if history else {}
    metrics = {
        "task": cfg.task,
        "method": cfg.method,
        "epochs": len(history),
        "steps": step,
        "train_clips": len(train_ds),
        "trainable_params": n_train,
        "trunk_params": trunk_params,
        "trainable_percent": 100 * n_train / trunk_params,
        "val_top1": final.get("val_top1"),
        "val_top5": final.get("val_top5"),
        "val_clips": final.get("val_clips"),
        "best_val_top1": max((h["val_top1"] for h in history if "val_top1" in h), default=None),
        "seconds_per_epoch": sum(h["epoch_seconds"] for h in history) / max(len(history), 1),
        "peak_memory_mb": peak_memory_mb(d.device),
        "broken_clips": sorted(broken_names | (val_ds.broken if val_ds is not None else set())),
        "processes": d.world,
        "device": str(d.device),
        "history": history,
    }
    if d.main:
        _write_outputs(cfg, model, trunk, sampling, labels, metrics, run_dir)
    if d.world > 1:
        dist.barrier()
    return metrics


def _write_outputs(cfg, model: VideoModel, trunk, sampling, labels, metrics, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2) + "\n"
    (run_dir / "metrics.json").write_text(text)
    if cfg.metrics_out:
        Path(cfg.metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.metrics_out).write_text(text)
    if metrics["history"]:
        plot_curves(metrics["history"], run_dir / "curve.png", f"{cfg.task} - {cfg.method}")
    if cfg.method in ("st-adapter", "linear"):
        adapter, weights = model.export_weights()
        keep = ("method", "epochs", "steps", "train_clips", "val_clips", "val_top1", "val_top5", "trainable_params")
        spec = TaskSpec(name=cfg.task, labels=tuple(labels), adapter=adapter, sampling=sampling,
                        trunk_fingerprint=trunk.fingerprint, version=cfg.version, description=cfg.description,
                        metrics={k: metrics[k] for k in keep if metrics[k] is not None})
        save_bundle(cfg.out, spec, weights, replace=True)
        print(f"wrote bundle {cfg.out} (val top-1 {metrics['val_top1']})", file=sys.stderr)
    else:
        path = run_dir / "model.safetensors"
        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state().items()}, str(path))
        print(f"method {cfg.method} changes the shared trunk, so it is not servable as an adapter bundle; "
              f"wrote its trained weights to {path} and metrics to {run_dir / 'metrics.json'}", file=sys.stderr)


def _kernel(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--adapter-kernel takes T,H,W (e.g. 3,1,1), got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m training.train", description="Train a task adapter on the frozen trunk.")
    a = p.add_argument
    a("--trunk", required=True, help="trunk folder (trunk.json)")
    a("--task", required=True, help="task name written into task.json")
    a("--out", default="", help="bundle folder to write (e.g. model_repository/tasks/NAME/1)")
    a("--data-root", default="", help="root folder the list files' paths are relative to")
    a("--train-list", default="")
    a("--val-list", default="")
    a("--labels", default="", help="labels file, one class name per line")
    a("--train-dir", default="", help="class-per-subfolder training clips (instead of --train-list)")
    a("--val-dir", default="")
    a("--method", default="st-adapter", choices=METHODS)
    a("--adapter-width", type=int, default=64)
    a("--adapter-kernel", type=_kernel, default=(3, 1, 1), help="T,H,W; T=1 removes temporal modelling")
    a("--pre-attn", action=argparse.BooleanOptionalAction, default=True)
    a("--pre-mlp", action=argparse.BooleanOptionalAction, default=False)
    a("--layers", type=int, default=0, help="adapt the last N blocks (0 = all)")
    a("--adapter-activation", default="none", choices=("none", "gelu", "quickgelu", "relu"))
    a("--partial-blocks", type=int, default=1, help="trunk blocks fine-tuned by --method partial")
    a("--epochs", type=int, default=10)
    a("--batch-size", type=int, default=32, help="clips per process and step")
    a("--lr", type=float, default=3e-3)
    a("--warmup-epochs", type=float, default=1.0)
    a("--weight-decay", type=float, default=0.01)
    a("--clip-grad", type=float, default=1.0, help="max gradient norm (0 = off)")
    a("--dropout", type=float, default=0.5)
    a("--label-smoothing", type=float, default=0.0)
    a("--num-frames", type=int, default=8)
    a("--sampling-mode", default="uniform", choices=("uniform", "stride"))
    a("--stride", type=int, default=4)
    a("--temporal-views", type=int, default=1, help="test views along time")
    a("--spatial-views", type=int, default=1, choices=(1, 3))
    a("--resize", type=int, default=0, help="short side before the crop (0 = input size)")
    a("--augment", default="jitter", choices=("jitter", "rrc", "none"))
    a("--flip", action=argparse.BooleanOptionalAction, default=False,
      help="random horizontal flips (leave off for direction-sensitive tasks)")
    a("--workers", type=int, default=2)
    a("--cache", action="store_true", help="decode every clip once and keep it in memory")
    a("--skip-broken", action="store_true", help="skip and count undecodable clips instead of stopping")
    a("--seed", type=int, default=0)
    a("--device", default="", help="cpu, cuda, cuda:1 (default: cuda if available)")
    a("--resume", default="", help="checkpoint file, or 'auto' for <run-dir>/checkpoint.pt if present")
    a("--run-dir", default="", help="checkpoints, metrics.json, curve.png (default runs/<task>-<method>)")
    a("--metrics-out", default="", help="also write the metrics JSON here")
    a("--version", type=int, default=1)
    a("--description", default="")
    a("--eval-every", type=int, default=1)
    a("--max-steps", type=int, default=0)
    a("--no-progress", dest="progress", action="store_false")
    ns = p.parse_args(argv)
    try:
        return TrainConfig(**vars(ns))
    except ValueError as e:
        p.error(str(e))
        raise


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(argv)
    try:
        metrics = train(cfg)
    except (DataError, BrokenVideoError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
