"""Video datasets for training: list files, class folders, augmentation, broken-file handling.

Formats (the public ST-Adapter code's):

* list file: one ``<relative/path> <label-int>`` per line, paths relative to a root
  folder (a path may contain spaces; the label is the last field);
* labels file: one class name per line, line ``i`` names label ``i`` (no blank lines between);
* or a class-per-subfolder tree: ``root/<class>/<clip>``.

Training clips are decoded with :mod:`stadapter.video` (only the sampled frames)
and augmented here: random temporal offsets, short-side jitter or random resized
crop (the same crop for every frame of a clip), optional horizontal flip (off for
direction-sensitive tasks). Evaluation clips go through
:func:`stadapter.video.decode_clip`, the exact path the server uses, giving the
task's test views ``[V, T, 3, S, S]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from stadapter import SamplingConfig
from stadapter import labels as labels_file

from . import frames as fio
from .transforms import AugmentConfig, augment_frames, normalise, train_indices

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class DataError(ValueError):
    """A list, labels file or folder layout is malformed."""


class BrokenVideoError(RuntimeError):
    """A clip could not be decoded; the message names the file (use --skip-broken to skip and count)."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def read_labels(path: str | Path) -> list[str]:
    """Class names in index order, read by :func:`stadapter.labels.read_labels` (the converter's reader):
    a blank line inside the file is refused with its number rather than skipped (that shifted every later class)."""
    try:
        return list(labels_file.read_labels(path))
    except labels_file.LabelsError as e:
        raise DataError(str(e)) from e


def read_list(path: str | Path, root: str | Path, num_classes: int) -> list[Sample]:
    """Parse ``<relative/path> <label-int>`` lines; errors name the file and line."""
    path, root = Path(path), Path(root)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read list file {path}: {e}") from e
    samples = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rstrip().rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected '<relative/path> <label-int>', got {line!r}")
        rel, lab = parts
        try:
            label = int(lab)
        except ValueError:
            raise DataError(f"{path}:{n}: label {lab!r} is not an integer") from None
        if not 0 <= label < num_classes:
            raise DataError(f"{path}:{n}: label {label} is outside 0..{num_classes - 1} (labels file has {num_classes})")
        samples.append(Sample(root / rel, label))
    if not samples:
        raise DataError(f"list file {path} holds no clips")
    return samples


def scan_class_folders(root: str | Path, labels: Optional[Sequence[str]] = None) -> tuple[list[Sample], list[str]]:
    """``root/<class>/<clip>`` -> samples; classes sorted by name unless ``labels`` fixes the order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    names = list(labels) if labels is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"{root}: folders {unknown[:5]} are not in the labels file")
    samples = [
        Sample(f, i)
        for i, name in enumerate(names)
        if (root / name).is_dir()
        for f in sorted((root / name).iterdir())
        if f.suffix.lower() in VIDEO_EXTENSIONS
    ]
    if not samples:
        raise DataError(f"{root}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in class subfolders")
    return samples, names


class VideoDataset(Dataset):
    """Clips with integer labels.

    ``train=True``: one augmented view ``[T, 3, S, S]``; ``train=False``: the task's test views
    ``[V, T, 3, S, S]`` exactly as served. Items are ``(frames, label, broken)``; ``broken`` names a clip
    that ``skip_broken`` replaced (training: by the next readable clip; evaluation: by zeros with
    label -1 that the evaluator leaves out), else "".

    Args:
        cache: keep decoded clips in memory after the first read (small data sets; with DataLoader
            workers, call :meth:`preload` before the loader forks so the workers share it).
        seed: per-item augmentation streams derive from (seed, epoch, index): runs are reproducible
            and a resumed run sees the same augmentations.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        sampling: SamplingConfig,
        train: bool,
        aug: AugmentConfig = AugmentConfig(),
        skip_broken: bool = False,
        cache: bool = False,
        seed: int = 0,
    ):
        self.samples = list(samples)
        self.sampling = sampling
        self.train = train
        self.aug = aug
        self.skip_broken = skip_broken
        self.cache: Optional[dict[int, object]] = {} if cache else None
        self.seed = seed
        self.epoch = 0
        self.broken: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def preload(self) -> int:
        """Decode every clip into the cache now; returns how many were broken (and skipped)."""
        if self.cache is None:
            raise RuntimeError("preload() needs cache=True")
        for i in range(len(self)):
            try:
                self._load(i)
            except BrokenVideoError:
                if not self.skip_broken:
                    raise
        return len(self.broken)

    def _load(self, i: int):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        s = self.samples[i]
        if str(s.path) in self.broken:
            raise BrokenVideoError(f"{s.path}: known broken")
        try:
            if self.train:
                data = torch.from_numpy(fio.read_all(s.path, self.sampling.autorotate)) if self.cache is not None else None
            else:
                data = fio.eval_views(s.path, self.sampling)  # [V, T, 3, S, S]
        except (fio.VideoError, OSError) as e:
            self.broken.add(str(s.path))
            raise BrokenVideoError(f"cannot decode {s.path}: {e}") from e
        if self.cache is not None and data is not None:
            self.cache[i] = data
        return data

    def _train_item(self, i: int, rng: random.Random) -> Tensor:
        s = self.samples[i]
        data = self._load(i)
        if data is None:  # no cache: decode only the sampled frames
            try:
                frames = torch.from_numpy(fio.read_sampled(s.path, lambda n: train_indices(n, self.sampling, rng),
                                                            self.sampling.autorotate))
            except (fio.VideoError, OSError) as e:
                self.broken.add(str(s.path))
                raise BrokenVideoError(f"cannot decode {s.path}: {e}") from e
        else:
            frames = data[train_indices(data.shape[0], self.sampling, rng)]
        x = frames.permute(0, 3, 1, 2).float().div_(255)  # [T, 3, H, W]
        return normalise(augment_frames(x, self.sampling.input_size, self.aug, rng), self.sampling)

    def __getitem__(self, i: int):
        """-> (frames, label, broken) where ``broken`` names the clip(s) skipped for this item ("" if none)."""
        if not self.train:
            try:
                return self._load(i), self.samples[i].label, ""
            except BrokenVideoError:
                if not self.skip_broken:
                    raise
                S, T, V = self.sampling.input_size, self.sampling.num_frames, self.sampling.num_views
                return torch.zeros(V, T, 3, S, S), -1, str(self.samples[i].path)
        bad: list[str] = []
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            rng = random.Random(hash((self.seed, self.epoch, j)))
            try:
                return self._train_item(j, rng), self.samples[j].label, ", ".join(bad)
            except BrokenVideoError:
                if not self.skip_broken:
                    raise
                bad.append(str(self.samples[j].path))
        raise BrokenVideoError(f"every clip of the data set failed to decode ({len(self.broken)} broken)")
