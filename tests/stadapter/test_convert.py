"""Converter for checkpoints of the public ST-Adapter code (stadapter.convert).

The reference below re-implements the public forward independently (nn.Conv3d with
groups=r on [B, r, T, h, w], as the public code does) and reuses only the tiny
trunk's open_clip modules (patch embedding, ln, attention, MLP). Its
``state_dict()`` has exactly the public checkpoint keys, so it doubles as the
checkpoint writer.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stadapter
from stadapter import SamplingConfig, init_trunk, load_trunk
from stadapter.convert import (
    ConvertError,
    convert_checkpoint,
    infer_adapter_config,
    main,
    read_checkpoint,
    read_labels,
)

NUM_BLOCKS = 3
DIM = 32
T = 4
SAMPLING = SamplingConfig(num_frames=T, input_size=32)


class RefAdapter(nn.Module):
    """Public Adapter: x + fc2(conv3d(fc1(patches))) with the conv over [B, r, T, h, w]."""

    def __init__(self, dim: int, width: int, kernel: tuple[int, int, int]):
        super().__init__()
        self.fc1 = nn.Linear(dim, width)
        self.conv = nn.Conv3d(width, width, kernel, padding=tuple(k // 2 for k in kernel), groups=width)
        self.fc2 = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        BT, L, _ = x.shape
        B, side = BT // num_frames, math.isqrt(L - 1)
        z = self.fc1(x[:, 1:])  # [BT, h*w, r]
        z = z.reshape(B, num_frames, side, side, -1).permute(0, 4, 1, 2, 3)  # [B, r, T, h, w]
        z = self.conv(z).permute(0, 2, 3, 4, 1).reshape(BT, L - 1, -1)  # [BT, h*w, r]
        return torch.cat([x[:, :1], x[:, 1:] + self.fc2(z)], dim=1)


class RefBlock(nn.Module):
    def __init__(self, dim, width, kernel, pre_attn: bool, pre_mlp: bool):
        super().__init__()
        self.adapter_pre_attn = RefAdapter(dim, width, kernel) if pre_attn else None
        self.adapter_pre_mlp = RefAdapter(dim, width, kernel) if pre_mlp else None


class RefModel(nn.Module):
    """The public VisionTransformer's trainable part + forward, on a frozen open_clip visual tower."""

    def __init__(self, visual, width, kernel, pre_attn, pre_mlp, blocks, num_classes, dim=DIM, num_blocks=NUM_BLOCKS):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            RefBlock(dim, width, kernel, pre_attn and i in blocks, pre_mlp and i in blocks) for i in range(num_blocks)
        )
        self.fc = nn.Linear(dim, num_classes)
        self._visual = [visual]  # not a submodule: its tensors stay out of state_dict(), as in the public checkpoint

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # [B, T, 3, H, W]
        v = self._visual[0]
        B, nT = frames.shape[:2]
        x = v.conv1(frames.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*T, h*w, d]
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for ref, blk in zip(self.transformer.resblocks, v.transformer.resblocks, strict=True):
            if ref.adapter_pre_attn is not None:
                x = ref.adapter_pre_attn(x, nT)
            x = x + blk.attention(q_x=blk.ln_1(x))
            if ref.adapter_pre_mlp is not None:
                x = ref.adapter_pre_mlp(x, nT)
            x = x + blk.mlp(blk.ln_2(x))
        cls_tok = x[:, 0].reshape(B, nT, -1).mean(dim=1)  # [B, d]
        return self.fc(v.ln_post(cls_tok))


def public_keys(blocks, positions) -> set[str]:
    keys = {"fc.weight", "fc.bias"}
    for i in blocks:
        for pos in positions:
            for t in ("fc1", "conv", "fc2"):
                keys |= {f"transformer.resblocks.{i}.adapter_{pos}.{t}.weight", f"transformer.resblocks.{i}.adapter_{pos}.{t}.bias"}
    return keys


@pytest.fixture(scope="module")
def trunk3_dir(tmp_path_factory) -> Path:
    """A random 3-block tiny ViT (so 'the last N blocks' is a real choice)."""
    root = tmp_path_factory.mktemp("trunk3")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": NUM_BLOCKS, "width": DIM, "head_width": 16,
                                           "patch_size": 8, "mlp_ratio": 2.0}}
    (root / "vit3.json").write_text(json.dumps(cfg))
    init_trunk("vit3", "random", root / "trunk", model_config=root / "vit3.json", seed=3)
    return root / "trunk"


