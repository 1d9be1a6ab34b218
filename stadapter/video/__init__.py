"""Decode only the sampled frames of a clip with PyAV; resize, crop, normalise; refuse bad input.

How frames are found without decoding the whole clip
-----------------------------------------------------
A frame's index is what a naive reader would count: the i-th frame the decoder
outputs. For a constant-frame-rate stream that is also ``(pts - pts0) * time_base
* fps`` where ``pts0`` is the first frame's pts, so every *packet* can be placed
without decoding it. The reader demuxes packets (cheap: no decoding) and holds
back those of the current GOP; the GOP is decoded only when it turns out to
hold the next needed frame (a packet at or past it arrives before the next
keyframe). GOPs holding no needed frame are dropped undecoded; inside a decoded
GOP, frames that are neither needed nor referenced by others are dropped by the
decoder (``skip_frame=NONREF`` per packet, for h264/hevc/mpeg-2/mpeg-4 whose
decoders define reference frames exactly); the decoder stops as soon as the last
needed frame is out; and a needed frame more than ``seek_gap`` frames ahead
(default 5 s) is reached with a backward ``container.seek`` to the keyframe
before it instead of demuxing there.

The result equals "decode every frame, then index": every decoded run is checked
to be gap-free on the frame grid, and every grid slot up to the last needed frame
must have had its packet (slots jumped over by a seek are taken on trust: seeks
only happen for gaps of seconds). When a stream breaks these assumptions
(variable frame rate, missing timestamps, dropped frames) the reader starts over
and decodes sequentially, counting frames. A seek that lands past its target
(imprecise index, e.g. MPEG-TS) makes it start over without seeking.

Truncated clips
---------------
:func:`decode_frames` is strict: a requested frame that does not decode raises
:class:`VideoError` naming how many frames decoded. :func:`decode_clip` samples
against the frame count in the header; if the stream ends early (cut download,
or a duration-based estimate that was high) it re-samples once against the
number of frames the stream actually holds, which the first pass learnt while
reaching the end, and reuses the frames already decoded. It raises when even
that misses frames (a corrupt frame in the middle).

The fast sampling mode
----------------------
With ``SamplingConfig.seek == "keyframe"`` :func:`decode_clip` first reads the keyframe positions
from the demuxer (``Clip.keyframes``: one demux pass, no decoding, then a checked rewind), moves
each sample to the cheapest frame of its segment (``sampling.keyframe_indices``, where the
segments are defined) and reads those with the same exact reader, so the result is exact decoding
of the moved indices (:func:`sample_plan` names them, :func:`decode_views` decodes given ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..config import SamplingConfig
from .container import Clip, ClipInfo, guard
from .limits import DEFAULT_FORMATS, Source, VideoError, VideoLimits, VideoOutOfMemory
from .preprocess import (
    FrameConverter,
    as_tensor,
    crop_offsets,
    level_tables,
    normalise_array,
    normalise_views,
    views_to_array,
    views_to_tensor,
    views_to_uint8,
)
from .readers import ReadResult
from .sampling import keyframe_indices, missing_indices, sample_indices, unique_indices, view_indices
from .windows import DecodeStats, Window, WindowError, WindowLimits, WindowPart, WindowPlan, check_window_args, decode_windows, plan_windows

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_FORMATS", "ClipInfo", "FrameConverter", "Source", "VideoError", "VideoLimits", "VideoOutOfMemory",
    "crop_offsets", "decode_clip", "decode_frames", "decode_sampled_frames", "decode_views", "keyframe_indices",
    "keyframes", "probe", "sample_indices", "sample_plan", "views_to_array", "views_to_tensor", "decode_clip_array", "as_tensor",
    "views_to_uint8", "level_tables", "normalise_array", "normalise_views",
    "DecodeStats", "Window", "WindowError", "WindowLimits", "WindowPart", "WindowPlan", "check_window_args",
    "decode_windows", "plan_windows",
]


def probe(source: Source, limits: VideoLimits = VideoLimits()) -> ClipInfo:
    """Read the header of a clip (no decoding) and check it against ``limits``."""
    with guard("probe"), Clip(source, limits) as clip:
        return clip.info


def decode_clip(source: Source, cfg: SamplingConfig, limits: VideoLimits = VideoLimits()) -> torch.Tensor:
    """Model input for one clip: float32 [V, T, 3, S, S], V = temporal_views * spatial_views (see
    :func:`decode_clip_array`)."""
    return as_tensor(decode_clip_array(source, cfg, limits))


def decode_clip_array(source: Source, cfg: SamplingConfig, limits: VideoLimits = VideoLimits(),
                      normalised: bool = True) -> np.ndarray:
    """Model input for one clip, as numpy: float32 [V, T, 3, S, S], V = temporal_views * spatial_views.

    Views are ordered temporal-major (for each temporal view, each spatial crop).
    Each frame is resized (bicubic) so its short side is ``cfg.short_side``, then
    cropped to S x S: the centre, or start/centre/end along the long side; RGB in
    [0, 1] is normalised with ``cfg.mean`` / ``cfg.std``. See the module docstring
    for how a clip that ends early is handled.

    ``normalised=False``: the crops as uint8 [V, T, 3, S, S], a quarter of the bytes (the server's decoders
    hand these over; :func:`normalise_views` makes them, on the model's device, exactly the float32 input).
    """
    _check_output(cfg, limits)
    with guard("decode"), Clip(source, limits) as clip:
        convert = FrameConverter.for_clip(clip, cfg.short_side, autorotate=cfg.autorotate)
        keys = clip.keyframes() if cfg.seek == "keyframe" else None
        views, got = _read_sampled(clip, lambda n: view_indices(n, cfg, keys), convert)
    return views_to_array(views, got, cfg) if normalised else views_to_uint8(views, got, cfg)


def decode_views(source: Source, views: Sequence[Sequence[int]], cfg: SamplingConfig,
                 limits: VideoLimits = VideoLimits()) -> torch.Tensor:
    """Model input for frames chosen by the caller: ``views[v]`` holds temporal view v's ``cfg.num_frames``
    indices; preprocessed exactly as :func:`decode_clip` does (``cfg``'s size, crops, normalisation and
    autorotate; its ``mode`` and ``seek`` are not used). Strict: every index must decode."""
    idx = [[int(i) for i in v] for v in views]
    if len(idx) != cfg.temporal_views or any(len(v) != cfg.num_frames for v in idx):
        raise ValueError(f"views must be {cfg.temporal_views} list(s) of {cfg.num_frames} indices, "
                         f"got {[len(v) for v in idx]}")
    if any(i < 0 for v in idx for i in v):
        raise ValueError("frame indices must be >= 0")
    _check_output(cfg, limits)
    with guard("decode"), Clip(source, limits) as clip:
        convert = FrameConverter.for_clip(clip, cfg.short_side, autorotate=cfg.autorotate)
        got, read = clip.read(unique_indices(idx), convert)
        missing = missing_indices(idx, got)
        if missing:
            raise VideoError(_shortfall(missing, len(unique_indices(idx)), clip.info, read))
    return views_to_tensor(idx, got, cfg)


def sample_plan(source: Source, cfg: SamplingConfig, limits: VideoLimits = VideoLimits()) -> list[list[int]]:
    """The frame indices :func:`decode_clip` reads for each temporal view, from the header's frame count
    (a clip that ends early is re-sampled by ``decode_clip``); in ``seek="keyframe"`` mode, the moved
    ones. Reads packets only, no decoding."""
    with guard("probe"), Clip(source, limits) as clip:
        keys = clip.keyframes() if cfg.seek == "keyframe" else None
        return view_indices(clip.info.num_frames, cfg, keys)


def keyframes(source: Source, limits: VideoLimits = VideoLimits()) -> list[int] | None:
    """Frame indices of the clip's keyframes from the demuxer's packet flags (no decoding); None when
    packets carry no timestamps to place them."""
    with guard("probe"), Clip(source, limits) as clip:
        return clip.keyframes()


def _check_output(cfg: SamplingConfig, limits: VideoLimits) -> None:
    wanted = cfg.num_views * cfg.num_frames
    if wanted > limits.max_output_frames:
        raise VideoError(f"the sampling asks for {cfg.num_views} view(s) x {cfg.num_frames} frames = {wanted} frames, "
                         f"over the limit of {limits.max_output_frames}")


def decode_sampled_frames(source: Source, pick: Callable[[int], Sequence[int]],
                          limits: VideoLimits = VideoLimits(), autorotate: bool = True) -> np.ndarray:
    """Raw RGB frames at ``pick(num_frames)``: uint8 [N, H, W, 3], with decode_clip's handling of short clips.

    ``pick`` maps a frame count to the indices to read. It is called with the header's count and, when
    the stream ends early (a cut download), once more with the count of frames that really decoded,
    exactly as :func:`decode_clip` re-samples: training reads its random frames through this, so a clip
    the server classifies is never dropped as broken by the trainer.
    """
    with guard("decode"), Clip(source, limits) as clip:
        convert = FrameConverter.for_clip(clip, autorotate=autorotate)  # displayed as decode_clip shows it
        (idx,), got = _read_sampled(clip, lambda n: [[int(i) for i in pick(n)]], convert)
        return _stack([got[i] for i in idx])


def _read_sampled(clip: Clip, pick: Callable[[int], list[list[int]]],
                  convert: FrameConverter) -> tuple[list[list[int]], dict[int, np.ndarray]]:
    """Read the frames of ``pick(n)`` for the header's n; re-sample once against the frames that really
    decoded if the stream ends early (see the module docstring)."""
    n = clip.info.num_frames
    views = pick(n)
    if any(i < 0 or i >= n for v in views for i in v):
        raise ValueError(f"frame indices must be in [0, {n}) for a clip of {n} frames")
    got, read = clip.read(unique_indices(views), convert)
    if missing_indices(views, got) and read.eof and 0 <= read.last_output < n - 1:
        n = read.last_output + 1  # frames that really decoded, not packets taken on trust
        views = pick(n)
        todo = missing_indices(views, got)
        if todo:
            more, read = clip.read(todo, convert, restart=True)
            got.update(more)
    missing = missing_indices(views, got)
    if missing:
        raise VideoError(_shortfall(missing, len(unique_indices(views)), clip.info, read))
    return views, got


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoError(f"frame size changes inside the clip ({sorted(shapes)[:3]}); cannot stack the frames")
    return np.stack(frames)


def decode_frames(source: Source, indices: Sequence[int], limits: VideoLimits = VideoLimits(),
                  autorotate: bool = True) -> np.ndarray:
    """Raw RGB frames at ``indices`` (any order, repeats allowed): uint8 [N, H, W, 3].

    Strict: raises :class:`VideoError` if any requested frame does not decode. With ``autorotate``
    (default) frames are as a viewer sees them: display matrix and sample aspect ratio applied.
    """
    idx = [int(i) for i in indices]
    if any(i < 0 for i in idx):
        raise ValueError(f"frame indices must be >= 0, got {min(idx)}")
    with guard("decode"), Clip(source, limits) as clip:
        if not idx:
            return np.zeros((0, clip.info.height, clip.info.width, 3), np.uint8)
        got, read = clip.read(sorted(set(idx)), FrameConverter.for_clip(clip, autorotate=autorotate))
        missing = sorted(set(idx) - set(got))
        if missing:
            raise VideoError(_shortfall(missing, len(set(idx)), clip.info, read))
        return _stack([got[i] for i in idx])


def _shortfall(missing: list[int], wanted: int, info: ClipInfo, read: ReadResult) -> str:
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    if read.last_index < 0:
        return f"no decodable video frames (the header says {info.num_frames} frames of {info.codec})"
    return (f"decoded {wanted - len(missing)} of {wanted} needed frames: frame(s) {shown} did not decode "
            f"(the header says {info.num_frames} frames; the stream ends after frame {read.last_index})")
