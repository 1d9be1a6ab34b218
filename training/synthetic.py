"""Synthetic video tasks written as real encoded clips (MPEG-4 video in .mp4), deterministic by seed.

Two tasks, mirroring the paper's two kinds of benchmark:

* ``shapes`` (appearance, like Kinetics): which shape moves through the clip.
  Any single frame tells the answer; horizontal flips keep the label.
* ``motion`` (temporal, like Something-Something): which way the object moves
  (left / right / up / down). The object's path segment is drawn uniformly and
  then traversed in the labelled sense, so one frame taken at a random time shows
  nothing about the label, and the unordered set of frames is the same for
  opposite directions (it reveals at most the axis). Flips change the label.

Layout written under ``--out``::

    train/<label>/<id>.mp4, val/<label>/<id>.mp4   (class-per-subfolder)
    train.txt, val.txt                              (``<relative/path> <label-int>``)
    labels.txt                                      (one class name per line)
    dataset.json                                    (task, kind, flip_ok, sizes, seed)

Example::

    python -m training.synthetic --task motion --out data/motion --num-train 1200 --num-val 300 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from stadapter.fsutil import atomic_write_bytes, atomic_write_text
from stadapter.video.synthetic import encode_frames

from .render import COLOURS, SHAPES, TEXTURES, background, object_colour, paint, shape_mask


@dataclass(frozen=True)
class TaskDef:
    name: str
    kind: str  # "appearance" | "temporal"
    labels: tuple[str, ...]
    flip_ok: bool
    draw: Callable[[np.random.Generator, int, int, int], np.ndarray]  # (rng, label, size, frames) -> [F, S, S, 3]


def _moving_object(rng: np.random.Generator, size: int, frames: int, shape: str, start: np.ndarray, step: np.ndarray) -> np.ndarray:
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    bg = background(rng, size, texture)
    colour = object_colour(rng, list(COLOURS)[int(rng.integers(len(COLOURS)))])
    radius = float(rng.uniform(0.09, 0.15) * size)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        cx, cy = start + t * step
        out[t] = paint(bg, shape_mask(shape, size, cx, cy, radius), colour)
    return out


def draw_shapes(rng: np.random.Generator, label: int, size: int, frames: int) -> np.ndarray:
    """The labelled shape drifting in a random direction."""
    margin = 0.2 * size
    angle = rng.uniform(0, 2 * math.pi)
    travel = rng.uniform(0.1, 0.35) * size
    step = np.array([math.cos(angle), math.sin(angle)]) * travel / max(frames - 1, 1)
    centre = rng.uniform(margin + travel / 2, size - margin - travel / 2, size=2)
    start = centre - step * (frames - 1) / 2
    return _moving_object(rng, size, frames, SHAPE_TASK_LABELS[label], start, step)


MOTION_LABELS = ("left", "right", "up", "down")
SHAPE_TASK_LABELS = ("circle", "square", "triangle", "cross")


def draw_motion(rng: np.random.Generator, label: int, size: int, frames: int) -> np.ndarray:
    """A random shape crossing a segment [a, a + D] along one axis in the labelled sense."""
    margin = 0.16 * size
    travel = rng.uniform(0.3, 0.55) * size
    a = rng.uniform(margin, size - margin - travel)
    across = rng.uniform(margin, size - margin)
    direction = MOTION_LABELS[label]
    sign = 1.0 if direction in ("right", "down") else -1.0
    along0 = a if sign > 0 else a + travel
    per_frame = sign * travel / max(frames - 1, 1)
    if direction in ("left", "right"):
        start, step = np.array([along0, across]), np.array([per_frame, 0.0])
    else:
        start, step = np.array([across, along0]), np.array([0.0, per_frame])
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return _moving_object(rng, size, frames, shape, start, step)


TASKS: dict[str, TaskDef] = {
    "shapes": TaskDef("shapes", "appearance", SHAPE_TASK_LABELS, True, draw_shapes),
    "motion": TaskDef("motion", "temporal", MOTION_LABELS, False, draw_motion),
}
SPLIT_IDS = {"train": 0, "val": 1}


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each clip has its own stream, so a clip does not depend on how many others were made."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def encode_mp4(frames: np.ndarray, path: Path, fps: int = 8, qscale: int = 2) -> None:
    """frames uint8 [F, S, S, 3] -> MPEG-4 Part 2 video in an .mp4 file.

    FFmpeg's own ``mpeg4`` encoder, single-threaded, gives the same bytes on every run;
    libx264 did not (a few clips differed between identical runs).
    """
    data = encode_frames(frames, fps=fps, codec="mpeg4", options={"qscale": str(qscale)}, threads=1)
    atomic_write_bytes(path, data)


@dataclass(frozen=True)
class SyntheticConfig:
    task: str
    num_train: int
    num_val: int
    seed: int = 0
    size: int = 64
    frames: int = 16
    fps: int = 8

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown synthetic task {self.task!r}; known: {sorted(TASKS)}")
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError(f"clip counts must be >= 0, got train={self.num_train} val={self.num_val}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"--size must be an even number >= 16 (MPEG-4 video with 4:2:0 chroma), got {self.size}")
        if self.frames < 2:
            raise ValueError(f"--frames must be >= 2, got {self.frames}")


def generate(cfg: SyntheticConfig, out: Path, progress: bool = False) -> dict:
    """Write clips, list files, labels and dataset.json; labels cycle so classes are balanced."""
    task = TASKS[cfg.task]
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val)):
        lines = []
        for i in range(n):
            label = i % len(task.labels)
            rel = f"{split}/{task.labels[label]}/{i:06d}.mp4"
            encode_mp4(task.draw(clip_rng(cfg.seed, split, i), label, cfg.size, cfg.frames), out / rel, cfg.fps)
            lines.append(f"{rel} {label}")
            if progress and (i + 1) % 200 == 0:
                print(f"{cfg.task} {split}: {i + 1}/{n}", file=sys.stderr)
        atomic_write_text(out / f"{split}.txt", "".join(line + "\n" for line in lines))
    atomic_write_text(out / "labels.txt", "".join(name + "\n" for name in task.labels))
    info = {**asdict(cfg), "kind": task.kind, "flip_ok": task.flip_ok, "labels": list(task.labels)}
    atomic_write_text(out / "dataset.json", json.dumps(info, indent=2) + "\n")
    return info


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--fps", type=int, default=8)
    args = p.parse_args(argv)
    try:
        cfg = SyntheticConfig(args.task, args.num_train, args.num_val, args.seed, args.size, args.frames, args.fps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = generate(cfg, args.out, progress=True)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
