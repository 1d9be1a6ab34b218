"""Windows over a long clip: decoded once, front to back, each window sampled as :func:`decode_clip` samples a clip.

Window k covers the frames ``[s_k, s_k + L)``: ``L = round(window_s * fps)`` frames and
``s_k = round(k * stride_s * fps)`` (fps: the stream's average rate from the header; the
times reported are ``s_k / fps`` and ``(s_k + L) / fps``). Inside a window the task's
sampling picks its frames exactly as it would in a clip of ``L`` frames
(``sampling.view_indices``, shifted by ``s_k``; the fast ``seek="keyframe"`` mode does not
apply: no frame is sought), and the frames are converted (display rotation,
sample aspect ratio, resize) by the same :class:`FrameConverter` as :func:`decode_clip`, so
a window's tensor equals :func:`decode_views` of its indices.

* Windows are whole: the last one is the last that fits inside the clip; the frames after
  it (less than one stride) are in no window. A window is given out once its last frame has
  decoded, so a stream that ends early (a cut download) simply has fewer windows.
* A clip shorter than one window is refused (:class:`VideoError` naming both lengths): it
  has no whole window, and ``Classify`` answers for a clip of any length.
* The stream is read once, front to back (``Clip.frames``; a later part of a video split between
  decoders, :class:`WindowPart`, starts after one seek), its packets placed on the
  frame grid as the one-clip reader places them; the packets after the last taken frame are held
  back and dropped undecoded when a keyframe comes before the next taken frame (a GOP's tail that no
  window samples), and the decoder drops the non-reference frames (B-frames of h264, hevc,
  mpeg2 ...) that no window takes (``window_walk.WindowWalk``); a stream off the grid (variable frame
  rate) is read again from the start, counting every frame, the windows already given out not
  repeated. A frame is kept only while a window that is open (started, not yet given out)
  needs it, so memory is bounded by
  the windows in flight, ``ceil(L / stride) * frames per window``, not by the clip's length
  (``WindowLimits.max_held_frames`` bounds it before decoding starts).
* A long video is not one clip: :class:`WindowLimits` replaces the per-clip bounds on
  duration, frames and pixels decoded, packets and decode time (:meth:`WindowLimits.video_limits`);
  the others (bytes, frame size, streams, formats, aspect ratio) stay. The decode-time budget
  counts decoding only, not the time the consumer holds a window.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from ..config import SamplingConfig
from .container import Clip, guard
from .limits import Budget, Source, VideoError, VideoLimits
from .preprocess import FrameConverter, views_to_array, views_to_tensor, views_to_uint8
from .sampling import unique_indices, view_indices


@dataclass(frozen=True)
class WindowLimits:
    """Bounds on one windowed decode (they replace the per-clip ones that a long video would break).

    Args:
        max_duration_s: longest video, from its header.
        max_windows: windows one video may have (checked on the header's frame count, then while decoding).
        max_frames_decoded: frames the decoder may output for the whole video (packets: twice this).
        max_decoded_pixels: pixels of all those frames (an hour of 1080p at 30 fps is 2.2e11).
        max_decode_seconds: wall clock spent decoding (not waiting for the consumer).
        max_held_frames: frames kept at once for the open windows (overlap depth x frames per window).
    """

    max_duration_s: float = 4 * 3600.0
    max_windows: int = 20_000
    max_frames_decoded: int = 2_000_000
    max_decoded_pixels: int = 2**40
    max_decode_seconds: float = 1800.0
    max_held_frames: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_windows", "max_frames_decoded", "max_decoded_pixels", "max_held_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"WindowLimits.{name} must be a positive int, got {v!r}")
        for name in ("max_duration_s", "max_decode_seconds"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"WindowLimits.{name} must be a positive number, got {v!r}")

    def video_limits(self, per_clip: VideoLimits) -> VideoLimits:
        """``per_clip`` with this record's bounds in place of those a long video would break."""
        return dataclasses.replace(per_clip, max_duration_s=self.max_duration_s,
                                   max_frames_decoded=self.max_frames_decoded, max_packets=2 * self.max_frames_decoded,
                                   max_decoded_pixels=self.max_decoded_pixels, max_decode_seconds=self.max_decode_seconds)


class WindowError(VideoError):
    """Window arguments that cannot work (for this clip): the message names the value and the bound."""


def check_window_args(window_s: float, stride_s: float, limits: WindowLimits = WindowLimits()) -> None:
    """Window length and stride in seconds, before any clip is opened: finite, > 0, stride <= window (the
    timeline has no gaps), window within the longest video. :class:`WindowError` names the bad value."""
    for name, v in (("window_s", window_s), ("stride_s", stride_s)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise WindowError(f"{name} must be a positive number of seconds, got {v!r}")
    if stride_s > window_s:
        raise WindowError(f"stride_s={stride_s:g} is longer than window_s={window_s:g}: the video between windows "
                         "would be classified by none; use a stride up to the window length")
    if window_s > limits.max_duration_s:
        raise WindowError(f"window_s={window_s:g} is longer than the longest video of {limits.max_duration_s:g} s "
                         "(max_duration_s)")


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of a stream at ``fps`` lie, and which frames each takes (pure arithmetic)."""

    fps: float
    stride_s: float
    length: int  # frames per window (L)
    offsets: tuple[tuple[int, ...], ...]  # per temporal view: the sampled frames, relative to the window start

    def start(self, k: int) -> int:
        return int(math.floor(k * self.stride_s * self.fps + 0.5))

    def end(self, k: int) -> int:
        return self.start(k) + self.length

    def indices(self, k: int) -> list[list[int]]:
        s = self.start(k)
        return [[s + i for i in view] for view in self.offsets]

    def count(self, num_frames: int) -> int:
        """Whole windows in a stream of ``num_frames`` frames."""
        if num_frames < self.length:
            return 0
        k = int((num_frames - self.length) / (self.stride_s * self.fps)) + 2
        while k > 0 and self.end(k - 1) > num_frames:
            k -= 1
        return k


def plan_windows(cfg: SamplingConfig, fps: float, window_s: float, stride_s: float,
                 limits: WindowLimits = WindowLimits()) -> WindowPlan:
    """The plan for a stream at ``fps``; :class:`WindowError` if the windows are too short for the sampling, the stride
    is under one frame, or holding the open windows' frames would pass ``limits.max_held_frames``."""
    check_window_args(window_s, stride_s, limits)
    if not fps > 0:
        raise VideoError("the clip's frame rate is unknown: windows in seconds cannot be placed")
    length = max(1, int(math.floor(window_s * fps + 0.5)))
    step = stride_s * fps
    if step < 1:
        raise WindowError(f"stride_s={stride_s:g} is shorter than one frame at {fps:g} fps")
    needs = cfg.num_frames if cfg.mode == "uniform" else (cfg.num_frames - 1) * cfg.stride + 1
    if length < needs:
        raise WindowError(f"a window of {window_s:g} s is {length} frames at {fps:g} fps, shorter than the "
                         f"{needs} frames the task's sampling takes ({cfg.mode}, {cfg.num_frames} frames"
                         f"{f' stride {cfg.stride}' if cfg.mode == 'stride' else ''}); use a longer window")
    offsets = tuple(tuple(v) for v in view_indices(length, cfg.replace(seek="exact")))
    depth = math.ceil(length / math.floor(step))
    held = min(length, depth * len(unique_indices([list(v) for v in offsets])))
    if held > limits.max_held_frames:
        raise WindowError(f"windows of {window_s:g} s every {stride_s:g} s overlap {depth} deep: their frames need "
                         f"{held} frames held at once, over the limit of {limits.max_held_frames} (max_held_frames); "
                         "use a longer stride")
    return WindowPlan(fps, float(stride_s), length, offsets)


MIN_PART_WINDOWS = 8  # fewer windows per part and the seek and the first keyframe cost more than they save


@dataclass(frozen=True)
class WindowPart:
    """Part ``index`` of ``of``: one decoder's share of a video's windows when several decode it at once.

    Every part opens the clip and computes the same split from the header's frame count: equal runs of
    windows, at least :data:`MIN_PART_WINDOWS` each (so a short video has fewer parts; a part past them
    has no window). The last part goes on to the end of the stream, whatever the header said.
    """

    index: int = 0
    of: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.of, int) and isinstance(self.index, int) and 0 <= self.index < self.of):
            raise ValueError(f"WindowPart needs 0 <= index < of, got index={self.index!r} of={self.of!r}")

    def share(self, expected: int) -> Optional[tuple[int, Optional[int]]]:
        """(first window, end window or None for "to the end of the stream") of ``expected``; None: no share."""
        parts = max(1, min(self.of, expected // MIN_PART_WINDOWS))
        if self.index >= parts:
            return None
        last = self.index == parts - 1
        return expected * self.index // parts, None if last else expected * (self.index + 1) // parts


@dataclass(frozen=True)
class Window:
    index: int  # k, from 0
    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float
    indices: tuple[tuple[int, ...], ...]  # the frames taken, per temporal view
    frames: Any  # float32 [V, T, 3, S, S] as decode_clip gives for a clip: a torch.Tensor (np.ndarray with as_array;
    # uint8 numpy, not normalised, with normalised=False)


@dataclass
class DecodeStats:
    """What one windowed decode did, updated as it goes."""

    packets: int = 0
    frames: int = 0  # frames the decoder output
    pixels: int = 0  # pixels of those frames
    windows: int = 0
    decode_s: float = 0.0  # time spent decoding, converting and sampling (not waiting for the consumer)
    held_max: int = 0  # most frames kept at once

    def count(self, budget: Budget) -> None:
        """Take the decode's counts from its budget."""
        self.packets, self.frames, self.pixels = budget.packets, budget.frames, budget.pixels

    @property
    def counts(self) -> tuple[int, int, int]:
        """What the decode has read so far, as the limits count it: (packets, frames, pixels)."""
        return self.packets, self.frames, self.pixels


def decode_windows(source: Source, cfg: SamplingConfig, window_s: float, stride_s: float,
                   limits: VideoLimits = VideoLimits(), window_limits: WindowLimits = WindowLimits(),
                   stats: Optional[DecodeStats] = None, part: WindowPart = WindowPart(),
                   as_array: bool = False, normalised: bool = True) -> Iterator[Window]:
    """Every whole window of the clip, in time order, as soon as its last frame has decoded (see the module
    docstring); with ``part``, only that part's windows (the first found by one seek); ``as_array``: frames as
    numpy, without importing torch; ``normalised=False``: frames as uint8 numpy, not normalised (the server's
    decoders: see :func:`decode_clip_array`). Raises :class:`VideoError`
    for a bad clip, one over the limits or shorter than a window; :class:`WindowError` (a VideoError) for window
    arguments that cannot work, before decoding."""
    check_window_args(window_s, stride_s, window_limits)
    stats = stats if stats is not None else DecodeStats()
    vlimits = window_limits.video_limits(limits)
    t0 = time.perf_counter()
    with guard("decode"), Clip(source, vlimits) as clip:
        plan = plan_windows(cfg, clip.info.fps, window_s, stride_s, window_limits)
        check_frames(cfg, vlimits)
        expected = plan.count(clip.info.num_frames)
        if expected > window_limits.max_windows:
            raise VideoError(f"the clip has {expected} windows of {window_s:g} s every {stride_s:g} s, over the limit "
                             f"of {window_limits.max_windows} (max_windows); use a longer stride")
        share = part.share(expected)
        if share is None:
            return
        k, end = share  # the next window to give out; the part's end
        convert = FrameConverter.for_clip(clip, cfg.short_side, autorotate=cfg.autorotate)
        to_frames = views_to_uint8 if not normalised else views_to_array if as_array else views_to_tensor
        takes = PlanTakes(plan, k, end)
        held: dict[int, np.ndarray] = {}
        settled = 0  # frames known to be in the stream
        for held, settled in clip.frames(takes, convert, plan.start(k)):
            stats.held_max = max(stats.held_max, len(held))
            while settled >= plan.end(k) and k != end:
                if k >= window_limits.max_windows:
                    raise VideoError(f"the clip has more than {window_limits.max_windows} windows (max_windows; its "
                                     f"header said {expected}); use a longer stride")
                idx = plan.indices(k)
                window = Window(k, plan.start(k), plan.end(k), plan.start(k) / plan.fps, plan.end(k) / plan.fps,
                                tuple(tuple(v) for v in idx), to_frames(idx, held, cfg))
                k += 1
                takes.forget_before(plan.start(k), held)
                stats.windows += 1
                stats.count(clip.budget)
                stats.decode_s += time.perf_counter() - t0
                paused = time.monotonic()
                yield window
                clip.budget.deadline += time.monotonic() - paused  # the budget counts decoding only
                t0 = time.perf_counter()
            if k == end:
                break  # the next part's windows are another decoder's
        stats.decode_s += time.perf_counter() - t0
        stats.count(clip.budget)
        if stats.windows == 0 and share[0] == 0:
            n = settled
            raise VideoError(f"the clip holds {n} frame(s) ({n / plan.fps:.2f} s at {plan.fps:g} fps), shorter than "
                             f"one window of {window_s:g} s ({plan.length} frames); use a shorter window, or "
                             "classify the clip whole")


class PlanTakes:
    """Whether a frame is taken by a window not yet given out: the frames of the windows opened so far (a window
    opens when a frame at or past its start is asked about), less those before the next window to give out."""

    def __init__(self, plan: WindowPlan, first: int = 0, end: Optional[int] = None) -> None:
        self.plan, self.opened, self.frames = plan, first, set[int]()
        self.next_start = plan.start(first)
        self.end = end  # no window from here on opens (another decoder's part)

    def __contains__(self, i: object) -> bool:
        assert isinstance(i, int)
        while self.next_start <= i and self.opened != self.end:
            self._open()
        return i in self.frames

    def first_from(self, i: int) -> Optional[int]:
        """The first frame at or after ``i`` that a window takes (opening the windows that start before it)."""
        while True:
            first = min((j for j in self.frames if j >= i), default=None)
            if self.opened == self.end or (first is not None and first < self.next_start):
                return first
            self._open()

    def _open(self) -> None:
        self.frames.update(unique_indices(self.plan.indices(self.opened)))
        self.opened += 1
        self.next_start = self.plan.start(self.opened)

    def forget_before(self, start: int, held: dict[int, np.ndarray]) -> None:
        """The windows before the one starting at ``start`` are out: their frames are taken no more."""
        for j in [j for j in self.frames if j < start]:
            self.frames.discard(j)
        for j in [j for j in held if j < start]:
            del held[j]


def check_frames(cfg: SamplingConfig, limits: VideoLimits) -> None:
    wanted = cfg.num_views * cfg.num_frames
    if wanted > limits.max_output_frames:
        raise VideoError(f"the sampling asks for {cfg.num_views} view(s) x {cfg.num_frames} frames = {wanted} frames "
                         f"per window, over the limit of {limits.max_output_frames}")
