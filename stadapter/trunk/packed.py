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

``int8=True`` (``--quantize int8``, or ``auto`` where it pays) runs the four linears in int8 instead (:class:`Int8Linear`, in an
:class:`Int8Block`): a CPU's int8 dot products (AVX512-VNNI, AMX-INT8) do twice the multiply-adds of
its bf16 ones. That is not the block's arithmetic: each linear's output moves by the quantisation of
its weight (per output channel) and of its input (per call, over the whole tensor).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def packing_available(int8: bool = False) -> bool:
    """Whether this torch build has the oneDNN ops used here (``int8``: those of :class:`Int8Linear`) and oneDNN is on."""
    ops = torch.ops.mkldnn
    if int8:
        ops = torch.ops.onednn
        names: tuple[str, ...] = ("qlinear_prepack", "qlinear_pointwise")
    else:
        names = ("_reorder_linear_weight", "_linear_pointwise")
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and all(hasattr(ops, name) for name in names))


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


ZERO_POINT = 0x80  # Int8Linear's inputs: uint8, 128 for 0


class Int8Linear:
    """``F.linear`` (optionally followed by an exact GELU) in int8, the output in the input's dtype.

    The weight is quantised once, symmetric per output channel (its largest magnitude to 127); the input on
    every call, symmetric over the whole tensor (one scale: oneDNN's int8 matmul takes one for its input).
    oneDNN accumulates the int8 products in int32 and applies both scales, the bias and the GELU on the way out.
    An input with a NaN or an infinity has no scale: the output is all NaN (as its products would make it).
    """

    def __init__(self, layer_weight: Tensor, bias: Optional[Tensor]):
        w = layer_weight.detach().float()
        self.weight_scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q = torch.round(w / self.weight_scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.weight = torch.ops.onednn.qlinear_prepack(q, None)
        self.weight_zero = torch.zeros(q.shape[0], dtype=torch.long)
        self.bias = None if bias is None else bias.detach()
        self.out_features = int(q.shape[0])

    def __call__(self, x: Tensor, gelu: bool = False) -> Tensor:
        lo, hi = torch.aminmax(x)
        largest = max(-float(lo), float(hi))
        shape = (*x.shape[:-1], self.out_features)
        if not math.isfinite(largest):
            return torch.full(shape, math.nan, dtype=x.dtype)
        scale = largest / 127 if largest > 0 else 1.0
        # uint8 around 128: oneDNN multiplies uint8 by int8 in hardware (VNNI); an int8 input takes a path thousands
        # of times slower. The scaled input lies in [-127, 127]; it goes to int8 (a vectorised conversion, unlike bf16
        # to uint8) and flipping each byte's top bit makes that int8 v the uint8 v + 128.
        q = (x * (1 / scale)).round_().to(torch.int8).view(torch.uint8).bitwise_xor_(ZERO_POINT).view(-1, x.shape[-1])
        out = torch.ops.onednn.qlinear_pointwise(q, scale, ZERO_POINT, self.weight, self.weight_scale, self.weight_zero,
                                                 self.bias, 1.0, 0, x.dtype, "gelu" if gelu else "none", [],
                                                 "none" if gelu else "")
        return out.view(shape)


class PackedBlock:
    """One open_clip ``ResidualAttentionBlock``'s residual branches: ``attention(x)`` is
    ``ls_1(attention(ln_1(x)))`` and ``mlp(x)`` is ``ls_2(mlp(ln_2(x)))`` of the block."""

    row_calls = False  # whether the trunk must run each row of a batch through it in a call of its own

    def __init__(self, blk: Any, rows_hint: Optional[int]):
        attn = blk.attn
        self.blk = blk
        self.heads = int(attn.num_heads)
        self.ln_1, qkv_weight = self.fold(blk.ln_1, attn.in_proj_weight)
        self.ln_2, fc_weight = self.fold(blk.ln_2, blk.mlp.c_fc.weight)
        self.qkv = self.linear(qkv_weight, attn.in_proj_bias, rows_hint)
        self.out = self.linear(attn.out_proj.weight, attn.out_proj.bias, rows_hint)
        self.fc = self.linear(fc_weight, blk.mlp.c_fc.bias, rows_hint)
        self.proj = self.linear(blk.mlp.c_proj.weight, blk.mlp.c_proj.bias, rows_hint)
        self.exact_gelu = isinstance(blk.mlp.gelu, nn.GELU)  # else QuickGELU, applied after the linear

    @staticmethod
    def linear(weight: Tensor, bias: Optional[Tensor], rows_hint: Optional[int]) -> "PackedLinear | Int8Linear":
        return PackedLinear(weight, bias, rows_hint)

    @staticmethod
    def fold(norm: nn.Module, weight: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """The LayerNorm before a linear and that linear's weight, as the block runs them (here: as they are)."""
        return norm, weight

    def attention(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(self.ln_1(x)).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [n, heads, length, head dim]
        return self.blk.ls_1(self.out(o.transpose(1, 2).reshape(n, length, dim)))

    def mlp(self, x: Tensor) -> Tensor:
        h = self.ln_2(x)
        h = self.fc(h, gelu=True) if self.exact_gelu else self.blk.mlp.gelu(self.fc(h))
        return self.blk.ls_2(self.proj(h))


class Int8Block(PackedBlock):
    """A :class:`PackedBlock` whose linears are :class:`Int8Linear` and whose attention runs frame by frame as two
    bf16 ``bmm`` around a softmax, reading q, k and v where the in-projection left them (no copies). For ViT-B/16's
    197 tokens that is about twice as fast as ``scaled_dot_product_attention``'s CPU kernel (docs/benchmarks.md);
    its scores are rounded to bf16 before the softmax (SDPA keeps them in fp32), an error small beside the int8
    linears' own."""

    row_calls = True  # an Int8Linear scales its whole input by one value: one row a call keeps rows independent

    @staticmethod
    def linear(weight: Tensor, bias: Optional[Tensor], rows_hint: Optional[int]) -> "PackedLinear | Int8Linear":
        return Int8Linear(weight, bias)

    @staticmethod
    def fold(norm: nn.Module, weight: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """SmoothQuant's migration (Xiao et al., 2023), folded into the LayerNorm: input channel j of the linear is
        divided by s_j (through the norm's gain and bias) and its weight column multiplied by s_j, the same product in
        exact arithmetic. One input channel that reaches far (a large gain) would otherwise set the whole input's
        int8 scale and leave the others few levels; s_j = sqrt(reach_j / largest weight of column j), with the
        reach |gain_j| + |bias_j| (the normalised values are of order one), evens out the two sides' ranges."""
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            return norm, weight
        gain, bias, w = norm.weight.float(), norm.bias.float(), weight.float()
        reach, column = gain.abs() + bias.abs(), w.abs().amax(dim=0)
        usable = (reach > 0) & (column > 0)  # a channel with nothing on one side keeps s = 1
        s = torch.ones_like(reach)
        if bool(usable.any()):
            s[usable] = (reach[usable] / column[usable]).sqrt()
            s /= s[usable].median()  # a common factor cancels in the product; this one keeps the gains near their own
        shape, eps = tuple(norm.normalized_shape), float(norm.eps)
        # open_clip's LayerNormFp32 computes in float32 whatever its input; the others in their own dtype
        dtype = torch.float32 if type(norm).__name__ == "LayerNormFp32" else norm.weight.dtype
        new_gain, new_bias = (gain / s).to(dtype), (bias / s).to(dtype)
        return (lambda x: F.layer_norm(x.to(dtype), shape, new_gain, new_bias, eps).to(x.dtype)), w * s

    def attention(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        head = dim // self.heads
        qkv = self.qkv(self.ln_1(x)).view(n, length, 3, self.heads, head)
        out = torch.empty(n, length, self.heads, head, dtype=x.dtype)
        for f in range(n):
            q, k, v = (qkv[f, :, i].transpose(0, 1) for i in range(3))  # [heads, length, head dim], strided
            scores = torch.bmm(q, k.transpose(1, 2)).mul_(head ** -0.5)
            out[f] = torch.bmm(torch.softmax(scores, -1), v).transpose(0, 1)
        return self.blk.ls_1(self.out(out.view(n, length, dim)))


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


def pack_blocks(blocks: Any, rows_hint: Optional[int] = None, int8: bool = False,
                release: bool = True) -> Optional[list[PackedBlock]]:
    """Every block packed, or None when oneDNN's ops are missing or some block is not :func:`packable`.

    ``rows_hint``: the token rows a linear usually sees (frames x tokens per call); oneDNN picks the
    weight layout for it, and any other row count still computes correctly. ``int8``: the linears in int8
    (:class:`Int8Linear`).

    Each block's own linear weights are given back as soon as its packed copies exist (:func:`release_linears`):
    the trunk runs its packed blocks from then on, and the memory freed by one block is reused by the next one's
    copies (docs/benchmarks.md measures the resident memory saved). ``release=False`` keeps them, for a caller that
    may yet discard the packed blocks (and then releases them itself if it keeps them).
    """
    if not packing_available(int8) or not all(packable(b) for b in blocks):
        return None
    packed = []
    with torch.no_grad():
        for b in blocks:
            packed.append((Int8Block if int8 else PackedBlock)(b, rows_hint))
            if release:
                release_linears(b)
    return packed


def release_linears(blk: Any) -> None:
    """Give back a packed block's own linear weights: each becomes a zero-stride view of one zero of its shape, dtype
    and device, so the trunk's parameter count and what it says of its dtype hold, while its values are gone."""
    for module, name in ((blk.attn, "in_proj_weight"), (blk.attn.out_proj, "weight"), (blk.mlp.c_fc, "weight"),
                         (blk.mlp.c_proj, "weight")):
        weight = getattr(module, name)
        weight.data = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
