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
"""

from __future__ import annotations

import io
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from .config import SamplingConfig

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Demuxers a clip may use. Playlists (hls, concat, image2 sequences...) are left
# out on purpose: they open further files or URLs named inside the clip.
DEFAULT_FORMATS = (
    "mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "asf",
    "ogg", "ivf", "h264", "hevc", "m4v", "gif",
)  # fmt: skip

_NONREF_SKIPPABLE = frozenset({"h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video"})
_FRAME_GRID_TOLERANCE = 0.25
_REORDER_DEPTH = 32  # frames a packet may come ahead of its display slot (B-pyramids are <= 16)  # in frames: how far a pts may sit from its grid slot


class VideoError(ValueError):
    """A clip cannot be used: corrupt, empty, no video stream, truncated, or over a limit.

    The message says what was wrong (it is returned to API users as is).
    """


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on the work one clip may cause; every bound is checked before heavy work.

    Args:
        max_bytes: size of the encoded clip.
        max_duration_s: duration from the header (or frames / fps).
        max_pixels: width * height of one frame.
        max_frames_decoded: frames the decoder may output for one call, all views
            and retries together.
        max_streams: streams of any kind in the container.
        max_packets: packets demuxed for one call (reading without decoding).
        max_decode_seconds: wall clock for one call, checked between packets.
        max_aspect_ratio: long side / short side of a frame (the short side is scaled
            to the model size, so a sliver would become a huge image).
        max_output_frames: frames in the returned tensor, views x frames per view
            (a sampled frame is decoded once, but each view holds its own copy:
            1,024 frames of 224 x 224 are 616 MB of float32).
        formats: allowed demuxer names (empty = any; see ``DEFAULT_FORMATS``).
    """

    max_bytes: int = 512 * 2**20
    max_duration_s: float = 3600.0
    max_pixels: int = 4096 * 2304
    max_frames_decoded: int = 20000
    max_streams: int = 32
    max_packets: int = 1_000_000
    max_decode_seconds: float = 60.0
    max_aspect_ratio: float = 16.0
    max_output_frames: int = 1024
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_frames_decoded", "max_streams", "max_packets",
                     "max_output_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"VideoLimits.{name} must be a positive int, got {v!r}")
        for name in ("max_duration_s", "max_decode_seconds", "max_aspect_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"VideoLimits.{name} must be a positive number, got {v!r}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"VideoLimits.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")
        object.__setattr__(self, "formats", tuple(self.formats))
        if any(not f or "," in f for f in self.formats):
            raise ValueError(f"VideoLimits.formats must be demuxer names without commas, got {self.formats!r}")


@dataclass(frozen=True)
class ClipInfo:
    """What the container header says about the clip's video stream."""

    num_frames: int  # from stream.frames, else duration * fps (an estimate)
    fps: float
    duration_s: float
    width: int
    height: int
    codec: str
    container: str


# ----------------------------------------------------------------- public API


def probe(source: Source, limits: VideoLimits = VideoLimits()) -> ClipInfo:
    """Read the header of a clip (no decoding) and check it against ``limits``."""
    with _guard("probe"), _Clip(source, limits) as clip:
        return clip.info


