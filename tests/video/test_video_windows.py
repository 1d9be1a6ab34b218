"""stadapter.video.decode_windows: one front-to-back decode, each window sampled as decode_clip samples a clip."""

from __future__ import annotations

import dataclasses

import media
import numpy as np
import pytest
import torch

from stadapter.config import SamplingConfig
from stadapter.video import DecodeStats, VideoError, VideoLimits, WindowError, WindowLimits, decode_views, decode_windows, plan_windows

# 48x48 frames at input size 48 (no resize, no crop): frame_index() reads the index band back
SAMPLING = SamplingConfig(num_frames=4, input_size=48, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def clip() -> bytes:
    return media.make_clip(num_frames=100, fps=10, gop=12, size=(48, 48))  # 10 s at 10 fps


def shown(frames: torch.Tensor) -> list[list[int]]:
    """The frame index each [V, T, 3, S, S] slot shows (the band read back from the un-normalised crop)."""
    imgs = (frames.permute(0, 1, 3, 4, 2).numpy() * 255).round().astype(np.uint8)
    return [[media.frame_index(f) for f in view] for view in imgs]


def test_windows_equal_decode_views_of_their_frames(clip):
    ws = list(decode_windows(clip, SAMPLING, window_s=2.0, stride_s=1.0))
    assert [w.index for w in ws] == list(range(9))  # starts 0..8 s; the window starting at 9 s would end past 10 s
    for w in ws:
        assert (w.start_frame, w.end_frame) == (10 * w.index, 10 * w.index + 20)
        assert (w.start_s, w.end_s) == pytest.approx((w.index, w.index + 2.0))
        offsets = [[i - w.start_frame for i in v] for v in w.indices]
        assert offsets == [[2, 7, 12, 17]]  # uniform sampling of a 20-frame clip
        assert torch.equal(w.frames, decode_views(clip, w.indices, SAMPLING))
        assert shown(w.frames) == [list(v) for v in w.indices]


def test_stride_mode_and_views_inside_each_window(clip):
    cfg = dataclasses.replace(SAMPLING, mode="stride", stride=3, temporal_views=2, spatial_views=3)
    ws = list(decode_windows(clip, cfg, window_s=2.5, stride_s=2.5))
    assert [(w.start_frame, w.end_frame) for w in ws] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    for w in ws:
        assert w.frames.shape == (6, 4, 3, 48, 48)
        assert torch.equal(w.frames, decode_views(clip, w.indices, cfg))


def test_decoded_once_and_memory_bounded_by_open_windows(clip):
    stats = DecodeStats()
    ws = list(decode_windows(clip, SAMPLING, window_s=2.0, stride_s=0.5, stats=stats))
    assert len(ws) == stats.windows == 17
    assert stats.frames <= 100  # every frame decoded at most once for 17 overlapping windows
    assert stats.packets <= 101
    assert stats.held_max <= 4 * 4  # windows in flight (2 s / 0.5 s) x frames per window, not the clip's 100


def test_windows_come_out_as_they_complete(clip):
    """The first window is given out before the stream is read to the end (a generator, not a list)."""
    stats = DecodeStats()
    first = next(decode_windows(clip, SAMPLING, window_s=1.0, stride_s=1.0, stats=stats))
    assert first.index == 0 and stats.frames < 40


def test_a_long_video_is_not_held_to_the_one_clip_limits():
    long_clip = media.make_clip(num_frames=240, fps=10, gop=30, pattern="grey")  # 24 s
    one_clip = VideoLimits(max_duration_s=10, max_frames_decoded=50, max_decode_seconds=5)
    with pytest.raises(VideoError, match="over the limit of 10 s"):
        from stadapter.video import decode_clip
        decode_clip(long_clip, SAMPLING, one_clip)
    ws = list(decode_windows(long_clip, SAMPLING, 4.0, 4.0, one_clip))
    assert len(ws) == 6
    with pytest.raises(VideoError, match="max_duration_s|over the limit of 20 s"):
        list(decode_windows(long_clip, SAMPLING, 4.0, 4.0, one_clip, WindowLimits(max_duration_s=20)))
    with pytest.raises(VideoError, match="max_windows"):
        list(decode_windows(long_clip, SAMPLING, 4.0, 4.0, one_clip, WindowLimits(max_windows=5)))
    with pytest.raises(VideoError, match="max_frames_decoded"):
        list(decode_windows(long_clip, SAMPLING, 4.0, 4.0, one_clip, WindowLimits(max_frames_decoded=100)))


def test_a_clip_shorter_than_one_window_is_refused_by_name():
    short = media.make_clip(num_frames=15, fps=10)
    with pytest.raises(VideoError, match=r"holds 15 frame\(s\) \(1.50 s at 10 fps\), shorter than one window of 2 s"):
        list(decode_windows(short, SAMPLING, 2.0, 1.0))


def test_a_stream_that_ends_early_has_fewer_windows():
    whole = media.make_clip(num_frames=100, fps=10, gop=12, size=(48, 48), container="matroska")
    cut = media.truncated(whole, 0.6)
    ws = list(decode_windows(cut, SAMPLING, 2.0, 2.0))
    assert 1 <= len(ws) < 5
    for w in ws:
        assert shown(w.frames) == [list(v) for v in w.indices]


@pytest.mark.parametrize("window_s, stride_s, match", [
    (0.0, 1.0, "window_s must be a positive"),
    (2.0, -1.0, "stride_s must be a positive"),
    (float("nan"), 1.0, "window_s must be a positive"),
    (float("inf"), 1.0, "window_s must be a positive"),
    (1.0, 2.0, "longer than window_s"),
    (0.2, 0.2, "shorter than the 4 frames the task's sampling takes"),
    (2.0, 0.05, "shorter than one frame"),
])
def test_bad_window_arguments_are_refused(clip, window_s, stride_s, match):
    with pytest.raises(WindowError, match=match):
        list(decode_windows(clip, SAMPLING, window_s, stride_s))


def test_held_frames_bounded_before_decoding():
    with pytest.raises(WindowError, match="max_held_frames"):
        plan_windows(SAMPLING.replace(num_frames=16), 30.0, 60.0, 0.1, WindowLimits(max_held_frames=512))


def test_garbage_is_a_video_error():
    with pytest.raises(VideoError):
        list(decode_windows(media.garbage(), SAMPLING, 1.0, 1.0))


def test_non_reference_frames_no_window_takes_are_not_decoded():
    """B-frames that no window samples are dropped by the decoder; the windows are those of a full decode."""
    bclip = media.make_clip(num_frames=120, fps=10, gop=12, bframes=3, size=(48, 48))
    stats = DecodeStats()
    ws = list(decode_windows(bclip, SAMPLING, window_s=2.0, stride_s=2.0, stats=stats))
    assert [w.start_frame for w in ws] == [0, 20, 40, 60, 80, 100]
    assert stats.frames < 100  # 120 frames, 24 of them taken: most B-frames never decode
    for w in ws:
        assert torch.equal(w.frames, decode_views(bclip, w.indices, SAMPLING))
        assert shown(w.frames) == [list(v) for v in w.indices]


def test_gop_tails_no_window_takes_are_not_decoded():
    """Sampling that takes the middle of each window (stride mode): the GOPs before and after it are dropped
    undecoded, as the one-clip reader drops them; the windows are those of a full decode."""
    cfg = dataclasses.replace(SAMPLING, mode="stride", stride=2)
    pclip = media.make_clip(num_frames=100, fps=10, gop=10, bframes=0, size=(48, 48))  # every frame a reference
    stats = DecodeStats()
    ws = list(decode_windows(pclip, cfg, window_s=4.0, stride_s=4.0, stats=stats))
    assert [w.start_frame for w in ws] == [0, 40]
    taken = sorted(i for w in ws for v in w.indices for i in v)
    assert max(taken) < 70 and stats.frames < 50  # was 100: every frame of the stream
    for w in ws:
        assert torch.equal(w.frames, decode_views(pclip, w.indices, cfg))


@pytest.mark.parametrize("hole_at", [5, 85])
def test_a_stream_off_the_frame_grid_is_counted(hole_at):
    """Timestamps that skip a slot (variable frame rate): the index is the frame's rank, as the readers count it,
    also where the hole shows only after windows were given out (the walk starts over without repeating them)."""
    pts = [i if i < hole_at else i + 3 for i in range(100)]
    vfr = media.make_clip(num_frames=100, fps=10, gop=12, bframes=2, size=(48, 48), timestamps=pts)
    ws = list(decode_windows(vfr, SAMPLING, window_s=2.0, stride_s=1.0))
    assert [w.index for w in ws] == list(range(9))
    for w in ws:
        assert shown(w.frames) == [list(v) for v in w.indices]


def test_the_walk_forgets_the_slots_behind_it():
    """The grid bookkeeping of a long walk stays as small as a short one's (slots behind the output are dropped)."""
    import io

    import av

    from stadapter.video.limits import Budget
    from stadapter.video.window_walk import WindowWalk

    long_clip = media.make_clip(num_frames=600, fps=30, gop=30, bframes=3, pattern="grey")
    with av.open(io.BytesIO(long_clip)) as c:
        stream = c.streams.video[0]
        walk = WindowWalk(c, stream, 30.0, Budget(WindowLimits().video_limits(VideoLimits())),
                          media.ListTakes(range(0, 600, 7)))
        steps = [(settled, len(walk.seen) + len(walk.fed) + len(walk.maybe_dropped) + len(walk.must_output))
                 for _, settled in walk.walk(lambda f: None)]
    assert steps[-1][0] == 600 and max(size for _, size in steps) < 200
