"""stadapter.video.WindowPart: a video's windows split between decoders, each part found by one seek."""

from __future__ import annotations

import media
import pytest
import torch

from stadapter.config import SamplingConfig
from stadapter.video import DecodeStats, WindowPart, decode_windows, readers

SAMPLING = SamplingConfig(num_frames=4, input_size=48, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    return media.make_clip(num_frames=250, fps=5, gop=12, bframes=2, size=(48, 48))  # 50 s at 5 fps


def as_pairs(windows) -> list[tuple[int, int, int, torch.Tensor]]:
    return [(w.index, w.start_frame, w.end_frame, w.frames) for w in windows]


def assert_same(a, b) -> None:
    assert [x[:3] for x in a] == [x[:3] for x in b]
    assert all(torch.equal(x[3], y[3]) for x, y in zip(a, b, strict=True))


def test_share_splits_into_equal_runs_of_at_least_eight_windows():
    assert [WindowPart(j, 2).share(20) for j in range(2)] == [(0, 10), (10, None)]
    assert [WindowPart(j, 3).share(30) for j in range(3)] == [(0, 10), (10, 20), (20, None)]
    assert [WindowPart(j, 2).share(15) for j in range(2)] == [(0, None), None]  # 15 // 8 = one part
    assert WindowPart(0, 4).share(0) == (0, None)  # a header without a frame count: one part reads it all
    assert WindowPart().share(1000) == (0, None)


@pytest.mark.parametrize("index, of", [(2, 2), (-1, 2), (0, 0), (0.5, 2)])
def test_a_part_that_cannot_be_is_refused(index, of):
    with pytest.raises(ValueError, match="0 <= index < of"):
        WindowPart(index, of)


@pytest.mark.parametrize("window_s, stride_s", [(2.0, 2.0), (2.0, 1.0), (1.0, 0.5)])
@pytest.mark.parametrize("of", [2, 3])
def test_the_parts_give_the_whole_videos_windows_each_once(long_clip, window_s, stride_s, of):
    whole_stats = DecodeStats()
    whole = as_pairs(decode_windows(long_clip, SAMPLING, window_s, stride_s, stats=whole_stats))
    parts, stats = [], []
    for j in range(of):
        stats.append(DecodeStats())
        parts.append(as_pairs(decode_windows(long_clip, SAMPLING, window_s, stride_s, stats=stats[-1],
                                             part=WindowPart(j, of))))
    assert all(p for p in parts)
    assert_same([w for p in parts for w in p], whole)
    # each part decodes about its share: the first stops at its end, the last starts after a seek
    assert stats[0].frames < whole_stats.frames * (1 / of + 0.2)
    assert stats[-1].frames < whole_stats.frames * (1 / of + 0.2)


def test_a_part_past_a_short_videos_parts_has_no_window():
    short = media.make_clip(num_frames=100, fps=5, gop=12, size=(48, 48))  # 10 windows of 2 s: one part
    assert list(decode_windows(short, SAMPLING, 2.0, 2.0, part=WindowPart(1, 2))) == []
    assert_same(as_pairs(decode_windows(short, SAMPLING, 2.0, 2.0, part=WindowPart(0, 2))),
                as_pairs(decode_windows(short, SAMPLING, 2.0, 2.0)))


def test_a_stream_shorter_than_its_header_splits_like_the_whole():
    """A cut download: the header's frame count plans the split; the parts still give exactly the windows
    the stream holds (the later part has fewer, or none), with no error."""
    cut = media.truncated(media.make_clip(num_frames=250, fps=5, gop=12, size=(48, 48), container="matroska"), 0.6)
    whole = as_pairs(decode_windows(cut, SAMPLING, 2.0, 2.0))
    split = [w for j in range(2) for w in as_pairs(decode_windows(cut, SAMPLING, 2.0, 2.0, part=WindowPart(j, 2)))]
    assert 1 <= len(whole) < 25
    assert_same(split, whole)


def test_a_seek_that_lands_past_the_part_reads_again_without_it(long_clip, monkeypatch):
    """A container whose index sends the seek too far (after the part's first frame): the part is read again
    front to back, and its windows are the same."""
    seeking = DecodeStats()
    expected = as_pairs(decode_windows(long_clip, SAMPLING, 2.0, 2.0, stats=seeking, part=WindowPart(1, 2)))
    real_seek, sought = readers.IndexedReader.seek, []

    def too_far(self, target: int) -> None:
        sought.append(target)
        real_seek(self, target + 40)

    monkeypatch.setattr(readers.IndexedReader, "seek", too_far)
    stats = DecodeStats()
    got = as_pairs(decode_windows(long_clip, SAMPLING, 2.0, 2.0, stats=stats, part=WindowPart(1, 2)))
    assert len(sought) == 1 and 120 <= sought[0] < 130  # one seek, for window 12 (frames 120-129), then none
    assert_same(got, expected)
    assert stats.packets > seeking.packets + 100  # the second read demuxed from the start ...
    assert stats.frames <= seeking.frames + 2  # ... but decoded no GOP before the part (none holds a taken frame)
