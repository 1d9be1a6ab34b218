"""Frames to model input: RGB conversion with resize (swscale bicubic), crops, normalisation."""

from __future__ import annotations

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from ..config import SamplingConfig
from .limits import VideoLimits, check_aspect
from .sampling import unique_indices


class FrameConverter:
    """Frames to RGB uint8 arrays through one swscale context per clip, single-threaded.

    ``frame.reformat`` builds a new scaler per frame, and recent PyAV gives it a
    thread pool by default: milliseconds per frame, more than decoding a small one.
    """

    def __init__(self, limits: VideoLimits, short_side: int = 0) -> None:
        self.short, self.limits = short_side, limits
        self.scaler = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        w, h = frame.width, frame.height
        check_aspect(w, h, self.limits)
        kwargs: dict = dict(format="rgb24")
        if self.short and (w, h) != self._resized(w, h):
            w, h = self._resized(w, h)
            kwargs.update(width=w, height=h, interpolation="BICUBIC")
        try:
            out = self.scaler.reformat(frame, threads=1, **kwargs)
        except TypeError:  # PyAV < 16 has no threads argument (and scales single-threaded)
            out = self.scaler.reformat(frame, **kwargs)
        return out.to_ndarray()

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        s = self.short
        return (s, max(s, round(h * s / w))) if w <= h else (max(s, round(w * s / h)), s)


def crop_offsets(height: int, width: int, size: int, spatial_views: int) -> list[tuple[int, int]]:
    """(top, left) of the S x S crops: the centre, or start/centre/end along the long side."""
    cy, cx = (height - size) // 2, (width - size) // 2
    if spatial_views == 1:
        return [(cy, cx)]
    if width >= height:
        return [(cy, 0), (cy, cx), (cy, width - size)]
    return [(0, cx), (cy, cx), (height - size, cx)]


def views_to_tensor(views: list[list[int]], got: dict[int, np.ndarray], cfg: SamplingConfig) -> torch.Tensor:
    """Crop, normalise (a 256-entry table per channel: one gather, no float math per pixel), stack."""
    S, C = cfg.input_size, cfg.spatial_views
    levels = np.arange(256, dtype=np.float32) / 255.0
    tables = [(levels - np.float32(m)) / np.float32(s) for m, s in zip(cfg.mean, cfg.std)]
    out = np.empty((len(views) * C, cfg.num_frames, 3, S, S), np.float32)
    for i in unique_indices(views):
        img = got[i]
        slots = [(v, t) for v, idx in enumerate(views) for t, j in enumerate(idx) if j == i]
        for c, (y, x) in enumerate(crop_offsets(img.shape[0], img.shape[1], S, C)):
            crop = img[y : y + S, x : x + S]
            v0, t0 = slots[0]
            dst = out[v0 * C + c, t0]
            for ch in range(3):
                np.take(tables[ch], crop[..., ch], out=dst[ch])
            for v, t in slots[1:]:
                out[v * C + c, t] = dst
    return torch.from_numpy(out)
