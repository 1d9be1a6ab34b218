"""stadapter.video: sampling, decoding only the needed frames (pixel-exact), crops, limits, bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from media import (
    corrupt_payload,
    decode_all,
    empty,
    frame_index,
    garbage,
    indices_of,
    make_audio_only,
    make_clip,
    truncated,
)

from stadapter.config import SamplingConfig
from stadapter.video import (
    ClipInfo,
    VideoError,
    VideoLimits,
    crop_offsets,
    decode_clip,
    decode_frames,
    probe,
    sample_indices,
)
from stadapter.video.container import Clip

RAW = lambda f: f.to_ndarray(format="rgb24")  # noqa: E731

# (codec, container, gop, extra make_clip arguments): short and long GOPs, B-frames, offsets
CLIPS = {
    "h264-mp4-gop10": ("libx264", "mp4", 10, {}),
    "h264-mp4-longgop": ("libx264", "mp4", 250, {}),
    "h264-mp4-start-pts": ("libx264", "mp4", 10, {"start_pts": 100}),
    "h264-mkv-gop7": ("libx264", "matroska", 7, {}),
    "h264-ts-gop10": ("libx264", "mpegts", 10, {}),
    "h264-raw": ("libx264", "h264", 10, {}),
    "vp9-webm-gop10": ("libvpx-vp9", "webm", 10, {}),
    "vp9-webm-longgop": ("libvpx-vp9", "webm", 250, {}),
    "mpeg4-avi-bframes": ("mpeg4", "avi", 10, {"bframes": 2}),
    "mpeg4-mkv-longgop": ("mpeg4", "matroska", 250, {"bframes": 2}),
}


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    out = {}
    for name, (codec, fmt, gop, extra) in CLIPS.items():
        out[name] = make_clip(None, num_frames=60, codec=codec, container=fmt, gop=gop, **extra)
    return out


@pytest.fixture(scope="module")
def mp4(clips) -> bytes:
    return clips["h264-mp4-gop10"]


def cfg(**kw) -> SamplingConfig:
    return SamplingConfig(**{"num_frames": 4, "input_size": 48, "mean": (0, 0, 0), "std": (1, 1, 1), **kw})


# ------------------------------------------------------------ sample_indices


def test_uniform_takes_the_middle_of_each_segment():
    c = SamplingConfig(num_frames=8)
    assert sample_indices(80, c) == [5, 15, 25, 35, 45, 55, 65, 75]
    seg = 300 / 8  # the public code: int(seg / 2 + seg * i)
    assert sample_indices(300, c) == [int(seg / 2 + seg * i) for i in range(8)]


def test_uniform_temporal_views_shift_within_segments():
    c = SamplingConfig(num_frames=3, temporal_views=3)
    views = [sample_indices(30, c, v) for v in range(3)]
    assert views == [[1, 11, 21], [5, 15, 25], [8, 18, 28]]


def test_stride_is_centred_and_views_spread_over_the_clip():
    c = SamplingConfig(num_frames=8, mode="stride", stride=16)
    assert sample_indices(300, c) == [93 + 16 * i for i in range(8)]  # span 113, (300-113)//2
    c3 = c.replace(temporal_views=3)
    starts = [sample_indices(300, c3, v)[0] for v in range(3)]
    assert starts == [0, 94, 187]
    assert sample_indices(300, c3, 2)[-1] == 299


def test_short_clips_repeat_frames():
    assert sample_indices(3, SamplingConfig(num_frames=8)) == [0, 0, 0, 1, 1, 2, 2, 2]
    stride = SamplingConfig(num_frames=8, mode="stride", stride=16)
    assert sample_indices(50, stride) == [0, 16, 32, 48, 49, 49, 49, 49]
    assert sample_indices(1, stride) == [0] * 8


def test_sample_indices_properties():
    rng = random.Random(0)
    for _ in range(300):
        c = SamplingConfig(num_frames=rng.randint(1, 16), mode=rng.choice(["uniform", "stride"]),
                           stride=rng.randint(1, 8), temporal_views=rng.randint(1, 4))
        n = rng.randint(1, 400)
        for v in range(c.temporal_views):
            idx = sample_indices(n, c, v)
            assert len(idx) == c.num_frames and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n


def test_sample_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_frames_total"):
        sample_indices(0, SamplingConfig())
    with pytest.raises(ValueError, match="temporal_view"):
        sample_indices(10, SamplingConfig(temporal_views=2), 2)


# ------------------------------------------------ exact frames, fewer decoded


@pytest.mark.parametrize("name", list(CLIPS))
def test_decoded_frames_equal_decoding_everything(clips, name):
    """Seeking, GOP skipping and non-reference dropping return the naive decoder's pixels."""
    data = clips[name]
    ref = decode_all(data)
    assert indices_of(ref) == list(range(60))
    rng = random.Random(name)
    sets = [[0], [59], [5, 25, 45], [9, 10, 11, 12], sorted(rng.sample(range(60), 7))]
    for needed in sets:
        for seek_gap in (0, 4, None):  # seek at every chance / at gaps > 4 / default
            with Clip(data, VideoLimits()) as clip:
                got, res = clip.read(needed, RAW, seek_gap=seek_gap)
            assert sorted(got) == needed, (needed, seek_gap)
            for i in needed:
                assert np.array_equal(got[i], ref[i]), (name, needed, seek_gap, i, frame_index(got[i]))
    out = decode_frames(data, [44, 3, 3, 17])
    assert out.dtype == np.uint8 and out.shape == (4, 48, 64, 3)
    assert np.array_equal(out, ref[[44, 3, 3, 17]])


