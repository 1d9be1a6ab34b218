"""The trainer's only door to video decoding (stadapter.video underneath).

Training needs (a) how many frames a clip has, (b) some of its frames as uint8
RGB, and (c) the task's test views exactly as the server builds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from stadapter import SamplingConfig

try:
    from stadapter import video as sv
except ImportError:  # TEMPORARY until stadapter.video lands (being written in parallel)
    sv = None

if sv is not None:
    VideoError = sv.VideoError
else:
    import av
    import torch
    import torch.nn.functional as F

    class VideoError(ValueError):
        pass

    def _all(path):
        try:
            with av.open(str(path)) as c:
                out = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        except (av.FFmpegError, ValueError) as e:
            raise VideoError(f"{path}: {e}") from e
        return out

    class _SV:
        VideoError = VideoError

        @staticmethod
        def probe(path):
            class P:
                num_frames = len(_all(path))
            return P

        @staticmethod
        def decode_frames(path, idx):
            return _all(path)[idx]

        @staticmethod
        def decode_clip(path, s):
            a = _all(path)
            n, T = len(a), s.num_frames
            idx = [min(int(n / T * (i + 0.5)), n - 1) for i in range(T)]
            x = torch.from_numpy(a[idx]).permute(0, 3, 1, 2).float() / 255
            H, W = x.shape[-2:]
            sc = s.short_side / min(H, W)
            x = F.interpolate(x, size=(round(H * sc), round(W * sc)), mode="bilinear", antialias=True)
            y0, x0 = (x.shape[-2] - s.input_size) // 2, (x.shape[-1] - s.input_size) // 2
            x = x[..., y0 : y0 + s.input_size, x0 : x0 + s.input_size]
            m, d = torch.tensor(s.mean).view(1, 3, 1, 1), torch.tensor(s.std).view(1, 3, 1, 1)
            return ((x - m) / d).unsqueeze(0)

    sv = _SV


def count_frames(path: Path) -> int:
    return int(sv.probe(path).num_frames)


def read_frames(path: Path, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3]."""
    return np.asarray(sv.decode_frames(path, list(indices)))


def read_all(path: Path) -> np.ndarray:
    return read_frames(path, range(count_frames(path)))


def test_views(path: Path, sampling: SamplingConfig) -> Tensor:
    """[V, T, 3, S, S] normalised, as served."""
    return sv.decode_clip(path, sampling)
