"""``--quantize auto`` (the default): int8 block linears only on a CPU in bf16, for a trunk at least
``INT8_MIN_WIDTH`` wide, and only when a probe clip's features stay within ``INT8_MAX_ERROR`` of the unquantised
trunk's; the log note says which and why. ``VideoTrunk.pack_int8_within`` is what measures and decides.
"""

from __future__ import annotations

import pytest
import torch

from server.config import INT8_MAX_ERROR, INT8_MIN_WIDTH
from server.engine import quantize
from server.engine.quantize import prepare_served_trunk, probe_clip
from stadapter.factory import arch_record, build_visual
from stadapter.trunk import VideoTrunk
from stadapter.trunk.packed import Int8Block, PackedBlock, packing_available

pytestmark = pytest.mark.skipif(not packing_available(int8=True), reason="this torch build has no oneDNN int8 linear")
CPU = torch.device("cpu")


def wide_trunk(width: int = INT8_MIN_WIDTH, gain: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> VideoTrunk:
    """One block as wide as ``width`` at 32 px (patch 16: 5 tokens a frame). ``gain`` makes four of its MLP's hidden
    units reach that much further (their rows of ``c_fc`` multiplied, their columns of ``c_proj`` divided: nearly the
    same block in float): the far-reaching channels that set an int8 input's scale and leave the others few levels,
    here where no LayerNorm precedes the linear to fold them into."""
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "head_width": 64,
                                           "patch_size": 16, "mlp_ratio": 4.0}}
    torch.manual_seed(0)
    trunk = VideoTrunk(build_visual(cfg, False), arch_record(cfg, False))
    with torch.no_grad():
        for blk in trunk.blocks:
            units = [3, 17, 40, 51]
            blk.mlp.c_fc.weight[units] *= gain
            blk.mlp.c_fc.bias[units] = blk.mlp.c_fc.bias[units].abs() * gain  # on GELU's linear side
            blk.mlp.c_proj.weight[:, units] /= gain
    return trunk.to(dtype)


def test_a_wide_bf16_trunk_on_a_cpu_serves_int8_and_the_note_gives_the_measured_distance():
    trunk = wide_trunk()
    prepared = prepare_served_trunk(trunk, CPU, torch.bfloat16, 1 << 20, "auto")
    assert (prepared.packed, prepared.int8, trunk.int8) == (True, True, True)
    assert all(isinstance(b, Int8Block) for b in trunk.packed)
    assert prepared.note.startswith("block linears in int8 (--quantize auto: the probe clip's features ")
    assert f"% from bfloat16's (limit {100 * INT8_MAX_ERROR:g}%), measured in " in prepared.note
    assert trunk.blocks[0].mlp.c_fc.weight.stride() == (0, 0)  # its own weights given back once int8 was kept


def test_a_trunk_whose_features_int8_moves_too_far_keeps_bf16():
    """Hidden units 1000x the others set the MLP output linear's int8 input scale: the probe sees it and the trunk serves bf16, packed,
    with the same answers as a trunk packed in bf16 from the start."""
    trunk = wide_trunk(gain=1000.0)
    prepared = prepare_served_trunk(trunk, CPU, torch.bfloat16, 1 << 20, "auto")
    assert (prepared.packed, prepared.int8, trunk.int8) == (True, False, False)
    assert type(trunk.packed[0]) is PackedBlock
    assert prepared.note.startswith("block linears in bfloat16 (--quantize auto: the probe clip's features ")
    assert prepared.note.endswith("; --quantize int8 forces it)")
    plain = wide_trunk(gain=1000.0)
    assert prepare_served_trunk(plain, CPU, torch.bfloat16, 1 << 20, "none") == quantize.Prepared(True, False, "")
    clip = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        assert torch.equal(trunk.forward_features(clip), plain.forward_features(clip))


@pytest.mark.parametrize("width, dtype, reason", [
    (INT8_MIN_WIDTH // 2, torch.bfloat16, f"int8 pays from a trunk width of {INT8_MIN_WIDTH}, this trunk's is 256"),
    (INT8_MIN_WIDTH, torch.float32, "int8 serves on a CPU in bfloat16, this is cpu in float32"),
])
def test_auto_says_why_a_trunk_serves_without_int8(width, dtype, reason):
    trunk = wide_trunk(width, dtype=dtype)
    prepared = prepare_served_trunk(trunk, CPU, dtype, 1 << 20, "auto")
    assert (prepared.packed, prepared.int8) == (dtype == torch.bfloat16, False)
    name = str(dtype).removeprefix("torch.")
    assert prepared.note == f"block linears in {name} (--quantize auto: {reason})"


def test_auto_off_the_cpu_and_without_the_ops_serves_without_int8(monkeypatch):
    trunk = wide_trunk()
    assert quantize.why_not_int8(trunk, torch.device("cuda"), torch.bfloat16) == (
        "int8 serves on a CPU in bfloat16, this is cuda in bfloat16")
    monkeypatch.setattr(quantize, "packing_available", lambda int8=False: not int8)
    prepared = prepare_served_trunk(trunk, CPU, torch.bfloat16, 1 << 20, "auto")
    assert (prepared.packed, prepared.int8) == (True, False)
    assert "this torch has no oneDNN int8 linear" in prepared.note


def test_none_and_int8_are_as_asked_whatever_the_width():
    small, wide = wide_trunk(INT8_MIN_WIDTH // 2), wide_trunk()
    assert prepare_served_trunk(small, CPU, torch.bfloat16, 1 << 20, "int8") == quantize.Prepared(
        True, True, "block linears in int8 (--quantize int8)")
    assert prepare_served_trunk(wide, CPU, torch.bfloat16, 1 << 20, "none") == quantize.Prepared(True, False, "")
    assert (small.int8, wide.int8) == (True, False)


def test_the_probe_clip_is_the_same_on_every_start_and_normalised():
    trunk = wide_trunk()
    clip = probe_clip(trunk)
    assert clip.shape == (1, 4, 3, 32, 32) and clip.dtype == torch.float32
    assert torch.equal(clip, probe_clip(trunk))
    assert -2.0 < float(clip.mean()) < 2.0 and float(clip.std()) > 0.3  # CLIP-normalised pictures, not blank
