"""The frozen image trunk run over video, with adapters injected per block.

:class:`VideoTrunk` wraps an open_clip ``VisionTransformer`` without editing it:
it reuses the trunk's own modules (patch embedding, each block's ``ln_1``,
``attention``, ``ln_2``, ``mlp``, layer scales, ``ln_post``) and inserts the
adapter slots between them. Frames are folded into the batch (``[B*T, L, d]``)
so the image model sees images; only the adapters mix along time.

File handling (trunk folders, named pretrained tags, local weights) lives in
:mod:`stadapter.factory`; ``python -m stadapter.trunk init ...`` is its CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ..adapter import apply_adapter
from ..bank import AdapterStack, SlotKey
from ..config import TrunkSpec
from .packed import Int8Block, PackedBlock, pack_blocks, release_linears


class TrunkError(ValueError):
    """A trunk folder, config or weights file is unusable."""


def trunk_fingerprint(state: Mapping[str, Tensor], arch: Mapping[str, Any]) -> str:
    """sha256 over the architecture record and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(b"stadapter-trunk-fingerprint-v1\0")
    h.update(json.dumps(arch, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class VideoTrunk(nn.Module):
    """Frozen open_clip ViT applied frame-wise, with ST-Adapter slots.

    ``chunk_bytes`` (0: off) runs each block over as many whole clips at a time as keep its
    input tokens within that many bytes (at least one clip), the rows' results unchanged:
    on a CPU, blocks over a few frames at a time keep their activations small (faster on a
    large trunk such as ViT-B/16: 8 of its frames are 4.6 MiB of tokens), while a small
    trunk's whole batch fits at once (per-call overhead would cost more than it saves); on
    a GPU the whole batch at once is what keeps it busy.

    Args:
        visual: an open_clip ``VisionTransformer`` (class-token pooling).
        arch: architecture record (vision config + ``quick_gelu``), part of the fingerprint.
        fingerprint: precomputed fingerprint, or None to compute it now.
        spec: the trunk folder's record (``trunk.json``) when loaded from one (None for a bare module).
    """

    visual: Any  # open_clip's VisionTransformer (open_clip has no type information)
    blocks: Any

    def __init__(self, visual: Any, arch: Mapping[str, Any], fingerprint: Optional[str] = None,
                 spec: Optional[TrunkSpec] = None):
        super().__init__()
        self.spec = spec
        _check_supported(visual)
        self.visual = visual.eval().requires_grad_(False)
        self.arch = dict(arch)
        self.fingerprint = fingerprint or trunk_fingerprint(self.visual.state_dict(), self.arch)
        self.grid: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.image_size: int = int(visual.image_size[0])
        self.dim: int = int(visual.class_embedding.shape[0])
        self.blocks = visual.transformer.resblocks
        self.num_blocks: int = len(self.blocks)
        self.chunk_bytes = 0  # input-token bytes per block call (whole clips); 0 = the whole batch at once
        self.packed: Optional[list[PackedBlock]] = None  # the blocks packed for oneDNN (pack_for_cpu; never undone)

    def pack_for_cpu(self, rows_hint: Optional[int] = None, int8: bool = False) -> bool:
        """Run the blocks with their weights packed once for oneDNN (:mod:`stadapter.trunk.packed`; ``int8``: the
        linears quantised to int8): a bf16 trunk on a CPU. Returns whether it did (False, and nothing changed, for
        anything else). Once packed, the blocks' own linear weights are given back (they serve from the packed
        copies only), so a trunk is packed once."""
        if self.packed is not None:
            raise RuntimeError("VideoTrunk.pack_for_cpu: already packed, and the blocks' own weights were given back")
        self.packed = pack_blocks(self.blocks, rows_hint, int8)
        return self.packed is not None

    def pack_int8_within(self, rows_hint: Optional[int], probe: Tensor, max_error: float) -> float:
        """Pack the blocks with int8 linears (``pack_for_cpu(int8=True)``) if that moves the pooled features of
        ``probe`` (normalised frames [B, T, 3, H, W]) by at most ``max_error`` of their norm from the trunk's own
        unpacked answer; else pack them as the dtype has them (``pack_for_cpu()``: the int8 copies are dropped and
        the block weights were kept for it). Returns the relative distance measured, which decided (inf where int8
        cannot be packed here; NaN, from a trunk whose answer is not finite, packs without int8)."""
        if self.packed is not None:
            raise RuntimeError("VideoTrunk.pack_int8_within: already packed")
        with torch.no_grad():
            want = self.forward_features(probe).float()
            self.packed = pack_blocks(self.blocks, rows_hint, int8=True, release=False)
            if self.packed is None:
                self.pack_for_cpu(rows_hint)
                return math.inf
            got = self.forward_features(probe).float()
        error = float((got - want).norm() / want.norm())
        if error <= max_error:
            for blk in self.blocks:
                release_linears(blk)
            return error
        self.packed = None
        self.pack_for_cpu(rows_hint)
        return error

    @property
    def int8(self) -> bool:
        """Whether the blocks run with int8 linears (packed with ``int8=True``)."""
        return self.packed is not None and isinstance(self.packed[0], Int8Block)

    def train(self, mode: bool = True) -> "VideoTrunk":
        # The trunk stays in eval mode (no dropout, frozen statistics) whatever the caller does.
        super().train(False)
        return self

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.visual.parameters())

    def embed(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> tokens [N, 1 + h*w, d] (after ln_pre)."""
        v = self.visual
        x = v.conv1(images)  # [N, d, h, w]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, d]
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x)

    def prefix_blocks(self, stack: Optional[AdapterStack]) -> int:
        """How many blocks run before the first adapter of ``stack``: its lowest adapted block (all without one).

        These blocks (and the patch embedding before them) see no adapter, so their output
        depends on the input alone: rows that share an input can share it (``row_input``).
        """
        first = None if stack is None else stack.first_block
        return self.num_blocks if first is None else first

    def forward_features(
        self, frames: Tensor, stack: Optional[AdapterStack] = None, task_index: Optional[Tensor] = None,
        row_input: Optional[Tensor] = None,
    ) -> Tensor:
        """frames [B, T, 3, H, W] (normalised) -> pooled features [B, d] (or [N, d] with ``row_input``).

        ``stack`` holds the adapters (None = the plain image model, frame-mean);
        ``task_index`` [B] picks each clip's task in a mixed stack.

        ``row_input`` [N] (long, values in [0, B)) makes ``frames`` the distinct inputs of N
        rows: row n is input ``row_input[n]``. The patch embedding and the
        :meth:`prefix_blocks` blocks run once per input, their tokens are copied out to the
        rows (``index_select``), and the adapted blocks run per row; ``task_index`` then
        counts rows. Each row gets what running its input alone would give.
        """
        if frames.dim() != 5:
            raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        B, T, C, H, W = frames.shape
        if C != 3 or H != self.image_size or W != self.image_size:
            raise ValueError(
                f"frames {tuple(frames.shape)} do not fit the trunk: expected [B, T, 3, {self.image_size}, {self.image_size}]"
            )
        N = B if row_input is None else _check_rows(row_input, B)
        if task_index is not None and task_index.shape != (N,):
            raise ValueError(f"task_index {tuple(task_index.shape)} must have one entry per row ({N})")
        split = 0 if row_input is None else self.prefix_blocks(stack)
        x = self.embed(frames.reshape(B * T, C, H, W))  # [B*T, 1+h*w, d]
        x = self._blocks(range(split), x, T, None, None)
        if row_input is not None and split < self.num_blocks:
            x = x.unflatten(0, (B, T)).index_select(0, row_input).flatten(0, 1)  # [N*T, 1+h*w, d]
        x = self._blocks(range(split, self.num_blocks), x, T, stack, task_index)
        cls_tok = x[:, 0].reshape(-1, T, x.shape[-1]).mean(dim=1)  # [B or N, d]
        feats = self.visual.ln_post(cls_tok)
        if row_input is not None and split == self.num_blocks:
            feats = feats.index_select(0, row_input)  # no adapter at all: the features fan out
        return feats

    def _blocks(self, blocks: range, x: Tensor, T: int, stack: Optional[AdapterStack],
                task_index: Optional[Tensor]) -> Tensor:
        """These blocks over the rows of ``x`` [rows*T, 1+h*w, d]: all rows at once, or (:attr:`chunk_bytes`) in
        calls of whole rows whose tokens fit it (at least one row), planned once for all the blocks.

        Packed blocks that say so (:attr:`PackedBlock.row_calls`: int8) take one row a call whatever the chunk: their
        linears scale each call's input by its largest value, and a row's answer must not depend on its batch."""
        frame_bytes = x.shape[1] * x.shape[2] * x.element_size()
        if self.packed is not None and self.packed[0].row_calls:
            rows = 1
        else:
            rows = max(1, self.chunk_bytes // (frame_bytes * T)) if self.chunk_bytes else 0
        if not rows or x.shape[0] <= rows * T:
            for i in blocks:
                x = self._block(i, x, T, stack, task_index)
            return x
        n = -(-x.shape[0] // (rows * T))
        parts = [_one_task(stack, ti) for ti in (task_index.split(rows) if task_index is not None else [None] * n)]
        for i in blocks:
            x = torch.cat([self._block(i, part, T, *p) for part, p in zip(x.split(rows * T), parts, strict=True)])
        return x

    def _block(self, i: int, x: Tensor, T: int, stack: Optional[AdapterStack],
               task_index: Optional[Tensor]) -> Tensor:
        blk = self.blocks[i]
        packed = self.packed[i] if self.packed is not None else None
        x = self._adapt(x, T, stack, (i, "pre_attn"), task_index)
        x = x + (packed.attention(x) if packed is not None else blk.ls_1(blk.attention(q_x=blk.ln_1(x))))
        x = self._adapt(x, T, stack, (i, "pre_mlp"), task_index)
        return x + (packed.mlp(x) if packed is not None else blk.ls_2(blk.mlp(blk.ln_2(x))))

    def _adapt(self, x: Tensor, T: int, stack: Optional[AdapterStack], key: SlotKey,
               task_index: Optional[Tensor]) -> Tensor:
        if stack is None:
            return x
        s = stack.slots.get(key)
        return x if s is None else apply_adapter(x, T, self.grid, s, task_index, stack.activation)

    def forward(self, frames: Tensor, stack: AdapterStack, task_index: Optional[Tensor] = None,
                row_input: Optional[Tensor] = None) -> Tensor:
        """frames [B, T, 3, H, W] -> logits [B, C] (one task) or [B, C_max] (mixed, zero-padded).

        With ``row_input`` [N], ``frames`` are the distinct inputs and the logits are per row
        ([N, ...]); see :meth:`forward_features`.
        """
        feats = self.forward_features(frames, stack, task_index, row_input)
        return stack.head(feats, task_index)


def _one_task(stack: Optional[AdapterStack], task_index: Optional[Tensor]
              ) -> tuple[Optional[AdapterStack], Optional[Tensor]]:
    """A chunk of a mixed batch whose rows are all one task's runs as a one-task batch (narrow views of that
    task's weights, no per-row gather); chunks exist on CPU only, where reading the index costs no sync."""
    if task_index is None or stack is None or not bool((task_index == task_index[0]).all()):
        return stack, task_index
    return stack.task(int(task_index[0])), None


def _check_rows(row_input: Tensor, inputs: int) -> int:
    """The row count of a row -> input index (shape and dtype only: reading its values would sync a GPU;
    ``index_select`` refuses an index out of range)."""
    if row_input.dim() != 1 or row_input.dtype != torch.long:
        raise ValueError(f"row_input must be a 1-D long tensor of input indices in [0, {inputs}), "
                         f"got {row_input.dtype} {tuple(row_input.shape)}")
    return int(row_input.shape[0])


def _check_supported(visual: Any) -> None:
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "ln_post", "transformer", "grid_size")
    missing = [n for n in needed if not hasattr(visual, n)]
    if missing:
        raise TrunkError(f"unsupported vision tower {type(visual).__name__}: missing {missing} (need an open_clip ViT)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise TrunkError("unsupported vision tower: ST-Adapter needs class-token pooling (pool_type='tok', no attn_pool)")
    if getattr(visual.transformer, "batch_first", True) is not True:
        raise TrunkError("unsupported vision tower: transformer must be batch-first")
    blk = visual.transformer.resblocks[0]
    if not all(hasattr(blk, n) for n in ("ln_1", "attention", "ls_1", "ln_2", "mlp", "ls_2")):
        raise TrunkError(f"unsupported block type {type(blk).__name__}: need open_clip's ResidualAttentionBlock")

