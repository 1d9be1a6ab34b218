"""The trainer's configuration (one frozen dataclass) and its command line, whose defaults are the dataclass's."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from stadapter import AdapterConfig, SamplingConfig
from stadapter.config import CLIP_MEAN, CLIP_STD, Activation, SamplingMode

from .methods import METHODS

Keep = Literal["best", "last"]
KEEP_CHOICES = ("best", "last")
# Fields that shape the trained tensors: a checkpoint written under other values cannot be resumed.
MODEL_FIELDS = ("method", "adapter_width", "adapter_kernel", "pre_attn", "pre_mlp", "layers", "adapter_activation",
                "partial_blocks")
# Fields that shape the learning-rate schedule: resuming under other values changes it from the resumed step on.
SCHEDULE_FIELDS = ("epochs", "batch_size", "lr", "warmup_epochs")
# The adapter flags are AdapterConfig's fields, flat on the command line (and in a checkpoint's record);
# their defaults and choices are the library's, except the width (64 trains fast; the paper's ViT-B uses 384).
_ADAPTER = AdapterConfig()


@dataclass(frozen=True)
class TrainConfig:
    trunk: str
    task: str
    out: str = ""
    force: bool = False  # replace an existing --out (else it is refused before training starts)
    keep: Keep = "best"  # the epoch the bundle is written from: best validation top-1, or the last
    data_root: str = ""
    train_list: str = ""
    val_list: str = ""
    labels: str = ""
    train_dir: str = ""
    val_dir: str = ""
    method: str = "st-adapter"
    adapter_width: int = 64
    adapter_kernel: tuple[int, int, int] = _ADAPTER.kernel
    pre_attn: bool = _ADAPTER.pre_attn
    pre_mlp: bool = _ADAPTER.pre_mlp
    layers: int = _ADAPTER.layers
    adapter_activation: Activation = _ADAPTER.activation
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
    sampling_mode: SamplingMode = "uniform"
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
        if self.keep not in KEEP_CHOICES:
            raise ValueError(f"--keep must be one of {KEEP_CHOICES}, got {self.keep!r}")
        if bool(self.train_list) == bool(self.train_dir):
            raise ValueError("give either --train-list (with --data-root and --labels) or --train-dir (class folders)")
        if self.train_list and not self.labels:
            raise ValueError("--train-list needs --labels (one class name per line)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs and --batch-size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.method in ("st-adapter", "linear") and not self.out:
            raise ValueError(f"--out (the bundle folder) is required for --method {self.method}")

    @property
    def servable(self) -> bool:
        """Whether the method writes a task bundle (the others change the shared trunk)."""
        return self.method in ("st-adapter", "linear")

    def adapter(self) -> AdapterConfig:
        return AdapterConfig(
            width=self.adapter_width,
            kernel=self.adapter_kernel,  # AdapterConfig checks it is three odd ints (and makes it a tuple)
            pre_attn=self.pre_attn,
            pre_mlp=self.pre_mlp,
            layers=self.layers,
            activation=self.adapter_activation,
        )

    def sampling(self, input_size: int) -> SamplingConfig:
        return SamplingConfig(
            num_frames=self.num_frames,
            mode=self.sampling_mode,
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

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what a checkpoint stores)."""
        d = dataclasses.asdict(self)
        d["adapter_kernel"] = list(self.adapter_kernel)
        return d


def _kernel(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--adapter-kernel takes T,H,W (e.g. 3,1,1), got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # the flags' defaults are the config's
    p = argparse.ArgumentParser(prog="python -m training.train", description="Train a task adapter on the frozen trunk.")
    a = p.add_argument
    a("--trunk", required=True, help="trunk folder (trunk.json)")
    a("--task", required=True, help="task name written into task.json")
    a("--out", default=d["out"], help="bundle folder to write (e.g. model_repository/tasks/NAME/1)")
    a("--force", action="store_true", default=d["force"], help="replace an existing --out (else it is refused)")
    a("--keep", default=d["keep"], choices=KEEP_CHOICES,
      help="write the bundle from the epoch with the best validation top-1 (default) or from the last one")
    a("--data-root", default=d["data_root"], help="root folder the list files' paths are relative to")
    a("--train-list", default=d["train_list"])
    a("--val-list", default=d["val_list"])
    a("--labels", default=d["labels"], help="labels file, one class name per line")
    a("--train-dir", default=d["train_dir"], help="class-per-subfolder training clips (instead of --train-list)")
    a("--val-dir", default=d["val_dir"])
    a("--method", default=d["method"], choices=METHODS)
    a("--adapter-width", type=int, default=d["adapter_width"])
    a("--adapter-kernel", type=_kernel, default=d["adapter_kernel"], help="T,H,W; T=1 removes temporal modelling")
    a("--pre-attn", action=argparse.BooleanOptionalAction, default=d["pre_attn"])
    a("--pre-mlp", action=argparse.BooleanOptionalAction, default=d["pre_mlp"])
    a("--layers", type=int, default=d["layers"], help="adapt the last N blocks (0 = all)")
    a("--adapter-activation", default=d["adapter_activation"], choices=get_args(Activation))
    a("--partial-blocks", type=int, default=d["partial_blocks"], help="trunk blocks fine-tuned by --method partial")
    a("--epochs", type=int, default=d["epochs"])
    a("--batch-size", type=int, default=d["batch_size"], help="clips per process and step")
    a("--lr", type=float, default=d["lr"])
    a("--warmup-epochs", type=float, default=d["warmup_epochs"])
    a("--weight-decay", type=float, default=d["weight_decay"])
    a("--clip-grad", type=float, default=d["clip_grad"], help="max gradient norm (0 = off)")
    a("--dropout", type=float, default=d["dropout"])
    a("--label-smoothing", type=float, default=d["label_smoothing"])
    a("--num-frames", type=int, default=d["num_frames"])
    a("--sampling-mode", default=d["sampling_mode"], choices=get_args(SamplingMode))
    a("--stride", type=int, default=d["stride"])
    a("--temporal-views", type=int, default=d["temporal_views"], help="test views along time")
    a("--spatial-views", type=int, default=d["spatial_views"], choices=(1, 3))
    a("--resize", type=int, default=d["resize"], help="short side before the crop (0 = input size)")
    a("--augment", default=d["augment"], choices=("jitter", "rrc", "none"))
    a("--flip", action=argparse.BooleanOptionalAction, default=d["flip"],
      help="random horizontal flips (leave off for direction-sensitive tasks)")
    a("--workers", type=int, default=d["workers"])
    a("--cache", action="store_true", default=d["cache"], help="decode every clip once and keep it in memory")
    a("--skip-broken", action="store_true", default=d["skip_broken"],
      help="skip and count undecodable clips instead of stopping")
    a("--seed", type=int, default=d["seed"])
    a("--device", default=d["device"], help="cpu, cuda, cuda:1 (default: cuda if available)")
    a("--resume", default=d["resume"], help="checkpoint file, or 'auto' for <run-dir>/checkpoint.pt if present")
    a("--run-dir", default=d["run_dir"], help="checkpoints, metrics.json, curve.png (default runs/<task>-<method>)")
    a("--metrics-out", default=d["metrics_out"], help="also write the metrics JSON here")
    a("--version", type=int, default=d["version"])
    a("--description", default=d["description"])
    a("--eval-every", type=int, default=d["eval_every"])
    a("--max-steps", type=int, default=d["max_steps"])
    a("--no-progress", dest="progress", action="store_false", default=d["progress"])
    return p


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    p = build_parser()
    ns = p.parse_args(argv)
    try:
        return TrainConfig(**vars(ns))
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits
