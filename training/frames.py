"""The trainer's only door to video decoding: :mod:`stadapter.video` underneath.

Training needs (a) how many frames a clip has, (b) some of its frames as uint8
RGB, and (c) the task's test views exactly as the server builds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from stadapter import SamplingConfig
from stadapter import video as sv

VideoError = sv.VideoError


def count_frames(path: Path) -> int:
    return int(sv.probe(path).num_frames)


def read_frames(path: Path, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3]; seeks to the needed frames only."""
    return sv.decode_frames(path, list(indices))


def read_all(path: Path) -> np.ndarray:
    """Every frame, uint8 [N, H, W, 3] (the in-memory cache of small data sets)."""
    return read_frames(path, range(count_frames(path)))


def eval_views(path: Path, sampling: SamplingConfig) -> Tensor:
    """[V, T, 3, S, S] normalised test views, exactly as the server decodes them."""
    return sv.decode_clip(path, sampling)
