"""The trainer's only door to video decoding: :mod:`stadapter.video` underneath.

Training needs (a) how many frames a clip has, (b) some of its frames as uint8
RGB, and (c) the task's test views exactly as the server builds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch import Tensor

from stadapter import SamplingConfig
from stadapter import video as sv

VideoError = sv.VideoError


def read_frames(path: Path, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3]; seeks to the needed frames only (strict: every index must decode)."""
    return sv.decode_frames(path, list(indices))


def read_sampled(path: Path, pick: Callable[[int], Sequence[int]], autorotate: bool = True) -> np.ndarray:
    """uint8 frames at ``pick(num_frames)``; a clip that ends before its header says is re-sampled
    against the frames it really holds, exactly as the server does (so it is not dropped as broken)."""
    return sv.decode_sampled_frames(path, pick, autorotate=autorotate)


def read_all(path: Path, autorotate: bool = True) -> np.ndarray:
    """Every frame that decodes, uint8 [N, H, W, 3] (the in-memory cache of small data sets)."""
    return read_sampled(path, range, autorotate)


def eval_views(path: Path, sampling: SamplingConfig) -> Tensor:
    """[V, T, 3, S, S] normalised test views, exactly as the server decodes them (``sampling.seek`` included:
    a task set to the fast ``keyframe`` mode is validated on the frames it will be served)."""
    return sv.decode_clip(path, sampling)
