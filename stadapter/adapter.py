"""The ST-Adapter: ``x + W_up(f(DWConv3D(W_down x)))`` on the patch tokens.

The math lives in one functional routine, :func:`apply_adapter`, over weights
stacked for K tasks (``SlotWeights``, leading dim K). A batch either belongs to
one task (``task_index is None``: the K=1 weights are used directly, no gather)
or mixes tasks (``task_index[b]`` picks each clip's weights). Training, the
server and ONNX export all run this same routine.

The depthwise 3D conv is written as a sum of shifted, per-channel scaled copies
in channels-last layout. For the usual (3,1,1) kernel that is three fused
multiply-adds, needs no permute, and, unlike a grouped ``conv3d`` whose group
count would have to be ``B*r``, keeps the batch axis dynamic in ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AdapterConfig


@dataclass(frozen=True)
class SlotWeights:
    """One adapter slot's tensors for K tasks (leading dim K)."""

    fc1_w: Tensor  # [K, r, d]
    fc1_b: Tensor  # [K, r]
    conv_w: Tensor  # [K, kt, kh, kw, r]
    conv_b: Tensor  # [K, r]
    fc2_w: Tensor  # [K, d, r]
    fc2_b: Tensor  # [K, d]

    @property
    def num_tasks(self) -> int:
        return self.fc1_w.shape[0]

    @property
    def width(self) -> int:
        return self.fc1_w.shape[1]

    @property
    def kernel(self) -> tuple[int, int, int]:
        return tuple(self.conv_w.shape[1:4])  # type: ignore[return-value]

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.fc1_w, self.fc1_b, self.conv_w, self.conv_b, self.fc2_w, self.fc2_b)

    def map(self, fn) -> "SlotWeights":
        return SlotWeights(*(fn(t) for t in self.tensors()))


def _activation(x: Tensor, name: str) -> Tensor:
    if name == "none":
        return x
    if name == "gelu":
        return F.gelu(x)
    if name == "quickgelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown adapter activation {name!r}")


