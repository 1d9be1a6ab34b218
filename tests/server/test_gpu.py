"""CUDA paths: the server's model side in bf16, the trainer with AMP, the library on the GPU.

Skipped where CUDA is missing (CI has no GPU). On a GPU machine::

    python -m pytest -q -m gpu tests/server/test_gpu.py

Each test compares the GPU result with the CPU fp32 one computed in the same test.
"""

from __future__ import annotations

import pytest
import torch

from server.engine.model import ModelRunner, resolve_dtype
from server.engine.slots import AdapterSlots
from server.registry.registry import TaskRegistry
from stadapter import AdapterStack, load_bundle, load_trunk
from training.synthetic import SyntheticConfig, generate
from training.train import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


def _runner_probs(repo, trunk_dir, device: torch.device, dtype: torch.dtype, views: torch.Tensor) -> list[torch.Tensor]:
    trunk = load_trunk(trunk_dir, device=device, dtype=dtype)
    reg = TaskRegistry(repo, trunk)
    reg.sync()
    runner = ModelRunner(trunk, AdapterSlots(1 << 20, device, dtype))
    return runner.forward([(reg.tasks["alpha"], views), (reg.tasks["beta"], views[:1])]).probs


def test_server_default_dtype_on_cuda_is_half_precision():
    assert resolve_dtype("auto", CUDA) in (torch.bfloat16, torch.float16)


def test_runner_mixed_batch_on_cuda_bf16_agrees_with_cpu_fp32(two_task_repo, tiny_trunk_dir):
    views = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cpu = _runner_probs(two_task_repo, tiny_trunk_dir, torch.device("cpu"), torch.float32, views)
    gpu = _runner_probs(two_task_repo, tiny_trunk_dir, CUDA, resolve_dtype("auto", CUDA), views)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.device.type == "cpu" and b.dtype == torch.float32  # the runner hands back host float32
        torch.testing.assert_close(a, b, atol=3e-2, rtol=0)


def test_mixed_task_stack_on_cuda_fp32_equals_each_task_alone(two_task_repo, tiny_trunk_dir):
    trunk = load_trunk(tiny_trunk_dir, device=CUDA)
    a = load_bundle(two_task_repo / "tasks/alpha/1", trunk).stack(trunk.num_blocks).to(CUDA)
    b = load_bundle(two_task_repo / "tasks/beta/1", trunk).stack(trunk.num_blocks).to(CUDA)
    frames = torch.randn(4, 4, 3, 32, 32, device=CUDA)
    with torch.inference_mode():
        mixed = trunk(frames, AdapterStack.concat([a, b]), torch.tensor([0, 1, 1, 0], device=CUDA))
        alone_a, alone_b = trunk(frames[[0, 3]], a), trunk(frames[[1, 2]], b)
    torch.testing.assert_close(mixed[[0, 3], :3], alone_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[[1, 2], :4], alone_b, atol=1e-4, rtol=1e-4)


def test_training_on_cuda_with_amp_reduces_the_loss(tiny_trunk_dir, tmp_path):
    data = tmp_path / "data"
    generate(SyntheticConfig("motion", num_train=16, num_val=8, seed=1, size=32, frames=8), data)
    cfg = TrainConfig(
        trunk=str(tiny_trunk_dir), task="motion", data_root=str(data), train_list=str(data / "train.txt"),
        val_list=str(data / "val.txt"), labels=str(data / "labels.txt"), out=str(tmp_path / "bundle"),
        run_dir=str(tmp_path / "run"), adapter_width=8, num_frames=4, batch_size=8, epochs=5, workers=0,
        lr=3e-2, warmup_epochs=0.5, dropout=0.0, progress=False, cache=True, device="cuda",
    )
    metrics = train(cfg)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0] - 0.1, losses
    assert (tmp_path / "bundle" / "adapter.safetensors").is_file()


def test_slot_bank_mixed_batch_on_cuda_fp32_equals_each_task_alone(two_task_repo, tiny_trunk_dir):
    """A mixed batch through the device slots on CUDA, and the one pinned copy back per batch."""
    trunk = load_trunk(tiny_trunk_dir, device=CUDA)
    reg = TaskRegistry(two_task_repo, trunk)
    reg.sync()
    alpha, beta = reg.tasks["alpha"], reg.tasks["beta"]
    g = torch.Generator().manual_seed(4)
    clips = [(alpha, torch.randn(2, 4, 3, 32, 32, generator=g)), (beta, torch.randn(1, 4, 3, 32, 32, generator=g)),
             (alpha, torch.randn(1, 4, 3, 32, 32, generator=g))]
    runner = ModelRunner(trunk, AdapterSlots(1 << 20, CUDA, torch.float32))
    out = runner.forward(clips)
    assert runner._staging is not None and runner._staging.is_pinned()
    for (tv, views), p in zip(clips, out.probs, strict=True):
        assert p.device.type == "cpu" and p.dtype == torch.float32
        with torch.inference_mode():
            alone = trunk(views.to(CUDA), tv.host_stack.to(CUDA)).softmax(-1).mean(0).cpu()
        torch.testing.assert_close(p, alone, atol=1e-5, rtol=1e-4)
    assert runner.slots.bytes > 0 and runner.slots.used == 2


def test_staged_batches_on_the_side_stream_equal_cpu(two_task_repo, tiny_trunk_dir):
    """The next batch staged (pinned input, side-stream copy, event) while the previous one is not yet run."""
    cpu_trunk, trunk = load_trunk(tiny_trunk_dir), load_trunk(tiny_trunk_dir, device=CUDA)
    cpu_reg, reg = TaskRegistry(two_task_repo, cpu_trunk), TaskRegistry(two_task_repo, trunk)
    cpu_reg.sync()
    reg.sync()
    g = torch.Generator().manual_seed(5)
    batches = [[("alpha", torch.randn(2, 4, 3, 32, 32, generator=g)), ("beta", torch.randn(1, 4, 3, 32, 32, generator=g))]
               for _ in range(3)]
    runner = ModelRunner(trunk, AdapterSlots(1 << 20, CUDA, torch.float32))
    ref = ModelRunner(cpu_trunk, AdapterSlots(1 << 20, torch.device("cpu"), torch.float32))
    staged = [runner.stage([(reg.tasks[n], v) for n, v in b]) for b in batches]  # all staged before any runs
    assert all(s.ready is not None and s.frames.device.type == "cuda" for s in staged)
    for s, b in zip(staged, batches, strict=True):
        out = runner.run(s)
        want = ref.forward([(cpu_reg.tasks[n], v) for n, v in b])
        for p, q in zip(out.probs, want.probs, strict=True):
            torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)
    assert not runner.slots._pinned