@pytest.mark.parametrize("name", ["h264-mp4-gop10", "h264-mkv-gop7", "vp9-webm-gop10"])
def test_seeks_happen_and_stay_exact(clips, name):
    ref = decode_all(clips[name])
    with Clip(clips[name], VideoLimits()) as clip:
        got, res = clip.read([2, 30, 58], RAW, seek_gap=8)
    assert res.seeks >= 1 and not res.sequential
    assert all(np.array_equal(got[i], ref[i]) for i in (2, 30, 58))


def test_only_needed_gops_are_decoded(mp4):
    with Clip(mp4, VideoLimits()) as clip:
        got, res = clip.read([5, 25, 45], RAW)
    assert res.decoded <= 3 * 10 and not res.sequential  # GOP 10: at most the start of 3 GOPs
    with Clip(mp4, VideoLimits()) as clip:
        got, res = clip.read([3], RAW)
    assert res.decoded <= 4  # stops after the last needed frame


def test_variable_frame_rate_falls_back_to_counting():
    for fmt in ("mp4", "matroska"):
        data = make_clip(None, 30, container=fmt, timestamps=[i + (i >= 10) for i in range(30)])
        ref = decode_all(data)
        with Clip(data, VideoLimits()) as clip:
            got, res = clip.read([3, 20, 29], RAW)
        assert res.sequential
        assert all(np.array_equal(got[i], ref[i]) for i in (3, 20, 29))


# ----------------------------------------------------------- decode_clip