def _depthwise_conv_cl(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Depthwise 3D cross-correlation with 'same' zero padding, channels last.

    z: [B, T, h, w, r]; weight: [kt, kh, kw, r] (shared) or [B, kt, kh, kw, r]
    (per clip); bias: [r] or [B, r]. Same result as ``nn.Conv3d(groups=r)``.
    """
    B, T, h, w, r = z.shape
    per_clip = weight.dim() == 5
    kt, kh, kw = weight.shape[-4:-1]
    pt, ph, pw = kt // 2, kh // 2, kw // 2
    zp = F.pad(z, (0, 0, pw, pw, ph, ph, pt, pt)) if (pt or ph or pw) else z
    if per_clip:
        weight = weight.reshape(B, kt, kh, kw, 1, 1, 1, r)
        out = bias.reshape(B, 1, 1, 1, r).to(z.dtype)
    else:
        out = bias.to(z.dtype)
    for i in range(kt):
        for j in range(kh):
            for k in range(kw):
                wk = weight[:, i, j, k] if per_clip else weight[i, j, k]
                out = out + wk * zp[:, i : i + T, j : j + h, k : k + w, :]
    return out


def apply_adapter(
    x: Tensor,
    num_frames: int,
    grid: tuple[int, int],
    weights: SlotWeights,
    task_index: Optional[Tensor] = None,
    activation: str = "none",
) -> Tensor:
    """Run one adapter slot.

    Args:
        x: tokens ``[B*T, 1 + h*w, d]``, frames of a clip contiguous; token 0 is CLS.
        num_frames: T.
        grid: (h, w) patch grid.
        weights: the slot's weights for K tasks.
        task_index: ``[B]`` long in [0, K) for a mixed batch; None when K == 1.
        activation: nonlinearity after the conv.

    Returns:
        tokens of the same shape; CLS unchanged, patches + adapter delta.
    """
    BT, L, d = x.shape
    h, w = grid
    T = num_frames
    if BT % T != 0 or L != 1 + h * w:
        raise ValueError(f"apply_adapter: tokens {tuple(x.shape)} do not fit T={T}, grid={grid}")
    B = BT // T
    cls_tok, patches = x[:, :1], x[:, 1:]
    p = patches.reshape(B, T * h * w, d)  # [B, T*h*w, d]
    if task_index is None:
        delta = adapter_delta(p, T, grid, weights, activation)
    else:
        # index_select, not advanced indexing (w[task_index]): the same rows, through the dim-0 gather that is faster on CPU
        fc1_w, fc1_b, conv_w, conv_b, fc2_w, fc2_b = (t.index_select(0, task_index) for t in weights.tensors())
        z = torch.baddbmm(fc1_b.unsqueeze(1), p, fc1_w.transpose(1, 2))  # fc1_w [B, r, d]
        z = _depthwise_conv_cl(z.reshape(B, T, h, w, -1), conv_w, conv_b)
        z = _activation(z, activation).reshape(B, T * h * w, -1)
        delta = torch.baddbmm(fc2_b.unsqueeze(1), z, fc2_w.transpose(1, 2))  # fc2_w [B, d, r]
    patches = patches + delta.reshape(BT, h * w, d)
    return torch.cat([cls_tok, patches], dim=1)


def adapter_delta(p: Tensor, num_frames: int, grid: tuple[int, int], weights: SlotWeights, activation: str) -> Tensor:
    """One task's adapter output (without the residual) for patch tokens ``p`` [B, T*h*w, d] -> [B, T*h*w, d].

    ``weights`` holds one task (K == 1); its tensors may be strided views (a slot of a bank).
    """
    if weights.num_tasks != 1:
        raise ValueError(f"apply_adapter: {weights.num_tasks} tasks stacked but no task_index given")
    B, _, d = p.shape
    h, w = grid
    T = num_frames
    z = F.linear(p, weights.fc1_w[0], weights.fc1_b[0])  # [B, T*h*w, r]
    z = _depthwise_conv_cl(z.reshape(B, T, h, w, -1), weights.conv_w[0], weights.conv_b[0])
    z = _activation(z, activation).reshape(B, T * h * w, -1)
    return F.linear(z, weights.fc2_w[0], weights.fc2_b[0])  # [B, T*h*w, d]


class STAdapter(nn.Module):
    """One task's adapter at one slot, with the public code's parameter names.

    ``fc1`` = W_down, ``conv`` = depthwise Conv3d (its weight layout
    ``[r, 1, kt, kh, kw]`` is what checkpoints store), ``fc2`` = W_up. Conv
    weight/bias and both linear biases start at zero, so a new adapter is the
    identity and the video model starts as the image model.
    """

    def __init__(self, dim: int, cfg: AdapterConfig):
        super().__init__()
        r = cfg.width
        self.activation = cfg.activation
        self.fc1 = nn.Linear(dim, r)
        kt, kh, kw = cfg.kernel
        self.conv = nn.Conv3d(r, r, kernel_size=(kt, kh, kw), padding=(kt // 2, kh // 2, kw // 2), groups=r)
        self.fc2 = nn.Linear(r, dim)
        for t in (self.conv.weight, self._bias(self.conv), self._bias(self.fc1), self._bias(self.fc2)):
            nn.init.zeros_(t)

    @staticmethod
    def _bias(layer: nn.Linear | nn.Conv3d) -> Tensor:
        assert layer.bias is not None  # built with bias=True
        return layer.bias

    def slot_weights(self) -> SlotWeights:
        """K=1 view of the parameters (differentiable, no copy)."""
        return SlotWeights(
            fc1_w=self.fc1.weight.unsqueeze(0),
            fc1_b=self._bias(self.fc1).unsqueeze(0),
            conv_w=self.conv.weight[:, 0].permute(1, 2, 3, 0).unsqueeze(0),
            conv_b=self._bias(self.conv).unsqueeze(0),
            fc2_w=self.fc2.weight.unsqueeze(0),
            fc2_b=self._bias(self.fc2).unsqueeze(0),
        )

    def forward(self, x: Tensor, num_frames: int, grid: tuple[int, int]) -> Tensor:
        return apply_adapter(x, num_frames, grid, self.slot_weights(), None, self.activation)


def slot_weights_from_state(prefix: str, state: dict[str, Tensor]) -> SlotWeights:
    """K=1 slot weights from checkpoint tensors named ``{prefix}.{fc1,conv,fc2}.{weight,bias}``."""
    conv_w = state[f"{prefix}.conv.weight"]  # [r, 1, kt, kh, kw]
    return SlotWeights(
        fc1_w=state[f"{prefix}.fc1.weight"].unsqueeze(0),
        fc1_b=state[f"{prefix}.fc1.bias"].unsqueeze(0),
        conv_w=conv_w[:, 0].permute(1, 2, 3, 0).contiguous().unsqueeze(0),
        conv_b=state[f"{prefix}.conv.bias"].unsqueeze(0),
        fc2_w=state[f"{prefix}.fc2.weight"].unsqueeze(0),
        fc2_b=state[f"{prefix}.fc2.bias"].unsqueeze(0),
    )
