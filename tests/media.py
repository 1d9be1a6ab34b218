"""Tiny synthetic clips and broken inputs for the video tests.

The clip makers live in the library (:mod:`stadapter.video.synthetic`, which the benches
use too); this module re-exports them and adds what only tests want: truncated,
random and corrupted inputs, and a reference decoder.
"""

from __future__ import annotations

import bisect
import io
import os
from typing import Iterable, Sequence

import av
import numpy as np

from stadapter.video.synthetic import BAND, BITS, FORMAT_BY_SUFFIX, encode_frames, frame_image, frame_index, make_audio_only, make_clip

__all__ = [
    "BAND", "BITS", "FORMAT_BY_SUFFIX", "ListTakes", "corrupt_payload", "decode_all", "empty", "encode_frames", "frame_image",
    "in_child", "frame_index", "garbage", "indices_of", "io", "make_audio_only", "make_clip", "motion_video", "truncated",
]


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` fraction of ``data`` (a download cut short)."""
    return data[: max(1, int(len(data) * keep))]


def garbage(n: int = 4096, seed: int = 0) -> bytes:
    """Random bytes that no demuxer should accept."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def empty() -> bytes:
    return b""


def decode_all(source: bytes | str | os.PathLike) -> np.ndarray:
    """Reference decoder: every frame in order, uint8 [N, H, W, 3] (what naive code does).

    Stops quietly at the first decoding error (the end of a truncated clip).
    """
    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    frames = []
    with av.open(src) as c:
        try:
            for f in c.decode(video=0):
                frames.append(f.to_ndarray(format="rgb24"))
        except av.FFmpegError:
            pass
    return np.stack(frames)


def corrupt_payload(data: bytes, seed: int = 1) -> bytes:
    """An mp4 whose header is intact but whose media data is random: nothing decodes."""
    start = data.index(b"mdat") + 4
    end = data.index(b"moov") - 4 if data.index(b"moov") > start else len(data)
    return data[:start] + garbage(end - start, seed) + data[end:]


def indices_of(frames: Sequence[np.ndarray] | np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


class ListTakes:
    """The window walk's ``Takes`` over a fixed set of frames (``stadapter.video.window_walk``)."""

    def __init__(self, frames: Iterable[int]) -> None:
        self.sorted = sorted(set(frames))
        self.set = set(self.sorted)

    def __contains__(self, i: object) -> bool:
        return i in self.set

    def first_from(self, i: int) -> int | None:
        k = bisect.bisect_left(self.sorted, i)
        return self.sorted[k] if k < len(self.sorted) else None


_IN_CHILD = """
import json, resource, sys
from stadapter.config import SamplingConfig
from stadapter.video import VideoError, decode_clip, probe
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if sys.argv[2] == "probe":
        probe(sys.argv[1])
    else:
        decode_clip(sys.argv[1], SamplingConfig(num_frames=8, input_size=32))
    msg = ""
except VideoError as e:
    msg = str(e)
print(json.dumps({"grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "error": msg}))
"""


def in_child(path: "os.PathLike | str", what: str = "probe") -> dict:
    """``probe`` (or ``decode``, 8 frames at 32 px) the clip at ``path`` in a fresh Python process: its peak RSS
    growth over the call (``grew_kib``, from ``ru_maxrss``) and the VideoError's message (``error``, empty if none)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _IN_CHILD, os.fspath(path), what], check=True, capture_output=True,
                         text=True, timeout=60)
    return json.loads(out.stdout)


def motion_video(path: "os.PathLike | str", directions: Sequence[str], fps: int = 8, size: int = 64,
                 frames: int = 16, seed: int = 0) -> None:
    """The demo task ``motion``'s kind of video: one ``frames``-long segment per direction (``left``, ``right``,
    ``up``, ``down``), each a shape crossing the frame that way, in order; MPEG-4 Part 2 in an .mp4 file."""
    from pathlib import Path

    from training.synthetic import MOTION_LABELS, draw_motion, encode_mp4

    rng = np.random.default_rng(seed)
    segments = [draw_motion(rng, MOTION_LABELS.index(d), size, frames) for d in directions]
    encode_mp4(np.concatenate(segments), Path(path), fps=fps)
