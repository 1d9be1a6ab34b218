"""Frames travel as uint8 and are normalised while staging, on the model's device: the same model input, bit for
bit, and the same answers as the float32 views of stadapter's eval path (the tensor training validates on).

The decoders hand over uint8 crops (a quarter of the bytes); ``ModelRunner.stage`` normalises them with each
clip's task mean/std (``stadapter.video.normalise_views``). The reference is ``training.frames.eval_views``,
``decode_clip``'s float32, which tests/training/test_train_serve_parity.py holds equal to what training sees.
"""

from __future__ import annotations

import dataclasses

import media
import pytest
import torch
from factories import task_versions

from server.decode.pool import ProcessDecodePool
from server.engine.model import ModelRunner
from server.engine.pipeline import _apply_overrides
from server.engine.slots import AdapterSlots
from server.errors import BadRequest
from stadapter import AdapterConfig
from stadapter.config import SamplingConfig
from stadapter.video import VideoLimits
from training.frames import eval_views

CPU = torch.device("cpu")
SAME = [(AdapterConfig(width=8, pre_attn=True, pre_mlp=True), 5)] * 2


def served(loop, pool: ProcessDecodePool, path, sampling: SamplingConfig) -> torch.Tensor:
    views, _ = loop.run_until_complete(pool.decode(path.read_bytes(), sampling, VideoLimits(), 30.0))
    return views


def with_sampling(tv, sampling: SamplingConfig):
    """``tv`` as a task of another sampling (its mean/std)."""
    return dataclasses.replace(tv, spec=dataclasses.replace(tv.spec, sampling=sampling))


def test_uint8_views_give_the_eval_paths_model_input_and_answers(loop, pool, tiny_trunk, tmp_path):
    (tv,) = task_versions(tiny_trunk, tmp_path, SAME[:1])
    sampling = tv.spec.sampling.replace(temporal_views=2, spatial_views=3)
    tv = with_sampling(tv, sampling)
    clips = [media.make_clip(tmp_path / f"{i}.mp4", 30 + 10 * i, size=(72, 48), bframes=2) for i in range(2)]
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32))
    for path in clips:
        views = served(loop, pool, path, sampling)
        reference = eval_views(path, sampling)  # float32, normalised: decode_clip, as training validates
        assert views.dtype == torch.uint8 and reference.dtype == torch.float32
        staged = runner.stage([(tv, views)])
        assert torch.equal(staged.frames, reference)  # the final model input, bit for bit
        out = runner.run(staged)
        old = runner.forward([(tv, reference)])  # the float32 path the decoders took before
        assert torch.equal(out.probs[0], old.probs[0])
        with torch.no_grad():
            want = tiny_trunk(reference, tv.host_stack).softmax(-1).mean(0)
        torch.testing.assert_close(out.probs[0], want, atol=1e-6, rtol=0)


def test_each_clip_of_a_batch_is_normalised_with_its_tasks_mean_and_std(loop, pool, tiny_trunk, tmp_path):
    t0, t1 = task_versions(tiny_trunk, tmp_path, [(AdapterConfig(width=8, pre_attn=True, layers=1), 5)] * 2)
    other = t1.spec.sampling.replace(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    t1 = with_sampling(t1, other)
    path = media.make_clip(tmp_path / "a.mp4", 24, size=(72, 48))
    a, b = served(loop, pool, path, t0.spec.sampling), served(loop, pool, path, other)
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32))
    staged = runner.stage([(t0, a), (t1, b), (t0, a)])  # one input shared by two clips, another of its own
    try:
        want = torch.cat([eval_views(path, t0.spec.sampling), eval_views(path, other)])
        assert staged.row_input is not None and torch.equal(staged.frames, want)  # rows share the distinct inputs
    finally:
        staged.release()


def test_a_batch_never_mixes_uint8_and_float_inputs(tiny_trunk, tmp_path):
    (tv,) = task_versions(tiny_trunk, tmp_path, SAME[:1])
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32))
    u8, f32 = torch.zeros(1, 4, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 4, 3, 32, 32)
    with pytest.raises(ValueError, match="mixes input dtypes"):
        runner.forward([(tv, u8), (tv, f32)])
    assert runner.forward([(tv, u8)]).clips == 1  # the runner serves on


@pytest.mark.parametrize("field", ["mean", "std"])
def test_a_request_cannot_override_the_normalisation(field):
    """The model normalises with the task's mean/std, so an override of them is refused, not silently ignored."""
    with pytest.raises(BadRequest, match=f"{field} cannot be overridden"):
        _apply_overrides(SamplingConfig(), {field: (0.5, 0.5, 0.5), "num_frames": 4})
    assert _apply_overrides(SamplingConfig(), {"num_frames": 4}).num_frames == 4
