"""Hostile and odd clips: every refusal is a clean VideoError, cheap, and made before the heavy work.

Clips come from PyAV (tests/media.py) or Debian's ffmpeg (installed by ``make test``; the tests that
need it are skipped where it is missing).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import av
import media
import pytest
from media import make_clip

from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits, decode_clip, decode_frames, keyframes, probe
from stadapter.video import container as video_container
from stadapter.video import limits as video_limits
from stadapter.video import readers as video_readers
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


@needs_ffmpeg
def test_a_huge_frame_is_refused_before_ffmpeg_allocates_it(tmp_path):
    """A 1.6 MB PNG-in-MKV of 16000x16000: av.open decoded its first frame (+600 MB RSS) before the check."""
    big = tmp_path / "big.mkv"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=16000x16000", "-frames:v", "1", "-c:v", "png", str(big))
    res = media.in_child(big)
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
    monkeypatch.setattr(video_limits, "memory_is_short", lambda: True)  # the process really is short of memory
    with pytest.raises(VideoOutOfMemory, match="out of memory"):
        decode_clip(clip, CFG)


def test_decoded_pixels_are_bounded():
    data = make_clip(None, 30, gop=30)
    with pytest.raises(VideoError, match="max_decoded_pixels"):
        decode_clip(data, CFG, VideoLimits(max_decoded_pixels=64 * 48 * 10))
    assert decode_clip(data, CFG, VideoLimits(max_decoded_pixels=64 * 48 * 30)).shape == (1, 4, 3, 32, 32)


def _h264(path: Path, source: str) -> Path:
    """A raw H.264 stream of the lavfi ``source`` (parameter sets in the stream; a solid colour encodes to a few
    hundred KB even at 8000x8000)."""
    ffmpeg("-f", "lavfi", "-i", source, "-c:v", "libx264", "-preset", "ultrafast", "-g", "10", "-bf", "0",
           "-f", "h264", str(path))
    return path


@pytest.fixture(scope="module")
def size_jump(tmp_path_factory) -> Path:
    """One second of 64x64 followed by two frames of 8000x8000: two encodes concatenated (raw H.264)."""
    d = tmp_path_factory.mktemp("jump")
    small = _h264(d / "small.h264", "testsrc=size=64x64:rate=25:duration=1")
    big = _h264(d / "big.h264", "color=c=red:size=8000x8000:rate=25:duration=0.08")
    both = d / "both.h264"
    both.write_bytes(small.read_bytes() + big.read_bytes())
    return both


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["matroska", "flv", "mpegts"])
def test_a_frame_size_that_jumps_mid_stream_is_refused_before_it_is_allocated(size_jump, tmp_path, fmt):
    """The header says 64x64; the second parameter set says 8000x8000. The decoder had no size limit of its own:
    it allocated and decoded the big frames (+145 MB) before the budget saw their size."""
    clip = tmp_path / f"jump.{fmt}"
    ffmpeg("-r", "25", "-i", str(size_jump), "-c", "copy", "-f", fmt, str(clip))
    assert probe(clip).width == 64
    res = media.in_child(clip, "decode")
    assert "a frame of 8000x8000 is over the limit" in res["error"], res
    assert res["grew_kib"] < 50 * 1024, res


@needs_ffmpeg
def test_a_stream_declared_only_by_its_first_packet_is_size_checked_before_it_is_decoded(size_jump, tmp_path):
    """FLV declares its streams with their first packets, so av.open's options never reached the decoder that
    avformat_find_stream_info ran on them: an 8000x8000 frame was decoded in full (+279 MB) before the refusal."""
    big = tmp_path / "big.flv"
    ffmpeg("-r", "25", "-i", str(size_jump.with_name("big.h264")), "-c", "copy", str(big))
    res = media.in_child(big)
    assert "8000x8000" in res["error"] and "over the limit" in res["error"], res
    assert res["grew_kib"] < 50 * 1024, res
    sorenson = tmp_path / "sorenson.flv"  # no size before its first frame decodes: decoded under the limit
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=4000x4000:rate=25:duration=0.04", "-c:v", "flv", str(sorenson))
    res = media.in_child(sorenson)
    assert "over the limit of 9437184 pixels" in res["error"] and res["grew_kib"] < 50 * 1024, res
    small = tmp_path / "small.flv"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=0.4", "-c:v", "flv", str(small))
    assert (probe(small).width, probe(small).height) == (64, 48)


@needs_ffmpeg
def test_a_huge_h264_frame_in_mp4_is_refused_from_the_header(tmp_path):
    """16000x16000 H.264 in MP4: the decoder of avformat_find_stream_info sized its tables (+81 MB) from the
    parameter set before its own max_pixels refused the frame; the size the container declares is checked first."""
    big = tmp_path / "big.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:size=16000x16000:rate=25:duration=0.04", "-c:v", "libx264", "-preset",
           "ultrafast", str(big))
    res = media.in_child(big)
    assert "16000x16000" in res["error"] and res["grew_kib"] < 50 * 1024, res


def _absurd_mp4(atom: bytes, offset: int, value: int) -> bytes:
    """A small MP4 with one field of one table set to ``value``."""
    data = bytearray(make_clip(None, 24, container="mp4", gop=8))
    at = data.index(atom) + offset
    data[at:at + 4] = struct.pack(">I", value)
    return bytes(data)


ABSURD_TABLES = [
    pytest.param(b"stts", 8, 0x1FFFFFF0, id="stts-count"),  # 4 GiB of time-to-sample entries: ENOMEM at open
    pytest.param(b"stsz", 8, 0x3FFFFFF0, id="stsz-size"),  # every sample 1 GiB: ENOMEM when a packet is read
]


@pytest.mark.parametrize("atom,offset,value", ABSURD_TABLES)
def test_a_header_ffmpeg_cannot_allocate_is_a_corrupt_clip_not_out_of_memory(atom, offset, value):
    """FFmpeg answers ENOMEM at once for these 3 KB clips; they were refused as out of memory (RESOURCE_EXHAUSTED,
    which clients retry) although memory was plentiful."""
    with pytest.raises(VideoError, match="it is corrupt: it declares a table, packet or frame too large") as e:
        decode_clip(_absurd_mp4(atom, offset, value), CFG)
    assert not isinstance(e.value, VideoOutOfMemory)


_PRESSED = """
import resource, sys
from stadapter.config import SamplingConfig
from stadapter.video import VideoOutOfMemory, decode_clip
clip = open(sys.argv[1], "rb").read()
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))  # 64 MiB more, no more
try:
    decode_clip(clip, SamplingConfig(num_frames=4, input_size=32))
