"""Frames to model input: display orientation (rotation, flips, sample aspect ratio), RGB conversion
with resize (swscale bicubic), crops, normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Sequence

import av
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from av.video.reformatter import VideoReformatter

from ..config import SamplingConfig
from .limits import VideoLimits, check_aspect
from .sampling import unique_indices

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Orientation:
    """How the coded picture becomes the displayed one: mirror left-right (``flip``), then turn
    ``quarter_turns`` x 90 degrees counter-clockwise (``np.rot90``'s ``k``)."""

    flip: bool = False
    quarter_turns: int = 0

    @property
    def swaps_axes(self) -> bool:
        return self.quarter_turns % 2 == 1

    @property
    def identity(self) -> bool:
        return not self.flip and self.quarter_turns % 4 == 0

    def apply(self, img: np.ndarray) -> np.ndarray:
        """uint8 [H, W, C] coded -> displayed, C-contiguous."""
        if self.identity:
            return img
        if self.flip:
            img = img[:, ::-1]
        return np.ascontiguousarray(np.rot90(img, self.quarter_turns % 4))


IDENTITY = Orientation()


def orientation_from_matrix(matrix) -> Orientation:
    """The display matrix (FFmpeg's AV_FRAME_DATA_DISPLAYMATRIX: 9 int32, row-major
    ``[a b u; c d v; x y w]``, a/b/c/d in 16.16 fixed point; a point (x, y) of the coded
    picture shows at ``x' = a x + c y``, ``y' = b x + d y`` plus translation) as an
    :class:`Orientation`.

    As in libavutil/display.c ``av_display_rotation_get``, the counter-clockwise angle is
    ``-atan2(b, a)``; as in fftools' autorotate, a negative determinant ``a d - b c``
    means a mirrored picture: it is taken as a left-right flip of the coded picture
    followed by the rotation of the matrix with its first column negated (a vertical
    flip is a left-right flip plus 180 degrees). Angles that are not multiples of 90
    degrees are rounded to the nearest multiple (45 degrees rounds up to 90); ffmpeg
    would rotate by the exact angle with a filled border, no player-independent answer
    exists for those, and no camera writes them. A degenerate matrix (a = b = 0) is
    ignored.
    """
    m = [float(v) for v in matrix]
    if len(m) < 9:
        return IDENTITY
    a, b, c, d = m[0], m[1], m[3], m[4]
    flip = a * d - b * c < 0
    if flip:
        a, b = -a, -b
    if a == 0 and b == 0:
        return IDENTITY
    ccw = math.degrees(math.atan2(-b, a))
    return Orientation(flip, int(math.floor(ccw / 90 + 0.5)) % 4)


def frame_orientation(frame: av.VideoFrame) -> Orientation:
    """The frame's DISPLAYMATRIX side data as an :class:`Orientation` (identity when absent).

    PyAV's ``frame.rotation`` is ``av_display_rotation_get`` rounded (counter-clockwise
    degrees; -180 for a pure horizontal flip), so it cannot tell flips apart: the matrix
    itself is parsed here.
    """
    sd = frame.side_data.get(SideDataType.DISPLAYMATRIX)  # type: ignore[call-overload, unused-ignore]  # PyAV < 18.1.1's stub: str keys
    if sd is None:
        return IDENTITY
    raw = bytes(sd)
    if len(raw) < 36:
        return IDENTITY
    return orientation_from_matrix(np.frombuffer(raw[:36], dtype="=i4"))


class FrameConverter:
    """Frames to RGB uint8 arrays, as a viewer sees them, through one swscale context per clip, single-threaded.

    ``frame.reformat`` builds a new scaler per frame, and recent PyAV gives it a
    thread pool by default: milliseconds per frame, more than decoding a small one.

    With ``autorotate`` (the default, like players and ffmpeg), each frame's display
    matrix (rotation by multiples of 90 degrees, flips; see :func:`orientation_from_matrix`)
    and the clip's sample aspect ratio ``sample_aspect`` (anamorphic video: a pixel is
    ``sample_aspect`` times as wide as it is tall) are applied before any resize or crop:
    swscale scales the coded picture, its width stretched by the SAR, to the size whose
    *displayed* short side is ``short_side`` (no resize when 0, except for the SAR), and
    numpy then rotates/flips the uint8 array. The aspect-ratio limit is checked on the
    displayed size. ``autorotate=False`` gives the coded picture as stored (no display
    matrix, no SAR), as before this option existed.
    """

    def __init__(self, limits: VideoLimits, short_side: int = 0, autorotate: bool = True,
                 sample_aspect: Optional[Fraction] = None) -> None:
        self.short, self.limits, self.autorotate = short_side, limits, autorotate
        sar = Fraction(sample_aspect) if sample_aspect else Fraction(1)
        self.sar = sar if sar > 0 and autorotate else Fraction(1)
        self.scaler = VideoReformatter()

    @classmethod
    def for_clip(cls, clip, short_side: int = 0, autorotate: bool = True) -> "FrameConverter":
        """A converter for an open :class:`~stadapter.video.container.Clip`: its limits, and the sample
        aspect ratio of its video stream (the container's, else the bitstream's, as
        ``av_guess_sample_aspect_ratio``; PyAV 18 frames do not expose theirs)."""
        stream = clip.container.streams[clip.stream_index]
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        return cls(clip.limits, short_side, autorotate, sar)

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        w, h = frame.width, frame.height
        turn = frame_orientation(frame) if self.autorotate else IDENTITY
        sw = w * float(self.sar) if self.sar != 1 else w  # displayed width before rotation
        dw, dh = (h, sw) if turn.swaps_axes else (sw, h)
        check_aspect(max(1, round(dw)), max(1, round(dh)), self.limits)
        if self.short:
            tw, th = self._resized(dw, dh)
            target = (th, tw) if turn.swaps_axes else (tw, th)
        else:
            target = (max(1, round(sw)), h)
        kwargs: dict = dict(format="rgb24")
        if target != (w, h):
            kwargs.update(width=target[0], height=target[1], interpolation="BICUBIC")
        try:
            out = self.scaler.reformat(frame, threads=1, **kwargs)
        except TypeError:  # PyAV < 16 has no threads argument (and scales single-threaded)
            out = self.scaler.reformat(frame, **kwargs)
        return turn.apply(out.to_ndarray())

    def _resized(self, w: float, h: float) -> tuple[int, int]:
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


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """``arr`` as a tensor sharing its memory. torch is imported here, not with the package: the decoder
    processes use ``stadapter.video`` without torch, and hand their frames over as numpy."""
    import torch

    return torch.from_numpy(arr)


def views_to_tensor(views: list[list[int]], got: dict[int, np.ndarray], cfg: SamplingConfig) -> torch.Tensor:
    """:func:`views_to_array` as a tensor."""
    return as_tensor(views_to_array(views, got, cfg))


def views_to_array(views: list[list[int]], got: dict[int, np.ndarray], cfg: SamplingConfig) -> np.ndarray:
    """Crop, stack, normalise: float32 [V, T, 3, S, S] (:func:`views_to_uint8`, then :func:`normalise_array`)."""
    return normalise_array(views_to_uint8(views, got, cfg), cfg.mean, cfg.std)


def views_to_uint8(views: list[list[int]], got: dict[int, np.ndarray], cfg: SamplingConfig) -> np.ndarray:
    """Crop and stack, not normalised: uint8 [V, T, 3, S, S], a quarter of the float32 input's bytes (the server's
    decoders hand these over; the model's device normalises them with :func:`normalise_views`)."""
    S, C = cfg.input_size, cfg.spatial_views
    out = np.empty((len(views) * C, cfg.num_frames, 3, S, S), np.uint8)
    for i in unique_indices(views):
        img = got[i]
        slots = [(v, t) for v, idx in enumerate(views) for t, j in enumerate(idx) if j == i]
        for c, (y, x) in enumerate(crop_offsets(img.shape[0], img.shape[1], S, C)):
            crop = img[y : y + S, x : x + S].transpose(2, 0, 1)  # [3, S, S]
            for v, t in slots:
                out[v * C + c, t] = crop
    return out


def level_tables(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [3, 256]: what each 8-bit level of each channel becomes, ``(level / 255 - mean) / std``, every step
    a float32 operation (:func:`normalise_views` does the same steps, in the same order, on a device)."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    return np.stack([(levels - np.float32(m)) / np.float32(s) for m, s in zip(mean, std, strict=True)])


def normalise_array(frames: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [..., 3, H, W] -> float32 normalised, through :func:`level_tables` (one gather per channel, no
    float math per pixel)."""
    tables = level_tables(mean, std)
    out = np.empty(frames.shape, np.float32)
    for ch in range(3):
        np.take(tables[ch], frames[..., ch, :, :], out=out[..., ch, :, :])
    return out


def normalise_views(frames: torch.Tensor, mean: torch.Tensor | Sequence[float],
                    std: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalised, on ``frames``' device: equal, bit for bit, to
    :func:`normalise_array` (the same float32 steps in the same order, ``(x / 255 - mean) / std``, each rounded
    once; the divisor is a tensor, not a Python number, as CUDA multiplies by the reciprocal of a scalar
    divisor). ``mean`` / ``std``: 3 values, or float32 tensors that broadcast against ``frames`` (one per row:
    ``[N, 1, 3, 1, 1]``)."""
    import torch

    if frames.dtype != torch.uint8:
        raise TypeError(f"normalise_views takes uint8 frames, got {frames.dtype}")
    dev = frames.device
    m = _channel_tensor(mean, dev)
    s = _channel_tensor(std, dev)
    out = frames.to(torch.float32)
    out.div_(torch.full((), 255.0, dtype=torch.float32, device=dev))
    return out.sub_(m).div_(s)


def _channel_tensor(v: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
    import torch

    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.float32)
    return torch.tensor([float(x) for x in v], dtype=torch.float32, device=device).view(3, 1, 1)
