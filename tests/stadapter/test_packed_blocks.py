"""A bf16 trunk on the CPU with its block weights packed for oneDNN (``VideoTrunk.pack_for_cpu``, which the server's
``prepare_trunk`` applies) answers what the plain bf16 trunk answers, at any batch size, one task or mixed."""

from __future__ import annotations

import pytest
import torch
from factories import make_task_adapters

from server.engine.model import ModelRunner, prepare_trunk
from server.engine.slots import AdapterSlots
from server.registry.registry import TaskRegistry
from stadapter import init_trunk, load_trunk
from stadapter.trunk.packed import packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear packing")
CPU = torch.device("cpu")
BF16_ULPS = 1e-2  # probabilities a few bf16 roundings apart (seen: 2e-3; a GELU left out: 5e-2)


def _runner(repo, dtype, pack: bool, chunk_bytes: int) -> tuple[ModelRunner, dict]:
    trunk = load_trunk(repo / "trunk", dtype=dtype)
    if pack:
        assert prepare_trunk(trunk, CPU, dtype, chunk_bytes) and trunk.packed is not None
    else:
        trunk.chunk_bytes = chunk_bytes
    reg = TaskRegistry(repo, trunk)
    reg.sync()
    return ModelRunner(trunk, AdapterSlots(1 << 24, CPU, dtype)), reg.tasks


@pytest.mark.parametrize("clips", [1, 3, 5])
def test_packed_weights_answer_like_the_plain_bf16_trunk_at_any_batch_size(two_task_repo, clips):
    """Batch sizes other than the layout hint, one-task and mixed batches, blocks run in chunks of clips."""
    chunk = 2 * 17 * 32 * 2 * 4  # two clips of 4 frames of the tiny trunk's 17 x 32 bf16 tokens a call
    packed, tasks = _runner(two_task_repo, torch.bfloat16, True, chunk)
    plain, tasks_p = _runner(two_task_repo, torch.bfloat16, False, chunk)
    f32, tasks_f = _runner(two_task_repo, torch.float32, False, 0)
    g = torch.Generator().manual_seed(clips)
    views = [torch.randn(2, 4, 3, 32, 32, generator=g) for _ in range(clips)]  # 2 views a clip
    for names in (["alpha"] * clips, [("alpha", "beta")[i % 2] for i in range(clips)]):
        got = packed.forward([(tasks[n], v) for n, v in zip(names, views, strict=True)]).probs
        want = plain.forward([(tasks_p[n], v) for n, v in zip(names, views, strict=True)]).probs
        exact = f32.forward([(tasks_f[n], v) for n, v in zip(names, views, strict=True)]).probs
        for a, b, c in zip(got, want, exact, strict=True):
            assert a.dtype == torch.float32 and a.shape == b.shape
            assert float((a - b).abs().max()) < BF16_ULPS
            assert float((a - c).abs().max()) < BF16_ULPS


def test_quick_gelu_blocks_pack_too(tmp_path):
    init_trunk("test-vit-tiny", "random", tmp_path / "trunk", quick_gelu=True, seed=3)
    packed, plain = (load_trunk(tmp_path / "trunk", dtype=torch.bfloat16) for _ in range(2))
    assert type(packed.blocks[0].mlp.gelu).__name__ == "QuickGELU" and packed.pack_for_cpu()
    stack = make_task_adapters(plain, 3).stack().to(dtype=torch.bfloat16)
    x = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode():
        a, b = packed(x, stack).float(), plain(x, stack).float()
    assert float((a - b).abs().max()) < BF16_ULPS * 4  # logits of about 1 (seen: 8e-3)


def test_only_a_bf16_trunk_on_the_cpu_is_packed(two_task_repo):
    trunk = load_trunk(two_task_repo / "trunk")  # float32
    assert not trunk.pack_for_cpu() and trunk.packed is None
    assert not prepare_trunk(trunk, CPU, torch.float32, 1 << 20) and trunk.chunk_bytes == 1 << 20
    bf16 = load_trunk(two_task_repo / "trunk", dtype=torch.bfloat16)
    assert not prepare_trunk(bf16, torch.device("cuda"), torch.bfloat16, 1 << 20)  # nothing touched off the CPU
    assert bf16.packed is None and bf16.chunk_bytes == 0


@pytest.mark.parametrize("int8", [False, True])
def test_packing_gives_back_the_blocks_own_linear_weights_and_happens_once(tmp_path, int8):
    """The packed copies serve; the originals' memory is freed (shape, dtype and parameter count kept)."""
    if int8 and not packing_available(int8=True):
        pytest.skip("this torch build has no oneDNN int8 linear")
    init_trunk("test-vit-tiny", "random", tmp_path / "trunk", seed=4)
    trunk = load_trunk(tmp_path / "trunk", dtype=torch.bfloat16)
    count, shape = trunk.num_parameters, trunk.blocks[0].mlp.c_fc.weight.shape
    assert trunk.pack_for_cpu(int8=int8)
    for blk in trunk.blocks:
        for w in (blk.attn.in_proj_weight, blk.attn.out_proj.weight, blk.mlp.c_fc.weight, blk.mlp.c_proj.weight):
            assert w.stride() == (0, 0) and w.untyped_storage().nbytes() == 2 and w.dtype == torch.bfloat16
        assert blk.ln_1.weight.stride() != (0,)  # what the packed block still reads is kept
    assert trunk.num_parameters == count and trunk.blocks[0].mlp.c_fc.weight.shape == shape
    with pytest.raises(RuntimeError, match="already packed"):
        trunk.pack_for_cpu(int8=int8)
