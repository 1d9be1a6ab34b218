"""Bounds on the work one clip may cause, the error every refusal raises, and the per-call budget."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import av
import numpy as np

from .nal_units import CHECKED_CODECS, NalScan

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Demuxers a clip may use. Playlists (hls, concat, image2 sequences...) are left
# out on purpose: they open further files or URLs named inside the clip.
DEFAULT_FORMATS = (
    "mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "asf",
    "ogg", "ivf", "h264", "hevc", "m4v", "gif",
)  # fmt: skip


class VideoError(ValueError):
    """A clip cannot be used: corrupt, empty, no video stream, truncated, or over a limit.

    The message says what was wrong (it is returned to API users as is).
    """


class VideoOutOfMemory(VideoError):
    """The process ran out of memory on this clip (it may be fine): a server answers RESOURCE_EXHAUSTED."""


# Memory a process must still be able to reserve after FFmpeg said ENOMEM for that ENOMEM to count as real
# memory pressure: more than the largest block FFmpeg allocates for a clip within the default limits (a frame of
# max_pixels at 16 bits per sample, 4:4:4). Reserved and freed at once, never touched: it costs no RSS.
MEMORY_HEADROOM = 128 * 2**20


def memory_is_short(headroom: int = MEMORY_HEADROOM) -> bool:
    """Whether this process cannot reserve ``headroom`` more bytes (an address-space limit or strict overcommit
    reached: where a real shortage shows as a failed allocation rather than the kernel's OOM killer)."""
    try:
        np.empty(headroom, np.uint8)
    except MemoryError:
        return True
    return False


def out_of_memory(what: str, exc: BaseException) -> VideoError:
    """The error for an allocation that failed while reading a clip.

    FFmpeg answers ENOMEM at once, without trying, for a block over its own cap (2 GiB), and the system refuses a
    block larger than it could ever give: so a small corrupt header that declares an absurd table, packet or frame
    gets ENOMEM while memory is plentiful. That is the clip's fault (INVALID_ARGUMENT: retrying cannot help); only
    when memory is really short (:func:`memory_is_short`), or Python itself ran out, is it
    :class:`VideoOutOfMemory` (RESOURCE_EXHAUSTED: retry later)."""
    if isinstance(exc, av.FFmpegError) and not memory_is_short():
        return VideoError(f"cannot {what} clip: it is corrupt: it declares a table, packet or frame too large to "
                          "allocate (FFmpeg refused the allocation while memory is free)")
    return VideoOutOfMemory(f"cannot {what} clip: out of memory")


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
        max_decoded_pixels: pixels of all frames the decoder outputs for one call: bounds the
            decode time of high-resolution clips whose sampled frames sit far from keyframes
            (the default is about 1,000 frames of 1080p or 230 of 4K).
        max_decode_seconds: wall clock for one call, checked for every packet and frame.
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
    max_decoded_pixels: int = 2**31
    max_decode_seconds: float = 60.0
    max_aspect_ratio: float = 16.0
    max_output_frames: int = 1024
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_frames_decoded", "max_streams", "max_packets",
                     "max_output_frames", "max_decoded_pixels"):
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

    def decoder_max_pixels(self) -> int:
        """FFmpeg's own ``max_pixels`` for every decoder: it refuses a frame over it before allocating the frame.

        FFmpeg checks the width rounded up to its stride alignment (at most 64), so the cap leaves that much
        room over ``max_pixels`` (the tallest frame within the aspect-ratio limit); the exact limit is checked
        on the size FFmpeg reports (:meth:`Budget.check_size`)."""
        tallest = math.isqrt(int(self.max_pixels * self.max_aspect_ratio)) + 1
        return min(self.max_pixels + 64 * tallest, 2**31 - 1)
        if any(not f or "," in f for f in self.formats):
            raise ValueError(f"VideoLimits.formats must be demuxer names without commas, got {self.formats!r}")


def check_aspect(width: int, height: int, limits: VideoLimits) -> None:
    """A sliver of a frame would become huge once its short side is scaled up to the model size."""
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise VideoError(f"frame size {width}x{height} has an aspect ratio over the limit of "
                         f"{limits.max_aspect_ratio:g}:1")


class Budget:
    """Counts packets, frames and wall clock of one call against the limits."""

    def __init__(self, limits: VideoLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_decode_seconds
        self.packets = 0
        self.frames = 0
        self.pixels = 0
        self._nal: Optional[tuple[Any, NalScan]] = None  # (codec context, the reader of its packets' NAL units)

    def packet(self) -> None:
        self.packets += 1
        if self.packets > self.limits.max_packets:
            raise self._over_packets()
        self.check_time()

    def _over_packets(self) -> VideoError:
        return VideoError(f"clip needs more than {self.limits.max_packets} packets to read (max_packets)")

    def _over_frames(self) -> VideoError:
        return VideoError(f"clip needs more than {self.limits.max_frames_decoded} decoded frames (max_frames_decoded)")

    def check_totals(self, packets: int, frames: int, pixels: int) -> None:
        """Counts kept elsewhere, checked as this budget checks its own: one video split between decoders (each
        with a budget of its own) is held to the limits of one decode by the sum of their counts."""
        if packets > self.limits.max_packets:
            raise self._over_packets()
        if frames > self.limits.max_frames_decoded:
            raise self._over_frames()
        if pixels > self.limits.max_decoded_pixels:
            raise VideoError(f"clip needs more than {self.limits.max_decoded_pixels} decoded pixels "
                             f"({frames} frames; max_decoded_pixels)")

    def check_predicted(self, frames: int, width: int, height: int) -> None:
        """Refuse before decoding when ``frames`` more frames of ``width`` x ``height`` would pass the limits."""
        if self.frames + frames > self.limits.max_frames_decoded:
            raise self._over_frames()
        if self.pixels + frames * width * height > self.limits.max_decoded_pixels:
            raise VideoError(f"clip needs more than {self.limits.max_decoded_pixels} decoded pixels (at least {frames} "
                             f"frames of {width}x{height} from the keyframes to the sampled frames; max_decoded_pixels)")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise VideoError(f"decoding took longer than {self.limits.max_decode_seconds:g} s (max_decode_seconds)")

    def check_size(self, width: int, height: int) -> None:
        """A frame size the decoder reached (a frame it output, or a size change it refused mid-stream)."""
        if width * height > self.limits.max_pixels:
            raise VideoError(f"a frame of {width}x{height} is over the limit of {self.limits.max_pixels} pixels")

    def check_parameter_sets(self, codec: Any, packet: Optional[av.Packet]) -> None:
        """A frame size an H.264/HEVC parameter set inside ``packet`` announces, checked before ``codec`` (the
        decoder) reads it: the decoder allocates its tables for a new size before its own check (:mod:`.nal_units`)."""
        if packet is None or not packet.size or codec.name not in CHECKED_CODECS:
            return
        if self._nal is None or self._nal[0] is not codec:
            self._nal = (codec, NalScan(codec.name, codec.extradata))
        for width, height in self._nal[1].sps_sizes(packet):
            self.check_size(width, height)

    def frame(self, frame: av.VideoFrame) -> None:
        self.frames += 1
        self.check_time()
        if self.frames > self.limits.max_frames_decoded:
            raise self._over_frames()
        self.check_size(frame.width, frame.height)
        self.pixels += frame.width * frame.height
        if self.pixels > self.limits.max_decoded_pixels:
            raise VideoError(f"clip needs more than {self.limits.max_decoded_pixels} decoded pixels "
                             f"({self.frames} frames of {frame.width}x{frame.height}; max_decoded_pixels)")
