"""The model library's core: adapter math, multi-task stacks, trunk, configs."""

from __future__ import annotations

import json

import pytest
import torch
from factories import make_task_adapters
from torch import nn

from stadapter import (
    AdapterConfig,
    AdapterStack,
    ConfigError,
    SamplingConfig,
    TaskAdapters,
    TaskSpec,
    TrunkError,
    init_trunk,
    load_trunk,
)
from stadapter.adapter import STAdapter, _depthwise_conv_cl

DIM, GRID, T = 16, (2, 3), 6


def _randomise(module: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch * T, 1 + GRID[0] * GRID[1], DIM, generator=g)  # [B*T, 1+h*w, d]


def test_fresh_adapter_is_identity():
    a = STAdapter(DIM, AdapterConfig(width=4))
    x = _tokens()
    assert torch.equal(a(x, T, GRID), x)


def test_adapter_leaves_cls_untouched_and_changes_patches():
    a = STAdapter(DIM, AdapterConfig(width=4))
    _randomise(a)
    x = _tokens()
    y = a(x, T, GRID)
    assert torch.equal(y[:, 0], x[:, 0])
    assert (y[:, 1:] - x[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", [(3, 1, 1), (5, 3, 1), (1, 3, 3)])
def test_channels_last_conv_equals_conv3d(kernel):
    r = 5
    conv = nn.Conv3d(r, r, kernel, padding=tuple(k // 2 for k in kernel), groups=r)
    _randomise(conv, seed=3)
    z = torch.randn(2, T, GRID[0], GRID[1], r)  # [B, T, h, w, r]
    ref = conv(z.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
    w = conv.weight[:, 0].permute(1, 2, 3, 0)  # [kt, kh, kw, r]
    out = _depthwise_conv_cl(z, w, conv.bias)
    assert torch.allclose(out, ref, atol=1e-6)
    per_clip = _depthwise_conv_cl(z, w.expand(2, *w.shape), conv.bias.expand(2, r))
    assert torch.allclose(per_clip, ref, atol=1e-6)


def test_temporal_mixing_reaches_only_neighbouring_frames():
    """A change in frame t moves the adapter output only at frames t-1, t, t+1 (kernel 3)."""
    a = STAdapter(DIM, AdapterConfig(width=4, kernel=(3, 1, 1)))
    _randomise(a)
    x = _tokens(batch=1)
    x2 = x.clone()
    t = 2
    x2[t, 1:] += torch.randn_like(x2[t, 1:])
    diff = (a(x2, T, GRID) - a(x, T, GRID))[:, 1:].abs().amax(dim=(1, 2))  # per frame
    moved = {i for i in range(T) if diff[i] > 1e-6}
    assert moved == {t - 1, t, t + 1}


def test_temporal_kernel_one_mixes_nothing_across_time():
    a = STAdapter(DIM, AdapterConfig(width=4, kernel=(1, 1, 1)))
    _randomise(a)
    x = _tokens(batch=1)
    x2 = x.clone()
    x2[3, 1:] += 1.0
    diff = (a(x2, T, GRID) - a(x, T, GRID))[:, 1:].abs().amax(dim=(1, 2))
    assert {i for i in range(T) if diff[i] > 1e-6} == {3}


def test_clips_in_a_batch_do_not_mix():
    a = STAdapter(DIM, AdapterConfig(width=4, kernel=(3, 3, 3)))
    _randomise(a)
    x = _tokens(batch=2)
    x2 = x.clone()
    x2[:T, 1:] += 1.0  # change clip 0 only
    diff = a(x2, T, GRID) - a(x, T, GRID)
    assert diff[T:].abs().max() == 0


def test_apply_adapter_rejects_tokens_that_do_not_fit():
    a = STAdapter(DIM, AdapterConfig(width=4))
    with pytest.raises(ValueError, match="do not fit"):
        a(_tokens()[:, :5], T, GRID)


def test_task_adapters_use_the_public_checkpoint_keys():
    ta = TaskAdapters(AdapterConfig(width=4, pre_attn=True, pre_mlp=True, layers=2), dim=DIM, num_blocks=4, num_classes=3)
    keys = set(ta.state_dict())
    assert "transformer.resblocks.3.adapter_pre_attn.conv.weight" in keys
    assert "transformer.resblocks.2.adapter_pre_mlp.fc2.bias" in keys
    assert not any(k.startswith("transformer.resblocks.1.") for k in keys)
    assert {"fc.weight", "fc.bias"} <= keys
    assert ta.state_dict()["transformer.resblocks.3.adapter_pre_attn.conv.weight"].shape == (4, 1, 3, 1, 1)
    assert ta.fc.bias.abs().sum() == 0 and 0.005 < ta.fc.weight.std() < 0.05


def test_fresh_adapters_start_as_the_image_model(tiny_trunk):
    ta = TaskAdapters(AdapterConfig(width=8, pre_attn=True, pre_mlp=True), tiny_trunk.dim, tiny_trunk.num_blocks, 4)
    frames = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        plain = tiny_trunk.forward_features(frames)
        adapted = tiny_trunk.forward_features(frames, ta.stack())
    assert torch.allclose(plain, adapted, atol=1e-5)


HETERO = [
    AdapterConfig(width=8, pre_attn=True, pre_mlp=True),
    AdapterConfig(width=12, kernel=(5, 3, 3), pre_attn=False, pre_mlp=True, layers=1),
    AdapterConfig(width=4, kernel=(1, 1, 1), pre_attn=True),
]


def test_mixed_task_batch_equals_each_task_alone(tiny_trunk):
    tasks = [make_task_adapters(tiny_trunk, n, cfg, seed=i) for i, (cfg, n) in enumerate(zip(HETERO, [5, 3, 7], strict=True))]
    frames = torch.randn(6, 4, 3, 32, 32)
    index = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        stack = AdapterStack.concat([t.stack() for t in tasks])
        mixed = tiny_trunk(frames, stack, index)  # [B, C_max]
        assert mixed.shape == (6, 7)
        assert stack.num_classes == (5, 3, 7)
        for b in range(6):
            k = int(index[b])
            alone = tiny_trunk(frames[b : b + 1], tasks[k].stack())[0]
            n = tasks[k].num_classes
            assert torch.allclose(mixed[b, :n], alone, atol=1e-5), (b, (mixed[b, :n] - alone).abs().max())
            assert torch.all(mixed[b, n:] == 0)


def test_single_task_fast_path_equals_indexed_path(tiny_trunk):
    ta = make_task_adapters(tiny_trunk, 3)
    frames = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        fast = tiny_trunk(frames, ta.stack())
        gathered = tiny_trunk(frames, ta.stack(), torch.zeros(3, dtype=torch.long))
    assert torch.allclose(fast, gathered, atol=1e-5)


def test_stack_refuses_mixed_activations_and_missing_index(tiny_trunk):
    a = make_task_adapters(tiny_trunk, 2, AdapterConfig(width=4))
    b = make_task_adapters(tiny_trunk, 2, AdapterConfig(width=4, activation="gelu"))
    with pytest.raises(ValueError, match="activations"):
        AdapterStack.concat([a.stack(), b.stack()])
    two = AdapterStack.concat([a.stack(), a.stack()])
    with pytest.raises(ValueError, match="no task_index"):
        tiny_trunk(torch.randn(1, 4, 3, 32, 32), two)


def test_gradients_reach_only_the_adapters(tiny_trunk):
    ta = make_task_adapters(tiny_trunk, 3, std=0.05)
    loss = tiny_trunk(torch.randn(2, 4, 3, 32, 32), ta.stack()).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for p in ta.parameters())
    assert all(p.grad is None for p in tiny_trunk.parameters())


def test_trunk_refuses_frames_of_the_wrong_size(tiny_trunk):
    ta = make_task_adapters(tiny_trunk, 3)
    with pytest.raises(ValueError, match="expected"):
        tiny_trunk(torch.randn(1, 4, 3, 64, 64), ta.stack())


def test_trunk_fingerprint_is_stable_and_catches_tampering(tmp_path, tiny_trunk):
    init_trunk("test-vit-tiny", "random", tmp_path / "a", seed=0)
    init_trunk("test-vit-tiny", "random", tmp_path / "b", seed=0)
    init_trunk("test-vit-tiny", "random", tmp_path / "c", seed=1)
    fa, fb, fc = (json.loads((tmp_path / n / "trunk.json").read_text())["fingerprint"] for n in "abc")
    assert fa == fb == tiny_trunk.fingerprint and fa != fc
    spec = json.loads((tmp_path / "a" / "trunk.json").read_text())
    spec["quick_gelu"] = True  # same tensors, other activation: must not pass as the same trunk
    (tmp_path / "a" / "trunk.json").write_text(json.dumps(spec))
    with pytest.raises(TrunkError, match="fingerprint"):
        load_trunk(tmp_path / "a")


def test_trunk_stays_frozen_and_in_eval_mode(tiny_trunk):
    tiny_trunk.train()
    assert not tiny_trunk.training and not tiny_trunk.visual.training
    assert not any(p.requires_grad for p in tiny_trunk.parameters())


def test_tiny_trunk_config(tiny_trunk):
    assert (tiny_trunk.dim, tiny_trunk.grid, tiny_trunk.num_blocks, tiny_trunk.image_size) == (32, (4, 4), 2, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 0}, "width"),
        ({"kernel": (2, 1, 1)}, "kernel"),
        ({"pre_attn": False, "pre_mlp": False}, "at least one"),
        ({"activation": "tanh"}, "activation"),
        ({"layers": -1}, "layers"),
    ],
)
def test_adapter_config_validates(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(**kwargs)


def test_configs_round_trip_and_refuse_unknown_keys():
    cfg = AdapterConfig(width=16, kernel=(3, 1, 1), pre_mlp=True, layers=4)
    assert AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    s = SamplingConfig(num_frames=8, mode="stride", stride=4, temporal_views=3, spatial_views=3)
    assert SamplingConfig.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ConfigError, match="unknown keys"):
        AdapterConfig.from_dict({"width": 8, "widht": 9})
    with pytest.raises(ConfigError, match="spatial_views"):
        SamplingConfig(spatial_views=2)
    assert AdapterConfig(layers=2).adapted_blocks(12) == (10, 11)
    with pytest.raises(ConfigError, match="only 4 blocks"):
        AdapterConfig(layers=6).adapted_blocks(4)


def test_task_specs_parsed_with_shared_configs_equal_those_parsed_alone_and_refuse_the_same():
    """A scan passes one ``parsed`` dict to thousands of ``TaskSpec.from_dict`` calls: a config met before is
    reused, never one that is equal as Python values but not as JSON (``32.0`` is not a width, ``1`` not a bool)."""
    spec = TaskSpec(name="t", labels=("a", "b"), adapter=AdapterConfig(width=32), sampling=SamplingConfig(num_frames=4),
                    trunk_fingerprint="0" * 64)
    parsed: dict = {}
    for name in ("t", "u"):
        data = json.loads(json.dumps({**spec.to_dict(), "name": name}))
        assert TaskSpec.from_dict(data, parsed) == TaskSpec.from_dict(data) == spec.replace(name=name)
    assert len(parsed) == 2  # one adapter and one sampling config, parsed once for both specs
    float_width = json.loads(json.dumps(spec.to_dict()).replace('"width": 32', '"width": 32.0'))
    with pytest.raises(ConfigError, match="width must be a positive int"):
        TaskSpec.from_dict(float_width, parsed)
    int_autorotate = json.loads(json.dumps(spec.to_dict()).replace('"autorotate": true', '"autorotate": 1'))
    with pytest.raises(ConfigError, match="autorotate must be true or false"):
        TaskSpec.from_dict(int_autorotate, parsed)


@pytest.mark.parametrize("name", ["", "Upper", "has space", "../escape", "x" * 65, "-lead"])
def test_task_names_are_restricted(name):
    with pytest.raises(ConfigError, match="task name"):
        TaskSpec(name=name, labels=("a",), adapter=AdapterConfig(), sampling=SamplingConfig(), trunk_fingerprint="0" * 64)


def test_task_spec_refuses_bad_labels():
    base = dict(name="t", adapter=AdapterConfig(), sampling=SamplingConfig(), trunk_fingerprint="0" * 64)
    with pytest.raises(ConfigError, match="duplicate"):
        TaskSpec(labels=("a", "a"), **base)
    with pytest.raises(ConfigError, match="empty"):
        TaskSpec(labels=(), **base)
