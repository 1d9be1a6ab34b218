"""CUDA paths: the server's model side in bf16, the trainer with AMP, the library on the GPU.

Skipped where CUDA is missing (CI has no GPU). On a GPU machine::

    python -m pytest -q -m gpu tests/server/test_gpu.py

Each test compares the GPU result with the CPU fp32 one computed in the same test (or with each task alone on
the GPU). A float32 comparison runs with TF32 off (the ``no_tf32`` fixture): cuDNN may pick TF32 convolutions by
default, which are not float32 to 1e-4.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from factories import task_versions

from bench.gpu_steps import no_tf32 as tf32_off
from server.config import ServerConfig
from server.engine.batcher import Batcher
from server.engine.model import BatchOutput, ModelRunner, resolve_dtype
from server.engine.slots import AdapterSlots
from server.registry.registry import TaskRegistry
from stadapter import AdapterConfig, AdapterStack, init_trunk, load_bundle, load_trunk
from training.synthetic import SyntheticConfig, generate
from training.train import TrainConfig, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
VITB_2_BLOCKS = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 2, "width": 768, "head_width": 64,
                                                  "patch_size": 16, "mlp_ratio": 4.0},
                 "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
FULL = AdapterConfig(width=8, pre_attn=True, pre_mlp=True)
LAST = AdapterConfig(width=8, pre_attn=True, pre_mlp=True, layers=1)  # the tiny trunk has 2 blocks: a shared prefix


@pytest.fixture()
def no_tf32():
    """float32 as float32 on CUDA for this test (restored after)."""
    with tf32_off():
        yield


@pytest.fixture(scope="module")
def vitb_trunk_dir(tmp_path_factory):
    """A random trunk of ViT-B/16's shape (224 px, patch 16, width 768, 12 heads) with 2 blocks."""
    out = tmp_path_factory.mktemp("vitb")
    (out / "config.json").write_text(json.dumps(VITB_2_BLOCKS))
    init_trunk("vitb16-2blocks", "random", out / "trunk", model_config=out / "config.json", seed=0)
    return out / "trunk"


def _alone(trunk, clips) -> list[torch.Tensor]:
    """Each clip's probabilities with its task alone, on the trunk's device, on the host."""
    dev = next(trunk.parameters()).device
    with torch.inference_mode():
        return [trunk(v.to(dev), tv.host_stack.to(dev)).softmax(-1).mean(0).cpu() for tv, v in clips]


def _through_batcher(runner: ModelRunner, clips, max_rows: int) -> tuple[list[torch.Tensor], list[BatchOutput]]:
    """Every clip submitted at once to the real batcher (batches of ``max_rows`` rows: while one computes the next
    is staged on the batcher's second thread); the probabilities in order and the batches' outputs."""
    outs: list[BatchOutput] = []
    run = runner.run

    def recorded(staged):
        out = run(staged)
        outs.append(out)
        return out

    runner.run = recorded  # type: ignore[method-assign]

    async def main() -> list[torch.Tensor]:
        b = Batcher(runner, ServerConfig(model_repository=".", max_batch_size=max_rows).limits, max_delay_s=0.005)
        b.start()
        try:
            return [r.probs for r in await asyncio.gather(*(b.submit(tv, v, None) for tv, v in clips))]
        finally:
            await b.close()

    return asyncio.run(main()), outs


def _clips(tvs, n: int, size: int, frames: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(tvs[i % len(tvs)], torch.randn(1, frames, 3, size, size, generator=g)) for i in range(n)]


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


def test_mixed_task_stack_on_cuda_fp32_equals_each_task_alone(two_task_repo, tiny_trunk_dir, no_tf32):
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


def test_slot_bank_mixed_batch_on_cuda_fp32_equals_each_task_alone(two_task_repo, tiny_trunk_dir, no_tf32):
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


def test_staged_batches_on_the_side_stream_equal_cpu(two_task_repo, tiny_trunk_dir, no_tf32):
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


def test_vitb_shaped_mixed_batch_through_the_batcher_on_cuda_fp32_equals_cpu(vitb_trunk_dir, tmp_path, no_tf32):
    """ViT-B/16's shapes (2 blocks): tasks of different widths, kernels and depths mixed in batches."""
    cpu_trunk, trunk = load_trunk(vitb_trunk_dir), load_trunk(vitb_trunk_dir, device=CUDA)
    tvs = task_versions(cpu_trunk, tmp_path)  # three heterogeneous tasks
    clips = _clips(tvs, 6, 224, 8, seed=7)
    got, outs = _through_batcher(ModelRunner(trunk, AdapterSlots(1 << 30, CUDA, torch.float32)), clips, max_rows=3)
    assert max(o.tasks for o in outs) > 1  # mixed batches
    for p, q in zip(got, _alone(cpu_trunk, clips), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


def test_staging_on_another_thread_while_the_batcher_computes_equals_cpu(tiny_trunk_dir, tiny_trunk, tmp_path, no_tf32):
    """Many full batches at once: each next batch is staged (slots, side-stream copies) while one computes."""
    trunk = load_trunk(tiny_trunk_dir, device=CUDA)
    tvs = task_versions(tiny_trunk, tmp_path)
    clips = _clips(tvs, 48, 32, 4, seed=8)
    got, outs = _through_batcher(ModelRunner(trunk, AdapterSlots(1 << 30, CUDA, torch.float32)), clips, max_rows=4)
    assert len(outs) >= 12 and any(o.stage_s > 0 for o in outs)
    for p, q in zip(got, _alone(tiny_trunk, clips), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


def test_more_tasks_than_device_slots_evict_and_still_equal_cpu(tiny_trunk_dir, tiny_trunk, tmp_path, no_tf32):
    """Six tasks on two slots, two tasks a batch: activations evict on the device (a batch staged while another
    computes may grow the bank past its two slots for a moment, never to six) and tasks come back; every answer is its
    task's."""
    trunk = load_trunk(tiny_trunk_dir, device=CUDA)
    tvs = task_versions(tiny_trunk, tmp_path, [(FULL, 3 + i) for i in range(6)])
    clips = _clips(tvs, 36, 32, 4, seed=9)
    slots = AdapterSlots(0, CUDA, torch.float32, slots=2)
    got, outs = _through_batcher(ModelRunner(trunk, slots), clips, max_rows=2)
    assert slots.evictions > 0 and slots.activations > len(tvs)
    for p, q in zip(got, _alone(tiny_trunk, clips), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


def test_a_shared_prefix_batch_through_the_batcher_on_cuda_equals_cpu(tiny_trunk_dir, tiny_trunk, tmp_path, no_tf32):
    """Two last-block tasks given the same clips (one request naming both): their rows share the clip's prefix."""
    trunk = load_trunk(tiny_trunk_dir, device=CUDA)
    tvs = task_versions(tiny_trunk, tmp_path, [(LAST, 3), (LAST, 5)])
    g = torch.Generator().manual_seed(10)
    clips = [(tv, v) for v in (torch.randn(2, 4, 3, 32, 32, generator=g) for _ in range(3)) for tv in tvs]
    got, outs = _through_batcher(ModelRunner(trunk, AdapterSlots(1 << 30, CUDA, torch.float32)), clips, max_rows=12)
    assert sum(o.shared_rows for o in outs) > 0
    for p, q in zip(got, _alone(tiny_trunk, clips), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)