except VideoOutOfMemory as e:
    print("out of memory:", e)
except Exception as e:
    print("other:", type(e).__name__, e)
"""


def test_ffmpeg_out_of_memory_when_memory_is_really_short_is_out_of_memory(tmp_path):
    """The same ENOMEM in a process that cannot reserve more memory (an address-space limit) is real pressure."""
    clip = tmp_path / "absurd.mp4"
    clip.write_bytes(_absurd_mp4(b"stts", 8, 0x1FFFFFF0))
    out = subprocess.run([sys.executable, "-c", _PRESSED, str(clip)], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("out of memory: cannot open clip: out of memory"), (out.stdout, out.stderr[-2000:])


@needs_ffmpeg
def test_a_stream_that_appears_mid_file_ends_the_demux_cleanly(tmp_path):
    """An MPEG-TS whose second half is another program: PyAV's end-of-stream flush indexed its stream list with
    the new streams and raised IndexError, answered as "IndexError: list index out of range"."""
    a, b = tmp_path / "a.ts", tmp_path / "b.ts"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=25:duration=2", "-c:v", "libx264", "-g", "10", str(a))
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=25:duration=1", "-f", "lavfi", "-i", "sine=d=1",
           "-map", "0", "-map", "1", "-c:v", "libx264", "-c:a", "mp2", "-mpegts_service_id", "7",
           "-mpegts_pmt_start_pid", "0x1500", "-mpegts_start_pid", "0x300", "-output_ts_offset", "2", str(b))
    clip = a.read_bytes() + b.read_bytes()
    assert keyframes(clip) == [0, 10, 20, 30, 40]
    assert decode_frames(clip, [49]).shape == (1, 32, 32, 3)
    with pytest.raises(VideoError, match=r"frame\(s\) 60 did not decode") as e:
        decode_frames(clip, [60])
    assert "Error" not in str(e.value)


def test_errors_from_pyav_never_show_python_class_names(monkeypatch):
    """A demuxer that raises EAGAIN (BlockingIOError) or a Python error mid-file: the message says what happened
    in words ("BlockingIOError: Resource temporarily unavailable" reached clients)."""
    clip = make_clip(None, 24, container="mp4", gop=8)
    for exc, says in ((av.error.BlockingIOError(11, "Resource temporarily unavailable"), "demuxer stopped on corrupt"),
                      (KeyError("x"), "the demuxer or decoder failed on its data")):
        def broken(self, *args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(video_readers.IndexedReader, "run", broken)
        with pytest.raises(VideoError, match=says) as e:
            decode_clip(clip, CFG)
        assert "Error" not in str(e.value), str(e.value)


@needs_ffmpeg
def test_a_long_clip_without_a_duration_is_refused_once_its_count_passes_the_limit(tmp_path, budget_calls):
    """A header with no duration: every packet of the clip was counted before the count was compared with the
    limit (a 10-hour clip cost seconds); the count now stops one frame past the limit."""
    out = tmp_path / "long.mkv"
    with open(out, "wb") as f:  # written to a pipe, without metadata: Matroska records no duration
        ffmpeg("-f", "lavfi", "-i", "testsrc=size=16x16:rate=25:duration=60", "-c:v", "libx264", "-g", "250",
               "-map_metadata", "-1", "-f", "matroska", "-", stdout=f)
    counted = budget_calls("packet")
    with pytest.raises(VideoError, match="more than 50 frames at 25 fps .* over the limit of 2 s"):
        probe(out, VideoLimits(max_duration_s=2))
    assert len(counted) <= 51, f"{len(counted)} packets counted for a limit of 50 frames"
    assert probe(out, VideoLimits(max_duration_s=61)).num_frames == 1500


def test_a_single_gop_over_the_pixel_budget_is_refused_before_it_is_decoded(budget_calls):
    """One keyframe, then 119 frames: reaching the sampled frames means decoding nearly all of them. The budget
    refused only once it had paid for max_decoded_pixels (a 4096x2304 clip: 228 frames, about a second of CPU); the
    keyframes (one demux pass) predict the count and the refusal comes before the first frame."""
    clip = make_clip(None, 120, gop=120, bframes=0)
    decoded = budget_calls("frame")
    cfg = SamplingConfig(num_frames=8, input_size=32)
    with pytest.raises(VideoError, match="max_decoded_pixels"):
        decode_clip(clip, cfg, VideoLimits(max_decoded_pixels=64 * 48 * 40))
    assert decoded == [], f"{len(decoded)} frames decoded before the refusal"
    assert decode_clip(clip, cfg, VideoLimits(max_decoded_pixels=64 * 48 * 120)).shape == (1, 8, 3, 32, 32)
    several = make_clip(None, 120, gop=10, bframes=0)  # keyframes every 10 frames: each sample costs a few
    assert decode_clip(several, cfg, VideoLimits(max_decoded_pixels=64 * 48 * 60)).shape == (1, 8, 3, 32, 32)
