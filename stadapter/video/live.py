"""Windows over a live stream: decoded as its bytes come, each window given out once its last frame has decoded.

The windows are those of :mod:`.windows` (the same :class:`~.windows.WindowPlan`: window k covers frames
``[s_k, s_k + L)``), placed by the stream's own timestamps, never by when its bytes arrived: a frame's
index is ``round((pts - pts of the first frame) * time_base * fps)``, so a constant-frame-rate stream sent
faster than real time has the windows :func:`~.windows.decode_windows` gives for the same file. A
frame whose slot was already filled is dropped; a slot no frame reached (a stream whose rate drops) takes
the frame before it.

Every defence of a clip's decode holds: the container whitelist and stream count, the frame-size screen
(:mod:`.screen`, on the recorded head, :class:`~.live_input.HeadTape`), the decoder's ``max_pixels``
(``cap_decoder``), the aspect ratio, and the budget (packets, frames, pixels, decode time: the time spent
waiting for bytes is not decoding and is not counted). A stream is bounded in length by
``WindowLimits.max_duration_s`` (its presentation time).

A stream damaged mid-way ends with :class:`VideoError` (the windows given before stay given): bytes the demuxer
had to pass over (more than ``SKIPPED_BYTES`` between packets or after the last), timestamps that jump (frames
missing for more than one window and ``MAX_JUMP_S``, or going back by more than ``MAX_JUMP_S``), a decoder that
rejects ``MAX_BAD_PACKETS`` packets in a row, or a demuxer error. A stream that simply stops (even mid-frame)
ends normally: a camera's stream has no other end.
"""

from __future__ import annotations

import errno
import math
import time
from typing import Generator, Iterator, Optional

import av
import numpy as np

from ..config import SamplingConfig
from .container import cap_decoder, clip_info, describe, guard, open_options, video_stream
from .limits import Budget, VideoError, VideoLimits, check_aspect
from .live_input import ChunkReader, HeadTape, check_growable
from .preprocess import FrameConverter, views_to_uint8
from .readers import demux_packets
from .screen import check_stream_count, open_screened
from .windows import DecodeStats, PlanTakes, Window, WindowLimits, WindowPlan, check_frames, check_window_args, plan_windows

HEAD_BYTES = 16 * 2**20  # most of a stream's head recorded for the second open (the screen reads up to 5 MB)
_VIDEO, _WINDOWS = VideoLimits(), WindowLimits()
MAX_BAD_PACKETS = 8  # packets in a row the decoder may reject before the stream counts as corrupt
# Bytes the demuxer may pass over between two packets, or after the last (an index at the end; what comes before the
# first packet is the container's header and is not counted),
# plus an eighth of the packet before (MPEG-TS headers grow with the packet): more and it skipped corrupt data.
SKIPPED_BYTES = 64 * 1024
MAX_JUMP_S = 1.0  # a jump of the timestamps by more than this and one window: frames are missing (or corrupt)


def decode_live_windows(reader: ChunkReader, cfg: SamplingConfig, window_s: float, stride_s: float,
                        limits: VideoLimits = _VIDEO, window_limits: WindowLimits = _WINDOWS,
                        stats: Optional[DecodeStats] = None) -> Generator[Window, None, None]:
    """Every whole window of the live stream ``reader`` reads, in time order, as uint8 numpy frames (not
    normalised: the server's decoders' form), each as soon as its last frame has decoded (see the module
    docstring). :class:`VideoError` for a stream that cannot be read as it grows, is corrupt or passes a
    limit; :class:`~.windows.WindowError` for window arguments that cannot work."""
    check_window_args(window_s, stride_s, window_limits)
    stats = stats if stats is not None else DecodeStats()
    vlimits = window_limits.video_limits(limits)
    tape = HeadTape(reader, HEAD_BYTES)
    with guard("decode"):
        check_growable(tape)
        container = _open_live(tape, vlimits)
        try:
            stream = video_stream(container)
            cap_decoder(stream, vlimits)
            info = clip_info(container, stream)
            if info.width <= 0 or info.height <= 0:
                raise VideoError("the stream's video has no frame size: it is corrupt")
            check_aspect(info.width, info.height, vlimits)
            plan = plan_windows(cfg, info.fps, window_s, stride_s, window_limits)
            check_frames(cfg, vlimits)
            sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
            convert = FrameConverter(vlimits, cfg.short_side, cfg.autorotate, sar)
            walk = _LiveWalk(plan, cfg, convert, Budget(vlimits), window_limits, float(stream.time_base or 0))
            yield from walk.run(container, stream, reader, tape, stats)
        finally:
            container.close()


def _open_live(tape: HeadTape, limits: VideoLimits) -> av.container.InputContainer:
    """Screened (frame sizes, with no decoder allowed) on the head as it is recorded, then opened on its replay."""
    options, codec_options = open_options(limits)
    try:
        container = open_screened(tape, tape.replay, options, codec_options, limits)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, EOFError, ValueError, IndexError, UnicodeError) as e:
        allowed = f" in one of the allowed containers ({', '.join(limits.formats)})" if limits.formats else ""
        raise VideoError(f"cannot open the live stream: not a video stream{allowed} that can be read as it "
                         f"arrives (MPEG-TS, Matroska/WebM, fragmented MP4, FLV), or corrupt [{e}]") from e
    check_stream_count(container, limits)
    return container


