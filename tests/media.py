"""Tiny synthetic clips for the video tests and the decode benchmark.

Every frame carries its own index as a row of black/white blocks (8 bits, most
significant first) across the top band, so a test can read back *which* frame a
decoder returned (:func:`frame_index`). Below the band a diagonal gradient moves
with the index, so encoders produce real inter frames rather than copies.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Sequence

import av
import numpy as np

BITS = 8
BAND = 16  # rows of the index band

FORMAT_BY_SUFFIX = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".ts": "mpegts", ".mov": "mov"}


def frame_image(index: int, size: tuple[int, int] = (64, 48), pattern: str = "bits") -> np.ndarray:
    """uint8 [H, W, 3] picture of frame ``index``.

    ``bits``: index as blocks in the top band + a moving gradient below.
    ``grey``: a flat grey level that grows with the index (index 0 black).
    ``texture``: moving colour gradients + fresh noise in every frame: inter frames
    cost nearly as many bits as keyframes (for benchmarks; no index band).
    ``pan``: a camera panning over one fixed noisy scene: inter frames are cheap and
    keyframes hold most of the bits, as in most real footage (benchmarks; no index band).
    """
    w, h = size
    if pattern == "grey":
        return np.full((h, w, 3), min(255, 8 * index), np.uint8)
    if pattern == "texture":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin((xx + 3 * index) / 17.0), np.cos((yy - 2 * index) / 13.0),
                         np.sin((xx + yy + 5 * index) / 29.0)], axis=-1) * 80 + 128
        noise = np.random.default_rng(index).normal(0, 12, (h, w, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8)
    if pattern == "pan":
        scene = _scene(h + 48, w + 4 * 512)
        top, left = 24 + int(20 * np.sin(index / 20)), 2 * (index % 1024)
        return np.ascontiguousarray(scene[top : top + h, left : left + w])
    if pattern != "bits":
        raise ValueError(f"unknown pattern {pattern!r}")
    if index >= 2**BITS:
        raise ValueError(f"the 'bits' pattern holds indices < {2**BITS}, got {index}")
    if w < BITS * 4 or h < BAND + 8:
        raise ValueError(f"size {size} is too small for the 'bits' pattern")
    img = np.empty((h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    img[...] = ((xx * 4 + yy * 2 + index * 6) % 160 + 48).astype(np.uint8)[..., None]
    img[..., 1] //= 2
    block = w // BITS
    for b in range(BITS):
        on = (index >> (BITS - 1 - b)) & 1
        img[:BAND, b * block : (b + 1) * block] = 255 if on else 0
    return img


def frame_index(rgb: np.ndarray) -> int:
    """Read back the index written by :func:`frame_image` (``bits`` pattern)."""
    h, w = rgb.shape[:2]
    block = w // BITS
    band = rgb[2 : BAND - 2].astype(np.float32).mean(axis=2)
    value = 0
    for b in range(BITS):
        level = band[:, b * block + 2 : (b + 1) * block - 2].mean()
        value = (value << 1) | int(level > 127)
    return value


@functools.lru_cache(maxsize=4)
def _scene(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / 37), np.cos(yy / 23), np.sin((xx + yy) / 51)], axis=-1) * 70 + 128
    noise = np.random.default_rng(0).normal(0, 20, (h, w, 3))
    scene = np.clip(base + noise, 0, 255).astype(np.uint8)
    scene.setflags(write=False)
    return scene


def make_clip(
    path: str | os.PathLike | None = None,
    num_frames: int = 30,
    fps: int = 30,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    container: str | None = None,
    gop: int = 10,
    bframes: int | None = None,
    pattern: str = "bits",
    start_pts: int = 0,
    timestamps: Sequence[int] | None = None,
    audio: bool = False,
) -> bytes | Path:
    """Encode a clip whose frame i shows :func:`frame_image(i)`.

    Returns the bytes when ``path`` is None (container format from ``container``,
    default mp4), else writes ``path`` (format from its suffix) and returns it.
    ``gop``: keyframe interval; ``bframes``: B-frames (None = encoder default);
    ``start_pts``: pts of the first frame in units of 1/fps; ``timestamps``: the pts
    of every frame (1/fps units), e.g. with holes for a variable-frame-rate clip.
    """
    fmt = container or (FORMAT_BY_SUFFIX.get(Path(path).suffix) if path is not None else "mp4")
    if fmt is None:
        raise ValueError(f"cannot tell the container of {path}; pass container=")
    target: io.BytesIO | str = io.BytesIO() if path is None else str(path)
    with av.open(target, mode="w", format=fmt) as out:
        options = {"x264-params": "scenecut=0"} if codec == "libx264" else {}
        if codec.startswith("libvpx"):
            options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        from fractions import Fraction

        stream.codec_context.time_base = Fraction(1, fps)
        a_stream = out.add_stream("aac", rate=8000) if audio else None
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, size, pattern), format="rgb24")
            frame.pts = timestamps[i] if timestamps is not None else start_pts + i
            frame.time_base = Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if a_stream is not None:
            _write_tone(out, a_stream, num_frames / fps)
    return target.getvalue() if isinstance(target, io.BytesIO) else Path(target)


def _write_tone(out: av.container.OutputContainer, stream, seconds: float) -> None:
    rate = stream.codec_context.sample_rate
    samples = np.sin(np.arange(int(rate * seconds)) * 2 * np.pi * 440 / rate).astype(np.float32) * 0.2
    step = stream.codec_context.frame_size or 1024
    for start in range(0, len(samples), step):
        chunk = samples[start : start + step]
        if len(chunk) < step:
            chunk = np.pad(chunk, (0, step - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def make_audio_only(path: str | os.PathLike | None = None, seconds: float = 0.5) -> bytes | Path:
    """An m4a/mp4 with a single AAC stream and no video."""
    target: io.BytesIO | str = io.BytesIO() if path is None else str(path)
    with av.open(target, mode="w", format="mp4") as out:
        _write_tone(out, out.add_stream("aac", rate=8000), seconds)
    return target.getvalue() if isinstance(target, io.BytesIO) else Path(target)


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
