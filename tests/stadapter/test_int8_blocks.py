"""``--quantize int8``: a bf16 trunk on the CPU whose block linears multiply in int8 (``Int8Linear``, packed by
``VideoTrunk.pack_for_cpu(int8=True)``, which the server's ``prepare_trunk`` applies).

Each linear is the product of its dequantised input and weight (nothing else moves it), the trunk's answers stay
those of the float32 trunk within quantisation, and a start that cannot run int8 is refused with the reason.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from server.engine.model import ModelRunner, prepare_trunk
from server.engine.slots import AdapterSlots
from server.registry.registry import TaskRegistry
from stadapter import load_trunk
from stadapter.trunk import packed
from stadapter.trunk.packed import Int8Block, Int8Linear, packing_available

pytestmark = pytest.mark.skipif(not packing_available(int8=True), reason="this torch build has no oneDNN int8 linear")
CPU = torch.device("cpu")


def _weights(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)
    return w.bfloat16(), (torch.randn(out_features, generator=g) / 10).bfloat16()


def _dequantised_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """What Int8Linear computes, in float64: symmetric int8 of the input (one scale; the input scaled in its own
    dtype, bf16, then rounded) and of each weight row."""
    xs = float(x.float().abs().max()) / 127
    qx = (x * (1 / xs)).round().double()
    assert float(qx.abs().max()) == 127
    ws = w.double().abs().amax(dim=1, keepdim=True) / 127
    qw = torch.round(w.double() / ws).clamp(-127, 127)
    out = (qx * xs) @ (qw * ws).T
    return out if b is None else out + b.double()


@pytest.mark.parametrize("gelu, bias", [(False, True), (True, True), (False, False)])
def test_an_int8_linear_is_the_product_of_its_dequantised_input_and_weight(gelu, bias):
    w, b = _weights(48, 64, seed=1)
    b = b if bias else None
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = Int8Linear(w, b)(x, gelu=gelu)
    assert got.shape == (3, 5, 48) and got.dtype == torch.bfloat16
    want = _dequantised_product(x.reshape(-1, 64), w, b)
    want = (F.gelu(want) if gelu else want).reshape(3, 5, 48)
    # the same up to the output's rounding to bf16 (8 significant bits) and float32 accumulation
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-4).all()
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())
    exact = F.gelu(exact) if gelu else exact
    relative = float((got.float() - exact).norm() / exact.norm())
    assert relative < 2e-2, relative  # int8 of both sides: about 1% of the output (seen: 5e-3)


def test_an_input_with_a_nan_or_inf_gives_nan_and_a_zero_input_gives_the_bias():
    w, b = _weights(8, 16, seed=3)
    lin = Int8Linear(w, b)
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.zeros(2, 16, dtype=torch.bfloat16)
        x[1, 3] = bad
        assert torch.isnan(lin(x)).all()
    assert torch.equal(lin(torch.zeros(4, 16, dtype=torch.bfloat16)), b.expand(4, 8))


def test_an_int8_blocks_frame_by_frame_attention_is_the_blocks_attention():
    """Each frame's heads read their own q, k and v (a frame or head mixed up would be off by the whole output)."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    blk = ResidualAttentionBlock(64, 4, 4.0, batch_first=True).eval()
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        want = blk.ls_1(blk.attention(q_x=blk.ln_1(x)))
        got = Int8Block(blk.bfloat16(), None).attention(x.bfloat16()).float()
    relative = float((got - want).norm() / want.norm())
    assert relative < 3e-2, relative  # int8 in-projection and out-projection, bf16 scores (seen: 1.8e-2)


def _norm_with_outliers(dim: int, gain: float) -> torch.nn.LayerNorm:
    norm = torch.nn.LayerNorm(dim)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.rand(dim, generator=torch.Generator().manual_seed(8)) / 10)
        norm.bias.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(9)) / 10)
        norm.weight[[3, 17, 40, 51]] *= gain  # a few channels that reach far, as trained trunks have
    return norm


def test_folding_into_the_norm_keeps_the_product_and_evens_out_an_outlier_channel():
    """Int8Block.fold divides the norm's channels by s and multiplies the weight's columns by s: the same product in
    float32; with four channels 30x larger the int8 product's error falls (seen: 2.5% -> 1.0% of the output)."""
    norm = _norm_with_outliers(64, 30.0)
    w, b = _weights(48, 64, seed=10)
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(11)) * 3 + 1
    folded_norm, folded_w = Int8Block.fold(norm, w.float())
    with torch.no_grad():
        exact = F.linear(norm(x), w.float(), b.float())
        assert torch.allclose(F.linear(folded_norm(x), folded_w, b.float()), exact, rtol=1e-4, atol=1e-4)

        served = copy.deepcopy(norm).bfloat16()  # as in a bf16 trunk
        served_norm, served_w = Int8Block.fold(served, w)

        def error(n, weight) -> float:
            got = Int8Linear(weight, b)(n(x.bfloat16())).float()
            return float((got - exact).norm() / exact.norm())

        plain, smoothed = error(served, w), error(served_norm, served_w)
    assert smoothed < plain / 2, (plain, smoothed)