def sample_indices(num_frames_total: int, cfg: SamplingConfig, temporal_view: int = 0) -> list[int]:
    """The ``cfg.num_frames`` frame indices of one temporal view, non-decreasing, in range.

    ``uniform``: T equal segments, one frame per segment; view v of V takes the
    frame at fraction (v + 0.5) / V of each segment (V = 1: the middle frame, as
    the public ST-Adapter code tests SSv2). ``stride``: T frames ``stride`` apart
    (span (T-1)*stride+1); the span starts are spread evenly over the clip (one
    view: centred); a clip shorter than the span starts at 0 and repeats its last
    frame.
    """
    n, T, V = num_frames_total, cfg.num_frames, cfg.temporal_views
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_frames_total must be a positive int, got {n!r}")
    if not isinstance(temporal_view, int) or not 0 <= temporal_view < V:
        raise ValueError(f"temporal_view must be in [0, {V}), got {temporal_view!r}")
    v = temporal_view
    if cfg.mode == "uniform":
        # floor((i + (2v+1)/(2V)) * n / T) in integers: no float edge cases
        return [min(n - 1, ((2 * i * V + 2 * v + 1) * n) // (2 * T * V)) for i in range(T)]
    span = (T - 1) * cfg.stride + 1
    if n <= span:
        start = 0
    elif V == 1:
        start = (n - span) // 2
    else:
        start = (2 * v * (n - span) + (V - 1)) // (2 * (V - 1))  # round(v * (n-span) / (V-1))
    return [min(n - 1, start + i * cfg.stride) for i in range(T)]


def decode_clip(source: Source, cfg: SamplingConfig, limits: VideoLimits = VideoLimits()) -> torch.Tensor:
    """Model input for one clip: float32 [V, T, 3, S, S], V = temporal_views * spatial_views.

    Views are ordered temporal-major (for each temporal view, each spatial crop).
    Each frame is resized (bicubic) so its short side is ``cfg.short_side``, then
    cropped to S x S: the centre, or start/centre/end along the long side; RGB in
    [0, 1] is normalised with ``cfg.mean`` / ``cfg.std``. See the module docstring
    for how a clip that ends early is handled.
    """
    wanted = cfg.num_views * cfg.num_frames
    if wanted > limits.max_output_frames:
        raise VideoError(f"the sampling asks for {cfg.num_views} view(s) x {cfg.num_frames} frames = {wanted} frames, "
                         f"over the limit of {limits.max_output_frames}")
    with _guard("decode"), _Clip(source, limits) as clip:
        n = clip.info.num_frames
        views = [sample_indices(n, cfg, v) for v in range(cfg.temporal_views)]
        convert = _Converter(limits, cfg.short_side)
        got, read = clip.read(_unique(views), convert)
        if _missing(views, got) and read.eof and 0 <= read.last_index < n - 1:
            # the stream holds fewer frames than the header said: sample what is there
            n = read.last_index + 1
            views = [sample_indices(n, cfg, v) for v in range(cfg.temporal_views)]
            todo = _missing(views, got)
            if todo:
                more, read = clip.read(todo, convert, restart=True)
                got.update(more)
        missing = _missing(views, got)
        if missing:
            raise VideoError(_shortfall(missing, len(_unique(views)), clip.info, read))
    return _to_tensor(views, got, cfg)


def decode_frames(source: Source, indices: Sequence[int], limits: VideoLimits = VideoLimits()) -> np.ndarray:
    """Raw RGB frames at ``indices`` (any order, repeats allowed): uint8 [N, H, W, 3].

    Strict: raises :class:`VideoError` if any requested frame does not decode.
    """
    idx = [int(i) for i in indices]
    if any(i < 0 for i in idx):
        raise ValueError(f"frame indices must be >= 0, got {min(idx)}")
    with _guard("decode"), _Clip(source, limits) as clip:
        if not idx:
            return np.zeros((0, clip.info.height, clip.info.width, 3), np.uint8)
        got, read = clip.read(sorted(set(idx)), _Converter(limits))
        missing = sorted(set(idx) - set(got))
        if missing:
            raise VideoError(_shortfall(missing, len(set(idx)), clip.info, read))
        shapes = {got[i].shape for i in idx}
        if len(shapes) > 1:
            raise VideoError(f"frame size changes inside the clip ({sorted(shapes)[:3]}); cannot stack the frames")
        return np.stack([got[i] for i in idx])


# ------------------------------------------------------------ opening a clip


class _guard:
    """Turn whatever PyAV / FFmpeg / odd files raise into :class:`VideoError`."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, exc, tb) -> bool:
        if exc is None or isinstance(exc, VideoError) or not isinstance(exc, Exception):
            return False
        if isinstance(exc, (av.FFmpegError, OSError, EOFError, ValueError, IndexError, KeyError,
                            AssertionError, RuntimeError, OverflowError, MemoryError, UnicodeError)):
            raise VideoError(f"cannot {self.what} clip: {_describe(exc)}") from exc
        return False


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _source_size(source: Source) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    try:
        return os.stat(source).st_size
    except OSError as e:
        raise VideoError(f"cannot read clip {os.fspath(source)!r}: {e.strerror or e}") from e


def _open_container(source: Source, limits: VideoLimits) -> av.container.InputContainer:
    options = {"protocol_whitelist": "file"}  # a path may never become a URL
    if limits.formats:
        options["format_whitelist"] = ",".join(limits.formats)
    if isinstance(source, (bytes, bytearray, memoryview)):
        target: io.BytesIO | str = io.BytesIO(bytes(source) if not isinstance(source, bytes) else source)
    else:
        target = os.fspath(source)
        if not isinstance(target, str):
            target = os.fsdecode(target)
    try:
        return av.open(target, mode="r", container_options=options)
    except (av.FFmpegError, OSError, EOFError, ValueError, IndexError, UnicodeError) as e:
        allowed = f", or not in one of the allowed containers: {', '.join(limits.formats)}" if limits.formats else ""
        raise VideoError(f"cannot open clip: not a readable video (corrupt, truncated{allowed}) [{_describe(e)}]") from e


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    attached = getattr(getattr(av.stream, "Disposition", None), "attached_pic", None)
    for s in container.streams.video:
        if attached is None or not (s.disposition & attached):
            return s
    kinds = Counter(s.type for s in container.streams)
    listing = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    raise VideoError(f"clip has no video stream (streams: {listing})")


def _fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate.denominator and 0 < float(rate) < 10_000:
            return float(rate)
    return 0.0


def _clip_info(container, stream) -> ClipInfo:
    fps = _fps(stream)
    duration = 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    frames = int(stream.frames or 0)
    if frames <= 0 and duration > 0 and fps > 0:
        frames = max(1, round(duration * fps))
    if duration <= 0 and frames > 0 and fps > 0:
        duration = frames / fps
    cc = stream.codec_context
    return ClipInfo(num_frames=frames, fps=fps, duration_s=duration, width=int(cc.width or 0),
                    height=int(cc.height or 0), codec=cc.name or "unknown", container=container.format.name)


def _check(info: ClipInfo, limits: VideoLimits) -> None:
    if info.width <= 0 or info.height <= 0:
        raise VideoError(f"video stream has no frame size ({info.width}x{info.height}); the clip is corrupt")
    if info.width * info.height > limits.max_pixels:
        raise VideoError(f"frame size {info.width}x{info.height} = {info.width * info.height} pixels is over "
                         f"the limit of {limits.max_pixels}")
    length = max(info.duration_s, info.num_frames / info.fps if info.fps > 0 else 0.0)
    _check_aspect(info.width, info.height, limits)
    if not math.isfinite(length) or length > limits.max_duration_s:
        raise VideoError(f"clip is {length:.1f} s long, over the limit of {limits.max_duration_s:g} s")


def _check_aspect(width: int, height: int, limits: VideoLimits) -> None:
    """A sliver of a frame would become huge once its short side is scaled up to the model size."""
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise VideoError(f"frame size {width}x{height} has an aspect ratio over the limit of "
                         f"{limits.max_aspect_ratio:g}:1")


class _Clip:
    """One opened clip: header checked, the video stream chosen; reads frame sets."""

    def __init__(self, source: Source, limits: VideoLimits) -> None:
        size = _source_size(source)
        if size == 0:
            raise VideoError("clip is empty (0 bytes)")
        if size > limits.max_bytes:
            raise VideoError(f"clip is {size} bytes, over the limit of {limits.max_bytes}")
        self.source, self.limits = source, limits
        self.budget = _Budget(limits)
        self.container = _open_container(source, limits)
        try:
            if len(self.container.streams) > limits.max_streams:
                raise VideoError(f"clip has {len(self.container.streams)} streams, over the limit of "
                                 f"{limits.max_streams}")
            stream = _video_stream(self.container)
            self.stream_index = stream.index
            self.info = _clip_info(self.container, stream)
            _check(self.info, limits)
            if self.info.num_frames <= 0:
                self.info = _with_counted_frames(self.info, self._count_packets())
                _check(self.info, limits)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "_Clip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def _reopen(self) -> av.video.stream.VideoStream:
        self.close()
        self.container = _open_container(self.source, self.limits)
        return self.container.streams[self.stream_index]

    def _count_packets(self) -> int:
        """Frame count for a header without frames or duration: count packets, then rewind."""
        stream = self.container.streams[self.stream_index]
        n = 0
        for packet in self.container.demux(stream):
            self.budget.packet()
            n += packet.size > 0
        self._reopen()
        if n == 0:
            raise VideoError("no decodable video frames: the video stream holds no packets")
        return n

    def read(self, needed: list[int], convert: Callable[[av.VideoFrame], np.ndarray],
             restart: bool = False, seek_gap: int | None = None) -> tuple[dict[int, np.ndarray], "_ReadResult"]:
        """Frames at the sorted, unique ``needed`` indices, converted; plus how the read ended.

        Tries the indexed reader (with seeks, then without), then sequential
        decoding; ``restart`` reopens the clip first (for a second call).
        """
        stream = self._reopen() if restart else self.container.streams[self.stream_index]
        fps = self.info.fps
        gap = seek_gap if seek_gap is not None else max(64, int(5 * fps))
        if fps > 0 and stream.time_base:
            try:
                return _IndexedReader(self.container, stream, fps, self.budget, gap).run(needed, convert)
            except _SeekMissed:
                stream = self._reopen()
                try:
                    return _IndexedReader(self.container, stream, fps, self.budget, None).run(needed, convert)
                except _Irregular:
                    stream = self._reopen()
            except _Irregular:
                stream = self._reopen()
        return _SequentialReader(self.container, stream, self.budget).run(needed, convert)


def _with_counted_frames(info: ClipInfo, n: int) -> ClipInfo:
    fps = info.fps
    return ClipInfo(n, fps, info.duration_s or (n / fps if fps > 0 else 0.0), info.width, info.height,
                    info.codec, info.container)


# ---------------------------------------------------------------- the readers


class _Irregular(Exception):
    """The stream does not sit on a constant frame grid; index by counting instead."""


class _SeekMissed(_Irregular):
    """A seek landed after its target; read again without seeking."""


@dataclass
class _ReadResult:
    decoded: int = 0  # frames the decoder output in this read
    last_index: int = -1  # highest frame index known to exist (output, or dropped as non-reference)
    eof: bool = False  # the stream ended before every needed frame was out
    seeks: int = 0  # container seeks done
    sequential: bool = False  # read by counting frames (the stream is not on a constant frame grid)


class _Budget:
    """Counts packets, frames and wall clock of one call against the limits."""

    def __init__(self, limits: VideoLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_decode_seconds
        self.packets = 0
        self.frames = 0

    def packet(self) -> None:
        self.packets += 1
        if self.packets > self.limits.max_packets:
            raise VideoError(f"clip needs more than {self.limits.max_packets} packets to read (max_packets)")
        if time.monotonic() > self.deadline:
            raise VideoError(f"decoding took longer than {self.limits.max_decode_seconds:g} s (max_decode_seconds)")

    def frame(self, frame: av.VideoFrame) -> None:
        self.frames += 1
        if self.frames > self.limits.max_frames_decoded:
            raise VideoError(f"clip needs more than {self.limits.max_frames_decoded} decoded frames "
                             f"(max_frames_decoded)")
        if frame.width * frame.height > self.limits.max_pixels:
            raise VideoError(f"a frame of {frame.width}x{frame.height} is over the limit of "
                             f"{self.limits.max_pixels} pixels")


def _decode(codec, packet, budget: _Budget) -> list[av.VideoFrame]:
    """Decode one packet (None drains); a packet the decoder rejects just yields no frame."""
    try:
        frames = codec.decode(packet)
    except (av.FFmpegError, EOFError):
        return []
    for f in frames:
        budget.frame(f)
    return frames


class _SequentialReader:
    """Index = count of frames output so far: the naive definition, for irregular streams."""

    def __init__(self, container, stream, budget: _Budget) -> None:
        self.container, self.stream, self.budget = container, stream, budget

    def run(self, needed: list[int], convert) -> tuple[dict[int, np.ndarray], _ReadResult]:
        want, got, res = set(needed), {}, _ReadResult(sequential=True)
        codec, last = self.stream.codec_context, needed[-1]

        def take(frames) -> bool:
            for f in frames:
                res.last_index += 1
                res.decoded += 1
                if res.last_index in want:
                    got[res.last_index] = convert(f)
            return res.last_index >= last

        for packet in self.container.demux(self.stream):
            self.budget.packet()
            if packet.size == 0:
                continue
            if take(_decode(codec, packet, self.budget)):
                return got, res
        take(_decode(codec, None, self.budget))
        res.eof = len(got) < len(want)
        return got, res


class _IndexedReader:
    """Places packets and frames on the frame grid by pts; decodes only GOPs holding needed frames.

    ``run`` walks the packets once. ``target`` is the first needed frame whose packet
    has not reached the decoder. A keyframe at or before ``target`` starts a new
    held-back ``buffer`` (what came before cannot be needed); a packet at or past
    ``target`` (or a keyframe past it) sends the buffer and itself to the decoder.
    Once the last needed packet is in, the decoder is drained instead of being fed
    more packets to push the reordered frames out.
    """

    def __init__(self, container, stream, fps: float, budget: _Budget, seek_gap: int | None) -> None:
        self.container, self.stream, self.budget = container, stream, budget
        self.codec = stream.codec_context
        self.frames_per_tick = float(stream.time_base) * fps
        self.ticks_per_frame = 1.0 / self.frames_per_tick
        self.seek_gap = seek_gap
        self.anchor: int | None = None  # pts of frame 0
        self.early_pts: list[tuple[int, bool]] = []  # (pts, keyframe) of packets before the anchor was known
        self.seen: set[int] = set()  # grid slots of demuxed packets
        self.frontier = 0  # lowest slot not seen yet
        self.skipped: list[tuple[int, int]] = []  # slot ranges [a, b) jumped over by seeks
        self.last_key = -1  # slot of the latest keyframe demuxed
        self.run_start = 0  # keyframe slot where the current decode run began
        self.expect = 0  # slot the current run outputs next
        # Non-reference frames that are not needed are dropped by the decoder, for codecs
        # whose decoders define "non-reference" exactly (nothing else can depend on them).
        self.skip_nonref = self.codec.name in _NONREF_SKIPPABLE
        self.skipping = False
        self.maybe_dropped: set[int] = set()  # slots fed while dropping non-reference frames
        self.fed: set[int] = set()  # needed slots whose packet went to the decoder
        self.fed_any: set[int] = set()  # every slot whose packet went to the decoder (after the anchor)
        self.res = _ReadResult()

    # --- grid

    def slot(self, pts: int | None, what: str) -> int:
        if pts is None:
            raise _Irregular(f"a {what} has no pts")
        x = (pts - self.anchor) * self.frames_per_tick
        i = round(x)
        if abs(x - i) > _FRAME_GRID_TOLERANCE:
            raise _Irregular(f"{what} pts {pts} is off the frame grid")
        return i

    # --- decoding

    def feed(self, packets, convert) -> None:
        for p in packets:
            if self.anchor is not None:
                slot = self.slot(p.pts, "packet")
                needed = slot in self.want and slot not in self.got
                self.fed_any.add(slot)
                if needed:
                    self.fed.add(slot)
                if self.skip_nonref:
                    if not needed:
                        self.maybe_dropped.add(slot)
                        self.res.last_index = max(self.res.last_index, slot)
                    if needed == self.skipping:  # the decoder reads the setting for each packet
                        self.codec.skip_frame = "DEFAULT" if needed else "NONREF"
                        self.skipping = not needed
            for f in _decode(self.codec, p, self.budget):
                self.output(f, convert)

    def drain(self, convert) -> None:
        """Get out the frames the decoder holds back for reordering (it must be flushed after)."""
        for f in _decode(self.codec, None, self.budget):
            self.output(f, convert)

    def output(self, frame: av.VideoFrame, convert) -> None:
        self.res.decoded += 1
        if self.anchor is None:
            if frame.pts is None:
                raise _Irregular("a frame has no pts")
            self.anchor = frame.pts
            for pts, key in self.early_pts:
                slot = self.slot(pts, "packet")
                self.see(slot, key)
                if slot in self.want:
                    self.fed.add(slot)
        i = self.slot(frame.pts, "frame")
        if i < self.run_start:  # a leading picture of an open GOP we started at: not needed, maybe broken
            return
        # a gap is fine where the decoder may drop a frame, or where the packet was never fed
        # (later in decode order); a missing packet shows in verify()
        if i < self.expect or any(j in self.fed_any and j not in self.maybe_dropped for j in range(self.expect, i)):
            raise _Irregular(f"frame {i} follows frame {self.expect - 1}")
        self.expect = i + 1
        self.res.last_index = max(self.res.last_index, i)
        if i in self.want and i not in self.got:
            self.got[i] = convert(frame)

    def restart_at(self, key_slot: int) -> None:
        self.codec.flush_buffers()
        self.run_start = self.expect = key_slot

    # --- the packet loop

    def run(self, needed: list[int], convert) -> tuple[dict[int, np.ndarray], _ReadResult]:
        self.want, self.got = set(needed), {}
        todo = iter(needed)
        target = next(todo)
        buffer: list = []  # demuxed, not yet decoded packets (continuing the decoder, or from a keyframe)
        fresh = False  # buffer starts at a keyframe: flush the decoder before feeding it
        seeked_for: int | None = None
        landing: tuple[int, int, int] | None = None  # (frontier, last keyframe, target) of a seek in flight
        packets = self.container.demux(self.stream)
        while True:
            packet = next(packets, None)
            if packet is None:
                break
            self.budget.packet()
            if packet.size == 0:  # demuxer flush packet at the end, or an empty (skip) packet
                continue
            if self.anchor is None:  # decode from the start until frame 0 fixes the grid
                if packet.pts is None:
                    raise _Irregular("a packet has no pts")
                self.early_pts.append((packet.pts, packet.is_keyframe))
                self.feed([packet], convert)
            else:
                slot = self.slot(packet.pts, "packet")
                if landing is not None:  # just seeked: wait for the keyframe it landed on
                    if not packet.is_keyframe:
                        continue
                    self.landed(slot, *landing)
                    landing = None
                self.see(slot, packet.is_keyframe)
                if packet.is_keyframe and slot <= target:
                    if self.fed - self.got.keys():
                        self.drain(convert)  # needed frames still in the decoder's reorder queue
                    buffer, fresh = [packet], True
                elif slot >= target or packet.is_keyframe:
                    if fresh:
                        self.restart_at(self.slot(buffer[0].pts, "packet"))
                    self.feed(buffer + [packet], convert)
                    buffer, fresh = [], False
                else:
                    buffer.append(packet)
                if buffer and self.seek_gap is not None and target - slot > self.seek_gap and seeked_for != target:
                    if self.fed - self.got.keys():
                        self.drain(convert)
                        self.codec.flush_buffers()
                    seeked_for, landing = target, (self.frontier, self.last_key, target)
                    self.seek(target)
                    packets, buffer, fresh = self.container.demux(self.stream), [], False
            while target in self.got or target in self.fed:  # its packet is in: look further
                target = next(todo, None)
                if target is None:
                    if self.fed - self.got.keys():
                        self.drain(convert)  # rather than feeding more packets to push them out
                    return self.finish(needed, packets)
        if landing is not None:
            raise _SeekMissed(f"seek for frame {landing[-1]} found no keyframe before the end")
        # end of stream: decode what is held back, then drain the decoder
        if buffer:
            if fresh:
                self.restart_at(self.slot(buffer[0].pts, "packet"))
            self.feed(buffer, convert)
        self.drain(convert)
        self.res.eof = len(self.got) < len(self.want)
        return self.finish(needed, iter(()))

    def finish(self, needed: list[int], packets) -> tuple[dict[int, np.ndarray], _ReadResult]:
        if len(self.got) == len(self.want):
            last = needed[-1]
            # B-frames before the last needed frame may follow it in decode order: demux them to check
            for packet in packets:
                if self.frontier > last:
                    break
                self.budget.packet()
                if packet.size:
                    slot = self.slot(packet.pts, "packet")
                    self.see(slot, packet.is_keyframe)
                    if slot > last + _REORDER_DEPTH:
                        break
            self.verify(last)
        return self.got, self.res

    def see(self, slot: int, key: bool) -> None:
        self.seen.add(slot)
        while self.frontier in self.seen:
            self.frontier += 1
        if key:
            self.last_key = max(self.last_key, slot)

    def landed(self, slot: int, frontier: int, last_key: int, goal: int) -> None:
        """Check where a seek landed: past its goal is an error; not past the last keyframe ends seeking."""
        if slot > goal:
            raise _SeekMissed(f"seek for frame {goal} landed on frame {slot}")
        if slot > frontier:
            self.skipped.append((frontier, slot))
        if slot <= last_key:  # keyframes are sparser than the gap: seeking only re-decodes
            self.seek_gap = None

    def seek(self, target: int) -> None:
        pts = self.anchor + int(round((target + _FRAME_GRID_TOLERANCE) * self.ticks_per_frame))
        self.container.seek(pts, backward=True, any_frame=False, stream=self.stream)
        self.res.seeks += 1

    def verify(self, last: int) -> None:
        """Every slot up to the last needed frame had its packet, so counting frames gives the slot."""
        covered = np.zeros(last + 1, bool)
        covered[[i for i in self.seen if 0 <= i <= last]] = True
        for a, b in self.skipped:
            covered[a:b] = True
        if not covered.all():
            raise _Irregular(f"no packet for frame slot {int(np.argmin(covered))}")


# -------------------------------------------------------- frames to a tensor


def _unique(views: list[list[int]]) -> list[int]:
    return sorted({i for v in views for i in v})


def _missing(views: list[list[int]], got: dict[int, np.ndarray]) -> list[int]:
    return [i for i in _unique(views) if i not in got]


def _shortfall(missing: list[int], wanted: int, info: ClipInfo, read: _ReadResult) -> str:
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    if read.last_index < 0:
        return f"no decodable video frames (the header says {info.num_frames} frames of {info.codec})"
    return (f"decoded {wanted - len(missing)} of {wanted} needed frames: frame(s) {shown} did not decode "
            f"(the header says {info.num_frames} frames; the stream ends after frame {read.last_index})")


class _Converter:
    """Frames to RGB uint8 arrays through one swscale context per clip, single-threaded.

    ``frame.reformat`` builds a new scaler per frame, and recent PyAV gives it a
    thread pool by default: milliseconds per frame, more than decoding a small one.
    """

    def __init__(self, limits: VideoLimits, short_side: int = 0) -> None:
        self.short, self.limits = short_side, limits
        self.scaler = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        w, h = frame.width, frame.height
        _check_aspect(w, h, self.limits)
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


def _to_tensor(views: list[list[int]], got: dict[int, np.ndarray], cfg: SamplingConfig) -> torch.Tensor:
    """Crop, normalise (a 256-entry table per channel: one gather, no float math per pixel), stack."""
    S, C = cfg.input_size, cfg.spatial_views
    levels = np.arange(256, dtype=np.float32) / 255.0
    tables = [(levels - np.float32(m)) / np.float32(s) for m, s in zip(cfg.mean, cfg.std)]
    out = np.empty((len(views) * C, cfg.num_frames, 3, S, S), np.float32)
    for i in _unique(views):
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
