"""Synthetic clips, encoded for real: for tests, benchmarks and anyone checking a decoder.

:func:`encode_frames` turns uint8 RGB frames into an encoded clip (bytes, or a file whose
suffix names the container). :func:`make_clip` encodes frames drawn by :func:`frame_image`:
with the ``bits`` pattern every frame carries its own index as a row of black/white
blocks (8 bits, most significant first) across the top band, so a caller can read back
*which* frame a decoder returned (:func:`frame_index`); below the band a diagonal
gradient moves with the index, so encoders produce real inter frames rather than copies.

Only PyAV and numpy are used; nothing here keeps state beyond a small cache of the
``pan`` scene.
"""

from __future__ import annotations

import functools
import io
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Literal, Mapping, Optional, Sequence, overload

import av
import numpy as np

BITS = 8
BAND = 16  # rows of the index band

Pattern = Literal["bits", "grey", "texture", "pan"]
FORMAT_BY_SUFFIX = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".ts": "mpegts", ".mov": "mov"}


def frame_image(index: int, size: tuple[int, int] = (64, 48), pattern: str = "bits") -> np.ndarray:
    """uint8 [H, W, 3] picture of frame ``index``; ``size`` is (width, height).

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
        raise ValueError(f"unknown pattern {pattern!r} (expected bits, grey, texture or pan)")
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
    """Read back the index written by :func:`frame_image` (``bits`` pattern) from a decoded RGB frame."""
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


def _container_format(path: Optional[str | os.PathLike], container: Optional[str]) -> str:
    if container:
        return container
    if path is None:
        return "mp4"
    fmt = FORMAT_BY_SUFFIX.get(Path(path).suffix)
    if fmt is None:
        raise ValueError(f"cannot tell the container of {path}; pass container=")
    return fmt


@overload
def encode_frames(frames: Iterable[np.ndarray], path: None = None, *, fps: int = ..., codec: str = ...,
                  container: Optional[str] = ..., options: Optional[Mapping[str, str]] = ..., gop: Optional[int] = ...,
                  bframes: Optional[int] = ..., timestamps: Optional[Sequence[int]] = ..., threads: Optional[int] = ...,
                  audio: bool = ...) -> bytes: ...
@overload
def encode_frames(frames: Iterable[np.ndarray], path: str | os.PathLike, *, fps: int = ..., codec: str = ...,
                  container: Optional[str] = ..., options: Optional[Mapping[str, str]] = ..., gop: Optional[int] = ...,
                  bframes: Optional[int] = ..., timestamps: Optional[Sequence[int]] = ..., threads: Optional[int] = ...,
                  audio: bool = ...) -> Path: ...
def encode_frames(
    frames: Iterable[np.ndarray],
    path: Optional[str | os.PathLike] = None,
    *,
    fps: int = 30,
    codec: str = "libx264",
    container: Optional[str] = None,
    options: Optional[Mapping[str, str]] = None,
    gop: Optional[int] = None,
    bframes: Optional[int] = None,
    timestamps: Optional[Sequence[int]] = None,
    threads: Optional[int] = None,
    audio: bool = False,
) -> bytes | Path:
    """Encode uint8 RGB frames [H, W, 3] (all of one size) as one video stream, frame i at pts ``timestamps[i]``.

    Args:
        frames: the pictures, in display order.
        path: write this file (container from its suffix unless ``container``) and return it;
            None returns the bytes (container ``container``, default mp4).
        fps: frame rate; pts and the codec's time base are in units of 1/fps.
        codec: FFmpeg encoder name (``libx264``, ``mpeg4``, ``libvpx`` ...).
        options: encoder options, passed as they are.
        gop: keyframe interval (None = encoder default); ``bframes``: B-frames (None = encoder default).
        timestamps: pts of every frame in 1/fps units (default 0, 1, 2, ...), e.g. with holes
            for a variable-frame-rate clip.
        threads: encoder threads (None = FFmpeg's choice; 1 makes some encoders deterministic).
        audio: add a mono AAC tone as long as the video.
    """
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("encode_frames needs at least one frame")
    target: io.BytesIO | str = io.BytesIO() if path is None else str(path)
    time_base = Fraction(1, fps)
    count = 0
    with av.open(target, mode="w", format=_container_format(path, container)) as out:
        stream = out.add_stream(codec, rate=fps, options=dict(options or {}))
        if not isinstance(stream, av.VideoStream):
            raise ValueError(f"{codec!r} is not a video encoder")
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        if threads is not None:
            stream.codec_context.thread_count = threads
        stream.codec_context.time_base = time_base
        a_stream = out.add_stream("aac", rate=8000) if audio else None
        for i, img in enumerate(_chain(first, it)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = timestamps[i] if timestamps is not None else i
            frame.time_base = time_base
            out.mux(stream.encode(frame))
            count += 1
        out.mux(stream.encode(None))
        if a_stream is not None:
            _write_tone(out, a_stream, count / fps)
    return target.getvalue() if isinstance(target, io.BytesIO) else Path(target)


def _chain(first: np.ndarray, rest: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    yield first
    yield from rest


def make_clip(
    path: Optional[str | os.PathLike] = None,
    num_frames: int = 30,
    fps: int = 30,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    container: Optional[str] = None,
    gop: int = 10,
    bframes: Optional[int] = None,
    pattern: str = "bits",
    start_pts: int = 0,
    timestamps: Optional[Sequence[int]] = None,
    audio: bool = False,
) -> bytes | Path:
    """Encode a clip whose frame i shows :func:`frame_image(i) <frame_image>`.

    Returns the bytes when ``path`` is None (container format from ``container``,
    default mp4), else writes ``path`` (format from its suffix) and returns it.
    ``gop``: keyframe interval (libx264 without scene-cut keyframes, so exactly every
    ``gop`` frames); ``bframes``: B-frames (None = encoder default); ``start_pts``: pts
    of the first frame in units of 1/fps; ``timestamps``: the pts of every frame (1/fps
    units), e.g. with holes for a variable-frame-rate clip.
    """
    options: dict[str, str] = {"x264-params": "scenecut=0"} if codec == "libx264" else {}
    if codec == "libx265":
        options = {"x265-params": "log-level=error"}
    if codec.startswith("libvpx"):
        options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    pts = timestamps if timestamps is not None else range(start_pts, start_pts + num_frames)
    pictures = (frame_image(i, size, pattern) for i in range(num_frames))
    return encode_frames(pictures, path, fps=fps, codec=codec, container=container, options=options, gop=gop,
                         bframes=bframes, timestamps=pts, audio=audio)


def _write_tone(out: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
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


def make_audio_only(path: Optional[str | os.PathLike] = None, seconds: float = 0.5) -> bytes | Path:
    """An m4a/mp4 with a single AAC stream and no video."""
    target: io.BytesIO | str = io.BytesIO() if path is None else str(path)
    with av.open(target, mode="w", format="mp4") as out:
        _write_tone(out, out.add_stream("aac", rate=8000), seconds)
    return target.getvalue() if isinstance(target, io.BytesIO) else Path(target)