def _runner(repo, dtype: torch.dtype, int8: bool) -> tuple[ModelRunner, dict]:
    trunk = load_trunk(repo / "trunk", dtype=dtype)
    assert prepare_trunk(trunk, CPU, dtype, 1 << 20, int8=int8) == (dtype == torch.bfloat16)
    reg = TaskRegistry(repo, trunk)
    reg.sync()
    return ModelRunner(trunk, AdapterSlots(1 << 24, CPU, dtype)), reg.tasks


def test_an_int8_trunk_answers_like_the_float32_trunk(two_task_repo):
    quantised, tasks = _runner(two_task_repo, torch.bfloat16, int8=True)
    assert all(isinstance(b.qkv, Int8Linear) and isinstance(b.proj, Int8Linear) for b in quantised.trunk.packed)
    exact, tasks_f = _runner(two_task_repo, torch.float32, int8=False)
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(2, 4, 3, 32, 32, generator=g) for _ in range(6)]
    names = [("alpha", "beta")[i % 2] for i in range(6)]  # mixed tasks in one batch
    got = quantised.forward([(tasks[n], v) for n, v in zip(names, views, strict=True)]).probs
    want = exact.forward([(tasks_f[n], v) for n, v in zip(names, views, strict=True)]).probs
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert float((a - b).abs().max()) < 5e-2  # probabilities (seen: 1e-2)


def test_int8_is_refused_off_the_cpu_outside_bf16_and_without_the_ops(two_task_repo, monkeypatch):
    f32 = load_trunk(two_task_repo / "trunk")
    with pytest.raises(ValueError, match="--quantize int8 runs on a CPU in bfloat16, not on device cpu in float32"):
        prepare_trunk(f32, CPU, torch.float32, 1 << 20, int8=True)
    bf16 = load_trunk(two_task_repo / "trunk", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not on device cuda in bfloat16"):
        prepare_trunk(bf16, torch.device("cuda"), torch.bfloat16, 1 << 20, int8=True)
    monkeypatch.setattr(packed, "packing_available", lambda int8=False: not int8)
    with pytest.raises(ValueError, match="no oneDNN int8 linear"):
        prepare_trunk(bf16, CPU, torch.bfloat16, 1 << 20, int8=True)
    assert bf16.packed is None
    assert prepare_trunk(bf16, CPU, torch.bfloat16, 1 << 20)  # bf16 packing alone is still there


def test_an_int8_rows_answer_does_not_depend_on_the_rows_batched_with_it(two_task_repo):
    """Each row's linear inputs get their own scale (one row a block call), so a clip batched with louder clips, under
    the same task or another, gets the answer it gets alone, to the bit."""
    runner, tasks = _runner(two_task_repo, torch.bfloat16, int8=True)
    g = torch.Generator().manual_seed(7)
    quiet = torch.randn(1, 4, 3, 32, 32, generator=g) * 0.1
    loud = [torch.randn(1, 4, 3, 32, 32, generator=g) * 10 for _ in range(3)]
    alone = runner.forward([(tasks["alpha"], quiet)]).probs[0]
    for others in (["alpha"] * 3, ["beta", "alpha", "beta"]):
        batch = [(tasks[n], v) for n, v in zip(others, loud, strict=True)]
        got = runner.forward([batch[0], (tasks["alpha"], quiet), *batch[1:]]).probs[1]
        assert torch.equal(got, alone)


def test_pack_int8_within_keeps_int8_only_within_the_bound_and_otherwise_packs_bf16_as_if_never_tried(two_task_repo):
    """The bound decides (a measured distance above 0 fails a bound of 0); a trunk that falls back answers to the bit
    as one packed in bf16 from the start (the block weights were kept while int8 was tried), and one that keeps int8
    gives its own weights back. A trunk packs once."""
    probe = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    kept = load_trunk(two_task_repo / "trunk", dtype=torch.bfloat16)
    error = kept.pack_int8_within(None, probe, 1.0)
    assert 0 < error < 5e-2 and kept.int8 and kept.blocks[0].attn.in_proj_weight.stride() == (0, 0)
    fell_back = load_trunk(two_task_repo / "trunk", dtype=torch.bfloat16)
    assert fell_back.pack_int8_within(None, probe, 0.0) == pytest.approx(error)
    assert not fell_back.int8 and all(type(b) is packed.PackedBlock for b in fell_back.packed)
    plain = load_trunk(two_task_repo / "trunk", dtype=torch.bfloat16)
    assert plain.pack_for_cpu() and not plain.int8
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad():
        assert torch.equal(fell_back.forward_features(clip), plain.forward_features(clip))
    with pytest.raises(RuntimeError, match="already packed"):
        fell_back.pack_int8_within(None, probe, 1.0)
