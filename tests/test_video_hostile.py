"""Hostile and odd clips: every refusal is a clean VideoError, cheap, and made before the heavy work.

Clips come from PyAV (tests/media.py) or Debian's ffmpeg (installed by ``make test``; the tests that
need it are skipped where it is missing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest

from media import make_clip
from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits, decode_clip, probe
from stadapter.video import container as video_container
from stadapter.video.limits import VideoOutOfMemory

CFG = SamplingConfig(num_frames=4, input_size=32)
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg (make test installs it)")


def ffmpeg(*args: str, stdout=None) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True, stdout=stdout)


@needs_ffmpeg
@pytest.mark.timeout(60)
def test_a_pts_jump_of_1e9_seconds_costs_no_work_per_timestamp(tmp_path):
    """An 8 KB clip whose pts jump by 1e9 s after frame 30 (no duration in the header): the reader used
    to walk the 2.5e10-slot gap in Python, holding a decode thread for minutes."""
    out = tmp_path / "gap.mkv"
    with open(out, "wb") as f:  # written to a pipe, so Matroska records no duration
        ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=2", "-vf", r"setpts=PTS+gte(N\,30)*1e9/TB",
               "-c:v", "libx264", "-g", "10", "-bf", "0", "-f", "matroska", "-", stdout=f)
    assert out.stat().st_size < 20_000
    # the jump is a hole in the frame grid: the frames are found by counting, as for variable frame rates
    views = decode_clip(out.read_bytes(), SamplingConfig(num_frames=8, input_size=32))
    assert views.shape == (1, 8, 3, 32, 32)


def test_every_prefix_of_a_clip_is_a_clean_error():
    """Cut headers (a stream with no codec parameters raised AttributeError, answered INTERNAL)."""
    data = make_clip(None, 20, container="mp4")
    saw_no_codec = False
    for n in range(16, len(data), 4):
        try:
            probe(data[:n])
        except VideoError as e:
            saw_no_codec |= "no codec parameters" in str(e)
    assert saw_no_codec, "no prefix reached the stream-without-codec-parameters case"


_RSS_PROBE = """
import json, resource, sys
from stadapter.video import VideoError, probe
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    probe(sys.argv[1]); msg = ""
except VideoError as e:
    msg = str(e)
print(json.dumps({"grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "error": msg}))
"""


def _probe_in_child(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], check=True, capture_output=True, text=True,
                         timeout=60)
    return json.loads(out.stdout)


@needs_ffmpeg
def test_a_huge_frame_is_refused_before_ffmpeg_allocates_it(tmp_path):
    """A 1.6 MB PNG-in-MKV of 16000x16000: av.open decoded its first frame (+600 MB RSS) before the check."""
    big = tmp_path / "big.mkv"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=16000x16000", "-frames:v", "1", "-c:v", "png", str(big))
    res = _probe_in_child(big)
    assert "pixels" in res["error"]
    assert res["grew_kib"] < 50 * 1024, res


@needs_ffmpeg
def test_a_thousand_streams_are_not_all_opened(tmp_path):
    many = tmp_path / "many.mkv"
    maps = [a for _ in range(200) for a in ("-map", "0:v")]
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=5:duration=1", *maps, "-c:v", "mpeg4", str(many))
    with pytest.raises(VideoError, match="streams, over the limit of 32"):
        probe(many)
    seen = []
    real_open = av.open

    def spy(*args, **kwargs):
        c = real_open(*args, **kwargs)
        seen.append(len(c.streams))
        return c

    video_container.av.open, saved = spy, video_container.av.open
    try:
        with pytest.raises(VideoError):
            probe(many)
    finally:
        video_container.av.open = saved
    assert seen == [33], "the demuxer should stop creating streams one past the limit"


@needs_ffmpeg
def test_a_refused_container_is_named(tmp_path):
    mxf = tmp_path / "clip.mxf"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=0.4", "-c:v", "mpeg2video", str(mxf))
    with pytest.raises(VideoError, match="MXF, which is not an allowed container"):
        probe(mxf)
    probe(mxf, VideoLimits(formats=("mxf",)))  # allowed when the operator says so


@needs_ffmpeg
def test_the_default_video_stream_is_decoded_not_the_first(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    make_clip(a, 8, size=(64, 48))
    make_clip(b, 8, size=(96, 64))
    both = tmp_path / "both.mkv"
    ffmpeg("-i", str(a), "-i", str(b), "-map", "0:v", "-map", "1:v", "-c", "copy",
           "-disposition:v:0", "0", "-disposition:v:1", "default", str(both))
    assert (probe(both).width, probe(both).height) == (96, 64)


def test_out_of_memory_in_ffmpeg_is_its_own_error(monkeypatch):
    def no_memory(*args, **kwargs):
        raise av.error.MemoryError(12, "Cannot allocate memory")

    clip = make_clip(None, 8)
    monkeypatch.setattr(video_container.av, "open", no_memory)
    with pytest.raises(VideoOutOfMemory, match="out of memory"):
        decode_clip(clip, CFG)


def test_decoded_pixels_are_bounded():
    data = make_clip(None, 30, gop=30)
    with pytest.raises(VideoError, match="max_decoded_pixels"):
        decode_clip(data, CFG, VideoLimits(max_decoded_pixels=64 * 48 * 10))
    assert decode_clip(data, CFG, VideoLimits(max_decoded_pixels=64 * 48 * 30)).shape == (1, 4, 3, 32, 32)
