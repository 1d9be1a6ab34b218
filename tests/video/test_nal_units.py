"""Parameter sets inside packets: the frame size an H.264/HEVC SPS announces is checked before the decoder reads it.

An H.264 stream that switched from 64x64 to 16000x16000 mid-way cost +87 MiB in the decoder before the refusal:
FFmpeg's ``max_pixels`` is checked when the frame is allocated, after the decoder has sized its tables for the
new parameter set. The parser (``stadapter.video.nal_units``) is checked against FFmpeg's own reading of the
same streams: profiles with and without chroma fields, scaling matrices, interlaced coding, odd sizes, HEVC.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import media
import pytest

from stadapter.video.nal_units import H264_SPS, HEVC_SPS, NalScan, h264_sps_size, hevc_sps_size

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg (make test installs it)")


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


def _coded_size(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        cc = c.streams.video[0].codec_context
        return cc.coded_width or frame.width, cc.coded_height or frame.height


def _sps_units(path: Path, hevc: bool) -> list[bytes]:
    data = path.read_bytes()
    out, pos = [], data.find(b"\x00\x00\x01")
    while pos >= 0:
        start = pos + 3
        pos = data.find(b"\x00\x00\x01", start)
        nal = data[start:pos if pos >= 0 else len(data)].rstrip(b"\x00")
        kind = (nal[0] >> 1) & 0x3F if hevc else nal[0] & 0x1F
        if kind == (HEVC_SPS if hevc else H264_SPS):
            out.append(nal)
    return out


H264_CASES = {
    "baseline 100x60": ("100x60", ["-pix_fmt", "yuv420p", "-profile:v", "baseline"]),
    "main 64x48": ("64x48", ["-pix_fmt", "yuv420p", "-profile:v", "main"]),
    "high 4:4:4 with scaling matrices 120x72": ("120x72", ["-pix_fmt", "yuv444p", "-x264-params", "cqm=jvt"]),
    "high 10-bit 96x64": ("96x64", ["-pix_fmt", "yuv420p10le"]),
    "interlaced 128x96": ("128x96", ["-pix_fmt", "yuv420p", "-flags", "+ildct+ilme", "-x264-params", "interlaced=1"]),
}


@needs_ffmpeg
@pytest.mark.parametrize("case", sorted(H264_CASES))
def test_h264_sps_sizes_match_ffmpeg(tmp_path, case):
    size, extra = H264_CASES[case]
    raw = tmp_path / "s.h264"
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size}:rate=25:duration=0.2", "-c:v", "libx264", *extra,
           "-f", "h264", str(raw))
    units = _sps_units(raw, hevc=False)
    assert units
    assert {h264_sps_size(u) for u in units} == {_coded_size(raw)}


@needs_ffmpeg
@pytest.mark.parametrize("size", ["64x64", "200x120"])
def test_hevc_sps_sizes_match_ffmpeg(tmp_path, size):
    raw = tmp_path / "s.hevc"
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size}:rate=25:duration=0.2", "-c:v", "libx265",
           "-x265-params", "log-level=error", "-f", "hevc", str(raw))
    units = _sps_units(raw, hevc=True)
    assert units
    w, h = (int(x) for x in size.split("x"))
    assert {hevc_sps_size(u) for u in units} == {(w, h)}  # HEVC codes in luma samples (min CU multiples)


def test_cut_or_garbage_parameter_sets_are_left_to_the_decoder():
    good = bytes([0x67, 66, 0xC0, 30, 0xF4, 0x0A, 0x0F, 0xD0])  # a baseline SPS of 160x... (cut after the size)
    for n in range(1, len(good)):
        assert h264_sps_size(good[:n]) in (None, h264_sps_size(good))  # no exception, whatever is cut
    assert h264_sps_size(bytes([0x67]) + b"\x00" * 40) is None  # an exp-Golomb prefix longer than any field
    assert hevc_sps_size(bytes([0x42, 0x01, 0x01])) is None
    check = NalScan("h264", bytes([1, 66, 0xC0, 30, 0xFF]))  # avcC: 4-byte lengths
    assert list(check.sps_sizes(b"\x00\x00\x00\x50\x67")) == []  # a length past the packet's end: nothing read


@pytest.fixture(scope="module")
def jump_to_16000(tmp_path_factory) -> Path:
    """One second of 64x64, then two frames of 16000x16000 (a solid colour: 750 KB): raw H.264, two encodes."""
    d = tmp_path_factory.mktemp("jump16")
    parts = []
    for name, source in (("small", "testsrc=size=64x64:rate=25:duration=1"),
                         ("big", "color=c=red:size=16000x16000:rate=25:duration=0.08")):
        parts.append(d / f"{name}.h264")
        ffmpeg("-f", "lavfi", "-i", source, "-c:v", "libx264", "-preset", "ultrafast", "-g", "10", "-bf", "0",
               "-f", "h264", str(parts[-1]))
    both = d / "both.h264"
    both.write_bytes(b"".join(p.read_bytes() for p in parts))
    return both


@needs_ffmpeg
@pytest.mark.parametrize("fmt", ["matroska", "mpegts"])  # length-prefixed units; start codes
def test_a_jump_to_16000x16000_is_refused_before_the_decoder_sizes_its_tables(jump_to_16000, tmp_path, fmt):
    """Before: +87 MiB (the decoder's tables for 1,000,000 macroblocks) in both containers."""
    clip = tmp_path / f"jump.{fmt}"
    ffmpeg("-r", "25", "-i", str(jump_to_16000), "-c", "copy", "-f", fmt, str(clip))
    res = media.in_child(clip, "decode")
    assert "a frame of 16000x16000 is over the limit" in res["error"], res
    assert res["grew_kib"] < 50 * 1024, res


@needs_ffmpeg
def test_mutated_packets_never_raise(tmp_path):
    """Hostile packets reach this parser before the decoder: whatever the bytes, it yields sizes or nothing."""
    import random

    rng = random.Random(20261207)
    raw = tmp_path / "s.h264"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=25:duration=0.2", "-pix_fmt", "yuv420p", "-c:v", "libx264",
           "-f", "h264", str(raw))
    seeds = [u for u in _sps_units(raw, hevc=False)] + [raw.read_bytes()[:400]]
    scans = [NalScan("h264", None), NalScan("h264", bytes([1, 100, 0, 30, 0xFF])), NalScan("hevc", None),
             NalScan("hevc", bytes([1]) + bytes(20) + bytes([0xFF]))]
    for _ in range(20000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randrange(1, len(data) + 1)]
        scan = rng.choice(scans)
        for w, h in scan.sps_sizes(bytes(data)):
            assert w >= 0 and h >= 0
        assert scan.is_reference(bytes(data)) in (True, False, None)
