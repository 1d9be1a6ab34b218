"""A frozen trunk block's two sublayers with its weights packed once for oneDNN (bf16 on a CPU).

Eager bf16 on a CPU pays, on every call of every linear, for the weight in the layout
the user gave (oneDNN re-lays it out per call) and for the bias as a separate pass
(``addmm`` first copies the broadcast bias into the output), and the MLP's GELU is one
more pass over its widest activation. The trunk's weights never change, so this packs
each linear's weight once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``)
and calls oneDNN with the bias and the GELU fused (``torch.ops.mkldnn._linear_pointwise``: the
ops ``torch.compile``'s CPU backend emits for frozen weights, without compiling anything).
Attention runs through ``scaled_dot_product_attention`` (the fused CPU kernel) rather than
``nn.MultiheadAttention``'s fast path (separate ``bmm``s, a softmax and a re-layout copy).

The arithmetic is the same as the block's own (bf16 matmuls accumulating in fp32): only
the order of float additions may differ. :func:`pack_blocks` refuses (returns None) any
block it does not know how to run the same way.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def packing_available() -> bool:
    """Whether this torch build has the oneDNN ops used here and oneDNN is on."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear:
    """``F.linear`` (optionally followed by an exact GELU) with the weight packed once."""

    def __init__(self, layer_weight: Tensor, bias: Optional[Tensor], rows_hint: Optional[int]):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(layer_weight.detach(), rows_hint)
        self.bias = None if bias is None else bias.detach()
        self.out_features = int(layer_weight.shape[0])

    def __call__(self, x: Tensor, gelu: bool = False) -> Tensor:
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class PackedBlock:
    """One open_clip ``ResidualAttentionBlock``'s residual branches: ``attention(x)`` is
    ``ls_1(attention(ln_1(x)))`` and ``mlp(x)`` is ``ls_2(mlp(ln_2(x)))`` of the block."""

    def __init__(self, blk: Any, rows_hint: Optional[int]):
        attn = blk.attn
        self.blk = blk
        self.heads = int(attn.num_heads)
        self.qkv = PackedLinear(attn.in_proj_weight, attn.in_proj_bias, rows_hint)
        self.out = PackedLinear(attn.out_proj.weight, attn.out_proj.bias, rows_hint)
        self.fc = PackedLinear(blk.mlp.c_fc.weight, blk.mlp.c_fc.bias, rows_hint)
        self.proj = PackedLinear(blk.mlp.c_proj.weight, blk.mlp.c_proj.bias, rows_hint)
        self.exact_gelu = isinstance(blk.mlp.gelu, nn.GELU)  # else QuickGELU, applied after the linear

    def attention(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(self.blk.ln_1(x)).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [n, heads, length, head dim]
        return self.blk.ls_1(self.out(o.transpose(1, 2).reshape(n, length, dim)))

    def mlp(self, x: Tensor) -> Tensor:
        h = self.blk.ln_2(x)
        h = self.fc(h, gelu=True) if self.exact_gelu else self.blk.mlp.gelu(self.fc(h))
        return self.blk.ls_2(self.proj(h))


def packable(blk: Any) -> bool:
    """A bf16 block on the CPU that this module runs the same way: plain self-attention (one in-projection with a bias, no extra
    key/value biases, no zero attention, no dropout) and an MLP of c_fc, an exact GELU or QuickGELU, c_proj."""
    attn = getattr(blk, "attn", None)
    mlp = getattr(blk, "mlp", None)
    if not isinstance(attn, nn.MultiheadAttention) or not isinstance(mlp, nn.Sequential):
        return False
    if attn.in_proj_weight is None or attn.in_proj_weight.dtype != torch.bfloat16 or attn.in_proj_weight.device.type != "cpu":
        return False  # measured for bf16 on a CPU only
    if (not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None
            or attn.add_zero_attn or not attn.batch_first or (attn.dropout and attn.training)):
        return False
    if list(mlp._modules) != ["c_fc", "gelu", "c_proj"] or hasattr(blk, "ln_1_kv"):
        return False
    gelu = mlp.gelu
    exact = isinstance(gelu, nn.GELU) and gelu.approximate == "none"
    return exact or type(gelu).__name__ == "QuickGELU"


def pack_blocks(blocks: Any, rows_hint: Optional[int] = None) -> Optional[list[PackedBlock]]:
    """Every block packed, or None when oneDNN's ops are missing or some block is not :func:`packable`.

    ``rows_hint``: the token rows a linear usually sees (frames x tokens per call); oneDNN picks the
    weight layout for it, and any other row count still computes correctly.
    """
    if not packing_available() or not all(packable(b) for b in blocks):
        return None
    with torch.no_grad():
        return [PackedBlock(b, rows_hint) for b in blocks]