class _LiveWalk:
    """Frames placed on the window plan's grid by pts, held while an open window takes them."""

    def __init__(self, plan: WindowPlan, cfg: SamplingConfig, convert: FrameConverter, budget: Budget,
                 window_limits: WindowLimits, time_base: float) -> None:
        self.plan, self.cfg, self.convert, self.budget = plan, cfg, convert, budget
        self.window_limits = window_limits
        self.ticks = time_base * plan.fps  # frames per pts tick
        self.most = math.floor(window_limits.max_duration_s * plan.fps + 0.5)  # frames within the longest stream
        self.jump = max(plan.length, math.ceil(MAX_JUMP_S * plan.fps)) + math.ceil(MAX_JUMP_S * plan.fps)
        self.back = math.ceil(MAX_JUMP_S * plan.fps)
        self.end_pos: Optional[int] = None  # where the last packet (any stream) ends in the stream's bytes
        self.takes = PlanTakes(plan)
        self.held: dict[int, np.ndarray] = {}
        self.anchor: Optional[int] = None
        self.last_slot = -1
        self.last_frame: Optional[av.VideoFrame] = None
        self.k = 0  # the next window to give out

    def run(self, container, stream, reader: ChunkReader, tape: HeadTape, stats: DecodeStats) -> Iterator[Window]:
        codec = stream.codec_context
        start, paused = time.monotonic(), 0.0
        bad = 0
        packets = demux_packets(container, list(container.streams))  # all: their bytes are not skipped bytes
        while True:
            t0 = time.perf_counter()
            try:
                packet = next(packets, None)
            except av.FFmpegError as e:
                if e.errno == errno.ENOMEM:
                    raise  # out of memory, or a corrupt table: told apart by guard()
                raise VideoError(f"the stream is corrupt: {describe(e)}") from e
            tape.release()
            self.budget.deadline = start + self.budget.limits.max_decode_seconds + reader.waited_s + paused
            if packet is not None:
                self.budget.packet()
                self.check_skipped(packet.pos, packet.size)
                if packet.size == 0 or packet.stream_index != stream.index:
                    continue
            else:
                self.check_skipped(reader.bytes, 0)
            self.budget.check_parameter_sets(codec, packet)  # a new SPS's size, before the decoder sizes its tables
            try:
                frames = codec.decode(packet)
                bad = 0
            except (av.FFmpegError, EOFError) as e:
                self.budget.check_size(codec.coded_width or codec.width, codec.coded_height or codec.height)
                bad += 1
                if bad >= MAX_BAD_PACKETS:
                    raise VideoError(f"the stream is corrupt: the decoder rejected {bad} packets in a row ({e})") from e
                frames = []
            for f in frames:
                self.budget.frame(f)
                self.place(f)
            stats.count(self.budget)
            stats.decode_s += time.perf_counter() - t0
            while self.last_slot + 1 >= self.plan.end(self.k):
                window = self.window()
                stats.windows += 1
                t1 = time.monotonic()
                yield window
                paused += time.monotonic() - t1
            if packet is None:
                break
        if stats.windows == 0:
            n = self.last_slot + 1
            raise VideoError(f"the stream ended after {n} frame(s) ({n / self.plan.fps:.2f} s at {self.plan.fps:g} "
                             f"fps), shorter than one window of {self.plan.length / self.plan.fps:g} s")

    def check_skipped(self, pos: Optional[int], size: int) -> None:
        """A packet at byte ``pos`` (or the stream's end): VideoError if the demuxer passed over corrupt bytes."""
        if pos is None or pos < 0:
            return
        if self.end_pos is None:  # what comes before the first packet is the container's header (attachments too)
            self.end_pos = pos
        if pos - self.end_pos > SKIPPED_BYTES + size // 8:
            raise VideoError(f"the stream is corrupt: {pos - self.end_pos} bytes after byte {self.end_pos} hold no "
                             "packet the demuxer could read")
        self.end_pos = max(self.end_pos, pos + size)

    def place(self, frame: av.VideoFrame) -> None:
        """Put ``frame`` on the grid (the first frame is slot 0); the slots it skipped take the frame before."""
        pts = frame.pts
        if pts is None:
            slot = self.last_slot + 1
        else:
            if self.anchor is None:
                self.anchor = pts
            slot = round((pts - self.anchor) * self.ticks)
        if slot > self.last_slot + self.jump or slot < self.last_slot - self.back:
            fps = self.plan.fps
            raise VideoError(f"the stream is corrupt or frames are missing: its timestamps jump from "
                             f"{self.last_slot / fps:.2f} s to {slot / fps:.2f} s")
        if slot <= self.last_slot:
            return  # a slot already filled (or before the first frame): the stream's rate is above its average
        if slot >= self.most:
            raise VideoError(f"the stream is longer than {self.window_limits.max_duration_s:g} s (its presentation "
                             "time): the longest live stream; start a new one")
        converted: Optional[np.ndarray] = None
        for s in range(self.last_slot + 1, slot):  # a gap: those slots show the frame before
            if s in self.takes and self.last_frame is not None:
                converted = converted if converted is not None else self.convert(self.last_frame)
                self.held[s] = converted
        if slot in self.takes:
            self.held[slot] = self.convert(frame)
        self.last_slot, self.last_frame = slot, frame
        if len(self.held) > self.window_limits.max_held_frames:
            raise VideoError(f"the stream's open windows hold over {self.window_limits.max_held_frames} frames "
                             "(max_held_frames)")

    def window(self) -> Window:
        k, plan = self.k, self.plan
        if k >= self.window_limits.max_windows:
            raise VideoError(f"the stream has more than {self.window_limits.max_windows} windows (max_windows)")
        idx = plan.indices(k)
        window = Window(k, plan.start(k), plan.end(k), plan.start(k) / plan.fps, plan.end(k) / plan.fps,
                        tuple(tuple(v) for v in idx), views_to_uint8(idx, self.held, self.cfg))
        self.k += 1
        self.takes.forget_before(plan.start(self.k), self.held)
        return window