@pytest.fixture(scope="module")
def trunk3(trunk3_dir):
    return load_trunk(trunk3_dir)


def make_ref(trunk, width=6, kernel=(3, 1, 1), pre_attn=True, pre_mlp=True, blocks=(1, 2), num_classes=5, seed=0):
    torch.manual_seed(seed)
    ref = RefModel(trunk.visual, width, kernel, pre_attn, pre_mlp, set(blocks), num_classes)
    with torch.no_grad():
        for p in ref.parameters():  # every tensor random and non-zero, conv weights included
            p.copy_(torch.randn(p.shape) * 0.3)
    return ref.eval()


def write_labels(path: Path, n: int) -> Path:
    path.write_text("".join(f"class {i}\n" for i in range(n)) + "\n")
    return path


CASES = [
    # kernel, pre_attn, pre_mlp, adapted blocks, checkpoint as written by DDP (module. prefix + optimizer state)
    pytest.param((3, 1, 1), True, True, (1, 2), True, id="k311-attn+mlp-last2-ddp"),
    pytest.param((3, 3, 3), False, True, (0, 1, 2), False, id="k333-mlp-all"),
]


@pytest.mark.parametrize("kernel,pre_attn,pre_mlp,blocks,ddp", CASES)
def test_converted_bundle_matches_public_forward(tmp_path, trunk3_dir, trunk3, kernel, pre_attn, pre_mlp, blocks, ddp):
    ref = make_ref(trunk3, kernel=kernel, pre_attn=pre_attn, pre_mlp=pre_mlp, blocks=blocks)
    state = ref.state_dict()
    positions = [p for p, on in (("pre_attn", pre_attn), ("pre_mlp", pre_mlp)) if on]
    assert set(state) == public_keys(blocks, positions)  # exactly the public layout, nothing else
    if ddp:
        ckpt = {"model": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                              "param_groups": [{"lr": 1e-3, "params": [0]}]},
                "next_epoch": 3}
    else:
        ckpt = {"model": state}
    torch.save(ckpt, tmp_path / "checkpoint-2.pth")

    labels = read_labels(write_labels(tmp_path / "labels.txt", 5))
    spec = convert_checkpoint(tmp_path / "checkpoint-2.pth", trunk3, labels, "public-task", tmp_path / "bundle", SAMPLING)
    a = spec.adapter
    assert (a.width, a.kernel, a.pre_attn, a.pre_mlp, a.layers, a.activation) == (6, kernel, pre_attn, pre_mlp, len(blocks), "none")
    assert a.adapted_blocks(NUM_BLOCKS) == tuple(blocks)
    assert spec.trunk_fingerprint == trunk3.fingerprint and spec.labels == labels

    clf = stadapter.load_classifier(trunk=trunk3_dir, task=tmp_path / "bundle")
    frames = torch.randn(2, T, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(frames)
        got = clf(frames)
        plain = F.linear(trunk3.forward_features(frames), state["fc.weight"], state["fc.bias"])
    assert got.shape == (2, 5) and clf.labels == list(labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - plain).abs().max() > 1e-2  # the adapters really change the logits


def test_cli_converts_and_refuses_to_overwrite(tmp_path, trunk3_dir, trunk3, capsys):
    torch.save({"model": make_ref(trunk3, num_classes=3).state_dict()}, tmp_path / "ck.pth")
    args = ["--checkpoint", str(tmp_path / "ck.pth"), "--trunk", str(trunk3_dir), "--labels",
            str(write_labels(tmp_path / "l.txt", 3)), "--task", "k400-mini", "--out", str(tmp_path / "b"),
            "--num-frames", "4", "--sampling", "stride", "--stride", "2", "--version", "7"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "pre_attn+pre_mlp in the last 2 blocks, width 6, kernel [3, 1, 1]" in out.out
    assert "QuickGELU" in out.err  # the tiny trunk uses plain GELU: warned, not refused
    spec = stadapter.read_bundle(tmp_path / "b").spec
    assert (spec.name, spec.version, spec.sampling.mode, spec.sampling.stride, spec.sampling.num_frames) == ("k400-mini", 7, "stride", 2, 4)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


# ---- refusals ------------------------------------------------------------------------------


def _convert(tmp_path, trunk, ckpt, n_labels=5):
    torch.save(ckpt, tmp_path / "ck.pth")
    labels = read_labels(write_labels(tmp_path / "labels.txt", n_labels))
    return convert_checkpoint(tmp_path / "ck.pth", trunk, labels, "t", tmp_path / "out", SAMPLING)


def test_refuses_label_count_mismatch(tmp_path, trunk3):
    with pytest.raises(ConvertError, match="head has 5 classes but the labels file lists 4 labels"):
        _convert(tmp_path, trunk3, {"model": make_ref(trunk3).state_dict()}, n_labels=4)
    assert not (tmp_path / "out").exists()


def test_refuses_wrong_dim(tmp_path, trunk3):
    wide = RefModel(trunk3.visual, 6, (3, 1, 1), True, False, {2}, 5, dim=48)
    with pytest.raises(ConvertError, match=r"adapter_pre_attn.fc1.weight' has shape \(6, 48\), expected \(6, 32\).*d=32"):
        _convert(tmp_path, trunk3, {"model": wide.state_dict()})


@pytest.mark.parametrize("blocks,msg", [
    ((0, 2), r"blocks \[0, 2\], but must sit in the last 2 contiguous blocks \[1, 2\]"),
    ((0, 1), r"blocks \[0, 1\], but must sit in the last 2 contiguous blocks \[1, 2\]"),
])
def test_refuses_adapters_outside_the_last_blocks(tmp_path, trunk3, blocks, msg):
    with pytest.raises(ConvertError, match=msg):
        _convert(tmp_path, trunk3, {"model": make_ref(trunk3, blocks=blocks).state_dict()})


def test_refuses_more_blocks_than_the_trunk_has(trunk3):
    state = RefModel(trunk3.visual, 4, (3, 1, 1), True, False, {0, 1, 2, 3}, 2, num_blocks=4).state_dict()
    with pytest.raises(ConvertError, match=r"blocks \[0, 1, 2, 3\], but this trunk has only 3 blocks"):
        infer_adapter_config(state, NUM_BLOCKS)


def test_refuses_garbage_and_wrong_contents(tmp_path, trunk3):
    (tmp_path / "garbage.pth").write_bytes(os.urandom(2048))
    with pytest.raises(ConvertError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "garbage.pth")
    with pytest.raises(ConvertError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")
    state = make_ref(trunk3).state_dict()
    with pytest.raises(ConvertError, match=r"unexpected tensors \['conv1.weight'\]"):
        infer_adapter_config({**state, "conv1.weight": torch.zeros(1)}, NUM_BLOCKS)
    with pytest.raises(ConvertError, match=r"head \['fc.weight'\] is missing"):
        infer_adapter_config({k: v for k, v in state.items() if k != "fc.weight"}, NUM_BLOCKS)
    with pytest.raises(ConvertError, match=r"adapter_pre_mlp lacks \['conv.bias'\]"):
        infer_adapter_config({k: v for k, v in state.items() if k != "transformer.resblocks.2.adapter_pre_mlp.conv.bias"}, NUM_BLOCKS)
    nan = dict(state)
    nan["transformer.resblocks.1.adapter_pre_attn.fc2.bias"] = torch.full((DIM,), float("nan"))
    with pytest.raises(ConvertError, match="fc2.bias' holds NaN"):
        _convert(tmp_path, trunk3, {"model": nan})
    with pytest.raises(ConvertError, match="no adapter tensors"):
        _convert(tmp_path, trunk3, {"model": {"fc.weight": torch.zeros(5, DIM), "fc.bias": torch.zeros(5)}})


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


def test_never_unpickles_objects(tmp_path, trunk3):
    marker = tmp_path / "pwned"
    torch.save({"model": make_ref(trunk3).state_dict(), "args": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ConvertError, match="weights_only=True"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_labels_file(tmp_path):
    (tmp_path / "a.txt").write_text("run\n\nwalk\n")
    with pytest.raises(ConvertError, match=r"line\(s\) \[2\] are blank"):
        read_labels(tmp_path / "a.txt")
    (tmp_path / "b.txt").write_text("\n\n")
    with pytest.raises(ConvertError, match="is empty"):
        read_labels(tmp_path / "b.txt")
    (tmp_path / "c.txt").write_text("  run \nwalk\n\n")
    assert read_labels(tmp_path / "c.txt") == ("run", "walk")
