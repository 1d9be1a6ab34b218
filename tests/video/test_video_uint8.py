"""Views as uint8 crops, normalised later on any device: exactly the float32 model input ``decode_clip`` gives.

The server's decoders hand uint8 crops over (a quarter of the bytes) and the model normalises them on its
device with :func:`normalise_views`; training and ``decode_clip`` use the 256-entry tables of
:func:`level_tables`. A normalised value depends only on its level and channel, so checking all 256 levels of
every channel shows the two agree on every input.
"""

from __future__ import annotations

import media
import numpy as np
import pytest
import torch

from stadapter.config import CLIP_MEAN, CLIP_STD, SamplingConfig
from stadapter.video import decode_clip, decode_clip_array, decode_windows, level_tables, normalise_array, normalise_views

SAMPLING = SamplingConfig(num_frames=4, input_size=32, temporal_views=2, spatial_views=3)
NORMS = [(CLIP_MEAN, CLIP_STD), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
         ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((1.0, 0.0, 0.3), (3.0, 0.01, 7.0))]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def every_level(shape: tuple[int, ...] = (2, 4, 3, 16, 16)) -> torch.Tensor:
    """uint8 frames holding every level 0..255 in every channel, at many positions (vectorised loops too)."""
    n = int(np.prod(shape))
    return torch.from_numpy((np.arange(n) * 7 % 256).astype(np.uint8).reshape(shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mean,std", NORMS)
def test_normalising_on_a_device_equals_the_level_tables_bit_for_bit(device, mean, std):
    frames = every_level()
    assert all(set(frames[:, :, c].unique().tolist()) == set(range(256)) for c in range(3))
    got = normalise_views(frames.to(device), mean, std)
    assert got.dtype == torch.float32 and got.device.type == device
    want = torch.from_numpy(normalise_array(frames.numpy(), mean, std))
    assert torch.equal(got.cpu(), want)
    tables = torch.from_numpy(level_tables(mean, std))
    assert torch.equal(want[0, 0, 1], tables[1][frames[0, 0, 1].long()])  # the table is what each level becomes


@pytest.mark.parametrize("device", DEVICES)
def test_rows_normalise_with_their_own_mean_and_std(device):
    frames = every_level((len(NORMS), 2, 3, 16, 16))
    mean = torch.tensor([m for m, _ in NORMS], dtype=torch.float32).view(-1, 1, 3, 1, 1)
    std = torch.tensor([s for _, s in NORMS], dtype=torch.float32).view(-1, 1, 3, 1, 1)
    got = normalise_views(frames.to(device), mean, std).cpu()
    for row, (m, s) in enumerate(NORMS):
        assert torch.equal(got[row], torch.from_numpy(normalise_array(frames[row].numpy(), m, s)))


def test_float_frames_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        normalise_views(torch.zeros(1, 1, 3, 2, 2), CLIP_MEAN, CLIP_STD)


def test_a_clips_uint8_views_normalise_to_decode_clips_tensor(tmp_path):
    clip = media.make_clip(tmp_path / "a.mp4", 40, size=(72, 48), bframes=2).read_bytes()
    raw = decode_clip_array(clip, SAMPLING, normalised=False)
    assert raw.dtype == np.uint8 and raw.shape == (6, 4, 3, 32, 32)
    assert raw.nbytes * 4 == decode_clip_array(clip, SAMPLING).nbytes
    assert torch.equal(normalise_views(torch.from_numpy(raw), SAMPLING.mean, SAMPLING.std), decode_clip(clip, SAMPLING))


def test_uint8_windows_normalise_to_the_float_windows():
    clip = media.make_clip(num_frames=60, fps=10, gop=12, size=(64, 48))
    cfg = SamplingConfig(num_frames=4, input_size=32)
    floats = list(decode_windows(clip, cfg, 2.0, 1.0))
    raws = list(decode_windows(clip, cfg, 2.0, 1.0, as_array=True, normalised=False))
    assert len(raws) == len(floats) > 1
    for r, f in zip(raws, floats, strict=True):
        assert r.frames.dtype == np.uint8 and r.indices == f.indices
        assert torch.equal(normalise_views(torch.from_numpy(r.frames), cfg.mean, cfg.std), f.frames)