def test_decode_clip_shape_dtype_and_normalisation(mp4):
    c = SamplingConfig(num_frames=4, input_size=32)
    x = decode_clip(mp4, c)
    assert x.shape == (1, 4, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    plain = decode_clip(mp4, c.replace(mean=(0, 0, 0), std=(1, 1, 1)))
    assert 0.0 <= float(plain.min()) and float(plain.max()) <= 1.0
    mean, std = torch.tensor(c.mean).view(3, 1, 1), torch.tensor(c.std).view(3, 1, 1)
    assert torch.allclose(x, (plain - mean) / std, atol=1e-5)


def test_decode_clip_views_and_crops_are_the_right_slices(mp4):
    """Short side 48 = frame height: no resize, so the crops are exact slices of the frames."""
    ref = decode_all(mp4)
    c = cfg(temporal_views=2, spatial_views=3)
    x = decode_clip(mp4, c)
    assert x.shape == (6, 4, 3, 48, 48)
    got = (x * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for v in range(2):
        idx = sample_indices(60, c, v)
        for k, left in enumerate((0, 8, 16)):  # start / centre / end along the width
            assert np.array_equal(got[v * 3 + k], ref[idx, :, left : left + 48]), (v, k)
    assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[1], got[2])


def test_crops_run_along_the_long_side():
    assert crop_offsets(48, 64, 48, 3) == [(0, 0), (0, 8), (0, 16)]
    assert crop_offsets(64, 48, 48, 3) == [(0, 0), (8, 0), (16, 0)]
    assert crop_offsets(64, 48, 32, 1) == [(16, 8)]
    portrait = make_clip(None, 12, size=(48, 64), gop=4)
    ref = decode_all(portrait)
    x = decode_clip(portrait, cfg(num_frames=2, spatial_views=3))
    got = (x * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    idx = sample_indices(12, cfg(num_frames=2))
    for k, top in enumerate((0, 8, 16)):
        assert np.array_equal(got[k], ref[idx, top : top + 48]), k


def test_decode_clip_resizes_the_short_side_bicubic(mp4):
    ref = decode_all(mp4)
    for c, size in ((cfg(input_size=32), (32, 43)), (cfg(input_size=32, resize=40), (40, 53))):
        x = decode_clip(mp4, c)
        assert x.shape == (1, 4, 3, 32, 32)
        idx = sample_indices(60, c)
        frames = torch.from_numpy(ref[idx]).permute(0, 3, 1, 2).float()
        expect = torch.nn.functional.interpolate(frames, size=size, mode="bicubic").clamp(0, 255) / 255
        top, left = (size[0] - 32) // 2, (size[1] - 32) // 2
        expect = expect[..., top : top + 32, left : left + 32]
        assert float((x[0] - expect).abs().mean()) < 0.03  # swscale vs torch kernels differ a little


def test_bytes_and_path_sources_agree(tmp_path):
    path = make_clip(tmp_path / "clip.webm", 30, codec="libvpx-vp9", gop=8)
    data = path.read_bytes()
    c = cfg(temporal_views=2)
    assert torch.equal(decode_clip(path, c), decode_clip(data, c))
    assert torch.equal(decode_clip(str(path), c), decode_clip(bytearray(data), c))
    assert np.array_equal(decode_frames(path, [4, 20]), decode_frames(memoryview(data), [4, 20]))
    assert probe(path) == probe(data)


def test_probe_reports_the_header(clips):
    info = probe(clips["h264-mp4-gop10"])
    assert info == ClipInfo(60, 30.0, 2.0, 64, 48, "h264", info.container) and "mp4" in info.container
    webm = probe(clips["vp9-webm-gop10"])  # no frame count in the header: duration * fps
    assert (webm.num_frames, webm.codec, webm.container) == (60, "vp9", "matroska,webm")
    assert probe(clips["h264-raw"]).num_frames == 60  # no duration either: packets counted


# ------------------------------------------------------------ bad input


def test_video_error_is_a_value_error():
    assert issubclass(VideoError, ValueError)


@pytest.mark.parametrize("data, message", [
    (garbage(), "not a readable video"),
    (empty(), "empty"),
    (make_audio_only(), r"no video stream \(streams: 1 audio\)"),
    (truncated(make_clip(None, 30), 0.6), "not a readable video"),  # mp4 index (moov) is at the end
    (corrupt_payload(make_clip(None, 30)), "no decodable video frames"),
])
def test_bad_clips_raise_video_error(data, message):
    for call in (lambda: decode_clip(data, cfg()), lambda: decode_frames(data, [0])):
        with pytest.raises(VideoError, match=message):
            call()


def test_truncated_clip_is_resampled_or_refused():
    """decode_clip re-samples over the frames that exist; decode_frames refuses missing ones."""
    data = truncated(make_clip(None, 60, codec="libvpx-vp9", container="webm", gop=10), 0.5)
    ref = decode_all(data)
    n = len(ref)
    assert 10 < n < 60 and probe(data).num_frames == 60
    x = decode_clip(data, cfg())
    got = (x[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, ref[sample_indices(n, cfg()), :, 8:56])
    assert np.array_equal(decode_frames(data, [n - 1]), ref[[n - 1]])
    with pytest.raises(VideoError, match=rf"decoded 1 of 2 needed frames: frame\(s\) 59 .* ends after frame {n - 1}"):
        decode_frames(data, [0, 59])


@pytest.mark.parametrize("limits, message", [
    (VideoLimits(max_bytes=1000), "bytes, over the limit of 1000"),
    (VideoLimits(max_duration_s=0.5), r"2.0 s long, over the limit of 0.5 s"),
    (VideoLimits(max_pixels=64 * 47), "64x48 = 3072 pixels is over the limit"),
    (VideoLimits(max_frames_decoded=5), "more than 5 decoded frames"),
    (VideoLimits(max_streams=1), "2 streams, over the limit of 1"),
    (VideoLimits(max_packets=10), "more than 10 packets"),
    (VideoLimits(formats=("avi",)), r"allowed containers: avi"),
    (VideoLimits(max_output_frames=7), r"1 view\(s\) x 8 frames = 8 frames, over the limit of 7"),
])
def test_limits_are_enforced(limits, message):
    data = make_clip(None, 60, gop=10, audio=True)
    with pytest.raises(VideoError, match=message):
        decode_clip(data, SamplingConfig(num_frames=8, input_size=32), limits)


def test_many_views_are_refused_before_any_work():
    """Views x frames bounds the output tensor (each view holds its own copy of its frames)."""
    huge = SamplingConfig(num_frames=512, temporal_views=10**9, spatial_views=3, input_size=32)
    with pytest.raises(VideoError, match=r"3000000000 view\(s\) x 512 frames = 1536000000000 frames, over the limit of 1024"):
        decode_clip(b"not even a video", huge)
    data = make_clip(None, 60, gop=10)
    assert decode_clip(data, SamplingConfig(num_frames=8, temporal_views=128, input_size=32)).shape == (128, 8, 3, 32, 32)


def test_playlists_and_urls_are_not_followed(tmp_path):
    make_clip(tmp_path / "seg.ts", 10)
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{tmp_path / 'seg.ts'}\n#EXT-X-ENDLIST\n")
    with pytest.raises(VideoError, match="HLS playlist, which is not an allowed container"):
        probe(playlist)
    with pytest.raises(VideoError):
        probe("http://127.0.0.1:9/clip.mp4")
    with pytest.raises(VideoError, match="No such file"):
        probe(tmp_path / "missing.mp4")


def test_bad_arguments():
    with pytest.raises(ValueError, match=">= 0"):
        decode_frames(b"x", [-1])
    with pytest.raises(ValueError, match="max_pixels"):
        VideoLimits(max_pixels=0)


def test_bench_runs_and_matches_the_naive_path(capsys):
    """bench/decode.py on a tiny clip: decode_clip's output equals decode-everything-then-index."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).resolve().parents[2] / "bench" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--repeats", "1", "--seconds", "1", "--size", "96x64", "--gop", "8"])
    for content in ("texture", "pan"):
        assert result["content"][content]["max_abs_diff_vs_naive"] == 0.0
        assert result["content"][content]["speedup"] > 0
