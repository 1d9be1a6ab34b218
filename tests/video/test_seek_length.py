"""A clip whose header gives no duration: a long one is refused after a seek to the limit, not a count to it.

Counting to the limit was Python work per packet: at the default 1-hour limit a 3-hour 16x16 Matroska clip cost
0.35 s of CPU before its refusal. Past a few packets, one seek to the limit's timestamp (C work, its reads capped)
shows a timeline that runs on past it; a seek that lands far past it (a pts jump) shows nothing, and the count goes
on as before.
"""

from __future__ import annotations

import shutil
import subprocess

import av
import pytest

from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits, decode_clip, probe
from stadapter.video.seek_length import CappedReader, ReadCapReached, landing_past_limit

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg (make test installs it)")


def _mkv_from_pipe(tmp_path, name: str, *args: str):
    out = tmp_path / name
    with open(out, "wb") as f:  # written to a pipe, without metadata: Matroska records no duration
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args, "-map_metadata", "-1", "-f",
                        "matroska", "-"], check=True, stdout=f)
    with av.open(str(out)) as c:
        assert not c.duration and not c.streams.video[0].frames, "the clip must come without a duration"
    return out


@pytest.fixture()
def counted(budget_calls):
    return budget_calls("packet")


@needs_ffmpeg
def test_a_timeline_that_runs_past_the_limit_is_refused_after_a_quarter_of_the_count(tmp_path, counted):
    clip = _mkv_from_pipe(tmp_path, "long.mkv", "-f", "lavfi", "-i", "testsrc=size=16x16:rate=25:duration=240",
                          "-c:v", "libx264", "-g", "25")
    for source in (clip, clip.read_bytes()):
        counted.clear()
        with pytest.raises(VideoError, match=r"runs past the limit of 60 s: a seek to it found a frame at 60\.0 s"):
            probe(source, VideoLimits(max_duration_s=60))
        assert len(counted) <= 1500 // 4, f"{len(counted)} packets counted for a limit of 1500 frames"
    assert probe(clip, VideoLimits(max_duration_s=241)).num_frames == 6000  # under the limit: counted, as before


@needs_ffmpeg
def test_a_pts_jump_past_the_limit_is_not_length(tmp_path):
    """The seek lands 1e9 s on, far past the limit: it shows nothing, and the count (100 frames) decides."""
    clip = _mkv_from_pipe(tmp_path, "gap.mkv", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=4", "-vf",
                          r"setpts=PTS+gte(N\,30)*1e9/TB", "-c:v", "libx264", "-g", "10", "-bf", "0")
    limits = VideoLimits(max_duration_s=10)
    assert probe(clip, limits).num_frames == 100
    assert decode_clip(clip, SamplingConfig(num_frames=8, input_size=32), limits).shape == (1, 8, 3, 32, 32)


@needs_ffmpeg
def test_the_seek_reads_no_more_than_its_allowance(tmp_path):
    clip = _mkv_from_pipe(tmp_path, "long.mkv", "-f", "lavfi", "-i", "testsrc=size=16x16:rate=25:duration=240",
                          "-c:v", "libx264", "-g", "25")
    data = clip.read_bytes()

    assert landing_past_limit(data, {}, 0, 0, 60.0, len(data) // 4, 1500, 1500) == 60.0
    # counting had seen a byte per frame: the seek may read 2 * 1500 bytes, far short of the limit's packets
    assert landing_past_limit(data, {}, 0, 0, 60.0, 375, 375, 1500) is None
    reader = CappedReader(data, cap=10)
    assert reader.read(8) == data[:8]
    assert reader.read(8) == data[8:16]
    with pytest.raises(ReadCapReached):
        reader.read(8)
