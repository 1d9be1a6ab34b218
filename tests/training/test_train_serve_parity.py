"""Training sees clips exactly as serving does: the same eval tensor, the same handling of short clips."""

from __future__ import annotations

import media
import pytest
import torch

from stadapter.config import SamplingConfig
from stadapter.video import VideoError, decode_clip, decode_frames, probe
from training.data import BrokenVideoError, Sample, VideoDataset
from training.transforms import AugmentConfig

SAMPLING = SamplingConfig(num_frames=4, input_size=32, temporal_views=2, spatial_views=3)


def _cut(path, keep: float):
    data = path.read_bytes()
    path.write_bytes(media.truncated(data, keep))
    return path


def test_the_training_eval_tensor_is_the_serving_tensor(tmp_path):
    clip = media.make_clip(tmp_path / "a.mp4", 40, size=(72, 48), bframes=2)
    ds = VideoDataset([Sample(clip, 0)], SAMPLING, train=False)
    frames, label, broken = ds[0]
    served = decode_clip(clip.read_bytes(), SAMPLING)
    assert broken == "" and label == 0
    assert (frames - served).abs().max().item() == 0.0


@pytest.mark.parametrize("container,codec", [("matroska", "libx264"), ("webm", "libvpx-vp9")])
@pytest.mark.parametrize("cache", [False, True])
def test_a_cut_clip_that_serving_accepts_is_not_dropped_by_training(tmp_path, container, codec, cache):
    suffix = ".mkv" if container == "matroska" else ".webm"
    path = _cut(media.make_clip(tmp_path / f"a{suffix}", 60, container=container, codec=codec, gop=10), 0.6)
    n = probe(path).num_frames
    decode_clip(path.read_bytes(), SAMPLING)  # serving classifies it
    with pytest.raises(VideoError):  # the header promises frames the stream does not hold
        decode_frames(path, [n - 1])
    ds = VideoDataset([Sample(path, 1)], SAMPLING, train=True, aug=AugmentConfig(mode="none"), cache=cache)
    for epoch in range(3):
        ds.set_epoch(epoch)
        x, label, broken = ds[0]
        assert broken == "" and label == 1 and x.shape == (4, 3, 32, 32)
    assert not ds.broken
    frames, _, broken = VideoDataset([Sample(path, 1)], SAMPLING, train=False)[0]
    assert broken == "" and torch.equal(frames, decode_clip(path.read_bytes(), SAMPLING))


def test_a_clip_with_no_frames_is_still_broken(tmp_path):
    path = tmp_path / "bad.mp4"
    path.write_bytes(media.garbage())
    ds = VideoDataset([Sample(path, 0)], SAMPLING, train=True)
    with pytest.raises(BrokenVideoError, match="cannot decode"):
        ds[0]
