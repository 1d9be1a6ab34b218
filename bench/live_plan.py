"""bench.live's clip, its chunks and the arithmetic of lag: no server, no gRPC.

The clip is a camera's: H.264 without B-frames (a live encoder's low-latency setting, so packets come in
presentation order and a frame's packet is the one that carries it), a keyframe every second, muxed into
MPEG-TS as a camera or ``ffmpeg -f mpegts`` would send it. Each video packet is one chunk: the bytes from its
start to the next packet's start (the first chunk also holds the container's tables before it), sent at its
presentation time from the stream's start, so the stream plays at real time as a camera's would.

A window's lag is measured from the send of the chunk that carried the window's last frame (frame
``end_frame - 1`` of ``ClassifyWindows``' grid, the frame whose decode completes the window on the server)
to the receipt of the window's result. A frame's index on that grid is its presentation time from the first
frame's times the frame rate, as the server places it (``stadapter.video.live``), so the mapping needs nothing
but the stream's own timestamps.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """One video packet's bytes; ``at_s``: its presentation time from the first packet's (when it is sent);
    ``frame``: the frame it carries on the window grid."""

    data: bytes
    at_s: float
    frame: int


def make_clip(seconds: float, width: int = 320, height: int = 240, fps: int = 30, seed: int = 0) -> bytes:
    """A seeded MPEG-TS clip: squares moving over a still gradient, H.264 with no B-frames, a keyframe a second."""
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1),
                     np.full_like(xx, int(rng.integers(0, 256)))], axis=-1).astype(np.uint8)
    squares = [(rng.integers(0, width - 32), rng.integers(0, height - 32), rng.integers(-4, 5), rng.integers(-4, 5),
                rng.integers(0, 256, 3)) for _ in range(4)]
    out = io.BytesIO()
    with av.open(out, "w", format="mpegts") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.max_b_frames = 0
        s.codec_context.gop_size = fps
        s.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(round(seconds * fps)):
            img = base.copy()
            for x, y, dx, dy, colour in squares:
                px, py = int((x + dx * i) % (width - 32)), int((y + dy * i) % (height - 32))
                img[py:py + 32, px:px + 32] = colour
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return out.getvalue()


def chunk_plan(ts: bytes) -> list[Chunk]:
    """The clip's chunks, one per video packet (see the module docstring)."""
    import av

    marks = []
    with av.open(io.BytesIO(ts)) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        tb = float(stream.time_base or 0)
        for p in c.demux(stream):
            if p.size and p.pos is not None and p.pos >= 0 and p.pts is not None:
                marks.append((p.pos, p.pts))
    if not marks or fps <= 0:
        raise ValueError("the clip has no timed video packets")
    marks.sort()
    first = marks[0][1]
    ends = [pos for pos, _ in marks[1:]] + [len(ts)]
    starts = [0] + ends[:-1]
    return [Chunk(ts[a:b], (pts - first) * tb, round((pts - first) * tb * fps))
            for (_, pts), a, b in zip(marks, starts, ends, strict=True)]


class LagMap:
    """Which chunk carried a window's last frame (see the module docstring)."""

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self.frames = [c.frame for c in chunks]
        if self.frames != sorted(self.frames):
            raise ValueError("the chunks' frames are not in order (B-frames?)")

    def carrier(self, end_frame: int) -> int:
        """The index of the chunk holding frame ``end_frame - 1``, or the last frame before it (a gap)."""
        i = bisect.bisect_right(self.frames, end_frame - 1) - 1
        if i < 0:
            raise ValueError(f"no chunk carries a frame before {end_frame}")
        return i


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> dict[str, Optional[float]]:
    """``{"p50_ms": ..., "p99_ms": ...}`` of seconds (None when empty), nearest-rank."""
    out: dict[str, Optional[float]] = {}
    ordered = sorted(values)
    for q in qs:
        if not ordered:
            out[f"p{q:g}_ms"] = None
            continue
        rank = max(1, int(np.ceil(q / 100 * len(ordered))))
        out[f"p{q:g}_ms"] = round(ordered[rank - 1] * 1000, 1)
    return out
