"""Live windows (stadapter.video.live): a stream decoded as its chunks come, the same windows as a whole clip's."""

from __future__ import annotations

import subprocess

import media
import numpy as np
import pytest

from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits, WindowLimits, decode_windows
from stadapter.video.live import decode_live_windows
from stadapter.video.live_input import ChunkReader, chunk_source

CFG = SamplingConfig(num_frames=4, input_size=32, mean=(0, 0, 0), std=(1, 1, 1))
REMUX = {  # ffmpeg arguments that write each growable container to a pipe
    "mpegts": ["-c", "copy", "-f", "mpegts"],
    "matroska": ["-c", "copy", "-f", "matroska"],
    "webm": ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "500k", "-f", "webm"],
    "fmp4": ["-c", "copy", "-f", "mp4", "-movflags", "frag_keyframe+empty_moov"],
    "flv": ["-c", "copy", "-f", "flv"],
}


def remux(mp4: bytes, fmt: str, tmp_path) -> bytes:
    src = tmp_path / "src.mp4"
    src.write_bytes(mp4)
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(src), *REMUX[fmt], "-"], capture_output=True,
                          check=True, timeout=60).stdout


def chunks_of(data: bytes, n: int = 2048) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


def live(data: bytes, window_s=1.0, stride_s=0.5, limits=None, window_limits=None):
    limits, window_limits = limits or VideoLimits(), window_limits or WindowLimits()
    reader = ChunkReader(chunk_source(chunks_of(data)))
    out = []
    for w in decode_live_windows(reader, CFG, window_s, stride_s, limits, window_limits):
        out.append((w, reader.chunks))
    return out, reader


@pytest.fixture(scope="module")
def clip() -> bytes:
    """3 s at 30 fps, 64x48, with B-frames (decoder reordering)."""
    return media.make_clip(num_frames=90, fps=30, bframes=2, gop=15)


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    """20 s at 30 fps, 64x48, every frame costly (a stream of some length)."""
    return media.make_clip(num_frames=600, fps=30, gop=30, pattern="texture")


@pytest.mark.parametrize("fmt", sorted(REMUX))
def test_each_growable_container_gives_the_whole_clip_windows(clip, fmt, tmp_path):
    data = remux(clip, fmt, tmp_path)
    whole = list(decode_windows(data, CFG, 1.0, 0.5, as_array=True, normalised=False))
    got, reader = live(data)
    assert [(w.index, w.start_frame, w.end_frame, w.start_s, w.end_s) for w, _ in got] == \
        [(w.index, w.start_frame, w.end_frame, w.start_s, w.end_s) for w in whole]
    assert len(got) == 5
    for (a, _), b in zip(got, whole, strict=True):
        np.testing.assert_array_equal(a.frames, b.frames)


@pytest.mark.parametrize("fmt", ["mpegts", "matroska"])
def test_windows_come_as_the_bytes_do(long_clip, fmt, tmp_path):
    data = remux(long_clip, fmt, tmp_path)
    got, reader = live(data, window_s=1.0, stride_s=1.0)
    assert len(got) == 20
    assert got[0][1] < reader.chunks / 2  # the first window came before half the stream was read
    assert [c for _, c in got] == sorted(c for _, c in got)


def test_an_mp4_with_its_index_at_the_end_is_refused_with_what_to_do(clip):
    assert clip.index(b"mdat") < clip.index(b"moov")  # the muxer's default: moov written last
    with pytest.raises(VideoError, match=r"index \(moov\) comes at its end.*ClassifyWindows.*frag_keyframe"):
        live(clip)


@pytest.mark.parametrize("fmt", ["mpegts", "matroska", "fmp4", "flv"])
def test_garbage_mid_way_ends_the_stream_after_its_good_windows(long_clip, fmt, tmp_path):
    data = remux(long_clip, fmt, tmp_path)
    half = len(data) // 2
    reader = ChunkReader(chunk_source(chunks_of(data[:half] + media.garbage(300_000) + data[half:])))
    windows = []
    with pytest.raises(VideoError, match="corrupt"):
        for w in decode_live_windows(reader, CFG, 1.0, 0.5):
            windows.append(w.index)
    assert windows == list(range(len(windows))) and len(windows) >= 1


@pytest.mark.parametrize("fmt", ["mpegts", "flv"])
def test_bytes_missing_mid_way_end_the_stream(fmt, tmp_path):
    data = remux(media.make_clip(num_frames=240, fps=30, bframes=0, gop=15, pattern="grey"), fmt, tmp_path)
    cut = data[:len(data) // 4] + data[3 * len(data) // 4:]  # half the stream missing: a 4 s jump
    with pytest.raises(VideoError, match="timestamps jump"):
        live(cut)


def test_a_stream_cut_short_ends_with_its_whole_windows(clip, tmp_path):
    data = remux(clip, "mpegts", tmp_path)
    got, _ = live(data[: len(data) // 2])
    assert 1 <= len(got) < 5


def test_the_defences_of_a_clip_hold(clip, tmp_path):
    data = remux(clip, "mpegts", tmp_path)
    with pytest.raises(VideoError, match="pixels is over the limit of 1000"):
        live(data, limits=VideoLimits(max_pixels=1000))
    with pytest.raises(VideoError, match="not an allowed|allowed containers"):
        live(data, limits=VideoLimits(formats=("matroska",)))
    got = []
    with pytest.raises(VideoError, match="longer than 2 s"):
        for w, _ in live(data, window_limits=WindowLimits(max_duration_s=2.0))[0]:
            got.append(w)
    with pytest.raises(VideoError, match="not a video stream"):
        live(media.garbage(100_000))


def test_a_large_header_before_the_first_packet_is_not_corruption(clip, tmp_path):
    """Matroska attachments (fonts, cover art) come before the first cluster: header, not bytes skipped."""
    (tmp_path / "src.mp4").write_bytes(clip)
    (tmp_path / "font.bin").write_bytes(media.garbage(300_000))
    data = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(tmp_path / "src.mp4"), "-attach",
                           str(tmp_path / "font.bin"), "-metadata:s:t", "mimetype=application/octet-stream", "-c",
                           "copy", "-f", "matroska", "-"], capture_output=True, check=True, timeout=60).stdout
    assert len(data) > 300_000
    got, _ = live(data)
    assert len(got) == 5
