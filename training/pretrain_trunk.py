"""Pre-train the embedded demo trunk on generated still images.

No pretrained CLIP weights can be downloaded on the machines this project must
run on, so the project ships a small open_clip ViT (``training/configs/
stadapter-vit-nano.json``: 48 px, patch 8, width 128, 4 blocks, 4 heads) trained
here, from a seed, on still images drawn by :mod:`training.render`: one shape
(6 kinds) of one colour (8) at some place (3x3 cells) on a textured background
(5 textures). The model learns all four attributes at once (a linear head per
attribute on the final CLS token, the feature ST-Adapter's head uses), so its
features carry what the video tasks need: what the object is, and where.

It stands in for CLIP; ``python -m stadapter.trunk init --model ViT-B-16
--pretrained openai`` stays the production trunk.

Example (CPU is enough: the model is small)::

    python -m training.pretrain_trunk --out model_repository/trunk --steps 1500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stadapter import VideoTrunk
from stadapter.config import CLIP_MEAN, CLIP_STD, SamplingConfig
from stadapter.factory import arch_record, build_visual, write_trunk

from .optim import make_optimizer
from .render import COLOURS, SHAPES, TEXTURES, background, object_colour, paint, shape_mask
from .transforms import normalise

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_MODEL = "stadapter-vit-nano"
GRID = 3
ATTRIBUTES = {"shape": len(SHAPES), "colour": len(COLOURS), "texture": len(TEXTURES), "cell": GRID * GRID}


def draw_still(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, int]]:
    """One image uint8 [size, size, 3] and its attribute labels."""
    shape, colour, texture = (int(rng.integers(n)) for n in (len(SHAPES), len(COLOURS), len(TEXTURES)))
    radius = float(rng.uniform(0.09, 0.15) * size)
    margin = 0.12 * size
    cx, cy = rng.uniform(margin, size - margin, size=2)
    img = paint(background(rng, size, TEXTURES[texture]), shape_mask(SHAPES[shape], size, cx, cy, radius),
                object_colour(rng, list(COLOURS)[colour]))
    cell = int(cy * GRID // size) * GRID + int(cx * GRID // size)
    return img, {"shape": shape, "colour": colour, "texture": texture, "cell": cell}


def make_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size, 3), np.uint8)
    labels = {k: np.empty(n, np.int64) for k in ATTRIBUTES}
    for i in range(n):
        imgs[i], lab = draw_still(rng, size)
        for k, v in lab.items():
            labels[k][i] = v
    return torch.from_numpy(imgs), {k: torch.from_numpy(v) for k, v in labels.items()}


def to_input(imgs: torch.Tensor, size: int, jitter: float, rng: random.Random, sampling: SamplingConfig) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> normalised [N, 1, 3, size, size]: one short-side scale per batch
    (in [1, jitter] x size), a random crop per image; ``jitter=1`` is a plain resize."""
    x = imgs.permute(0, 3, 1, 2).float().div_(255)
    side = max(size, round(size * rng.uniform(1.0, jitter)))
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    if side > size:
        crops = [(rng.randint(0, side - size), rng.randint(0, side - size)) for _ in range(x.shape[0])]
        x = torch.stack([x[i, :, y : y + size, c : c + size] for i, (y, c) in enumerate(crops)])
    return normalise(x, sampling).unsqueeze(1)


def pretrain(out: Path, model_name: str, config_file: Path, steps: int, batch: int, lr: float, num_images: int,
             seed: int, render_size: int, force: bool) -> dict:
    torch.manual_seed(seed)
    model_cfg = json.loads(config_file.read_text())
    visual = build_visual(model_cfg, quick_gelu=False)
    trunk = VideoTrunk(visual, arch_record(model_cfg, False), fingerprint="0" * 64)
    visual.requires_grad_(True)
    heads = nn.ModuleDict({k: nn.Linear(trunk.dim, n) for k, n in ATTRIBUTES.items()})
    sampling = SamplingConfig(num_frames=1, input_size=trunk.image_size, mean=CLIP_MEAN, std=CLIP_STD)
    train_imgs, train_lab = make_images(num_images, render_size, seed)
    val_imgs, val_lab = make_images(1000, render_size, seed + 10_000)
    named = [("visual." + n, p) for n, p in visual.named_parameters()] + [("heads." + n, p) for n, p in heads.named_parameters()]
    opt, sched = make_optimizer(named, lr, 0.05, warmup_steps=max(1, steps // 20), total_steps=steps)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, num_images, (batch,), generator=gen)
        feats = trunk.forward_features(to_input(train_imgs[idx], sampling.input_size, 1.15, rng, sampling))  # [B, d]
        loss = cast(torch.Tensor, sum(F.cross_entropy(heads[k](feats), train_lab[k][idx]) for k in ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    acc = evaluate(trunk, heads, val_imgs, val_lab, sampling)
    visual.requires_grad_(False)
    spec = write_trunk(out, visual, model_name, model_cfg, quick_gelu=False, custom_config=True, replace=force)
    report = {
        "model": model_name, "fingerprint": spec.fingerprint, "parameters": trunk.num_parameters,
        "steps": steps, "batch_size": batch, "lr": lr, "images": num_images, "seed": seed,
        "val_accuracy": acc, "seconds": round(time.perf_counter() - t0, 1),
        "command": "python -m training.pretrain_trunk " + " ".join(sys.argv[1:]),
    }
    (out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def evaluate(trunk: VideoTrunk, heads: nn.ModuleDict, imgs, labels, sampling) -> dict[str, float]:
    rng = random.Random(0)
    hits = {k: 0 for k in ATTRIBUTES}
    for s in range(0, imgs.shape[0], 250):
        feats = trunk.forward_features(to_input(imgs[s : s + 250], sampling.input_size, 1.0, rng, sampling))
        for k in ATTRIBUTES:
            hits[k] += int((heads[k](feats).argmax(1) == labels[k][s : s + 250]).sum())
    return {k: round(v / imgs.shape[0], 4) for k, v in hits.items()}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.pretrain_trunk", description="Pre-train the embedded demo trunk.")
    p.add_argument("--out", required=True, type=Path, help="trunk folder to write (e.g. model_repository/trunk)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="name recorded in trunk.json")
    p.add_argument("--model-config", type=Path, default=None,
                   help=f"open_clip model config (default training/configs/{DEFAULT_MODEL}.json)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--images", type=int, default=20000, help="distinct training images generated")
    p.add_argument("--render-size", type=int, default=64, help="images are drawn at this size, then resized/cropped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--force", action="store_true", help="replace an existing trunk folder")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg_file = args.model_config or CONFIG_DIR / f"{args.model}.json"
    try:
        report = pretrain(args.out, args.model, cfg_file, args.steps, args.batch_size, args.lr, args.images,
                          args.seed, args.render_size, args.force)
    except (FileExistsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
