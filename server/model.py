"""The model side of serving: one trunk, the device slots, and the batched forward.

:meth:`ModelRunner.forward` runs on the single model thread (never on the event
loop). Each task version of a batch is activated into a device slot
(:class:`server.slots.AdapterSlots`; no per-batch concatenation). A one-task batch
runs on narrow views of its slot (the library's K=1 fast path). A mixed batch runs
either with a per-row slot index (``gather``: the weights are gathered per row and
applied with batched GEMMs) or with its clips sorted by task (``segment``: one GEMM
per task over its contiguous rows); :func:`mixed_mode_for` picks one per device
type. A clip with V views is V rows; its answer is the softmax averaged over its rows.

Clips of one batch that hand in the same views tensor (one request's decode, submitted
once per task) share one input: when their tasks adapt only the last blocks, the patch
embedding and the blocks below the lowest adapted one run once for that input, and
their tokens fan out to the task rows (``VideoTrunk.forward(..., row_input=...)``).
Inputs are matched by object identity, never by content: every views tensor of a
batch is alive during its forward, so two distinct clips cannot share an identity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from stadapter.bank import AdapterStack, Segments, SlotBank
from stadapter.trunk import VideoTrunk

from .registry import TaskVersion
from .slots import AdapterSlots

MixedMode = Literal["gather", "segment"]


def mixed_mode_for(device: torch.device) -> MixedMode:
    """How a mixed batch runs on this device type: ``gather`` on CPU and on CUDA.

    CPU (measured, ``python -m bench.slot_bank``, 8 tasks in a batch, the shared 2-core
    machine): gather ran 1.30x segment's clips/s on the tiny trunk (32 x 8 frames) and
    1.26x on ViT-B/16 (8 x 2 frames): segments pay one small GEMM and a strided copy per
    task and slot, the gather's weight copy is small next to the GEMMs. CUDA (not
    measured, no GPU here): gather too, by reasoning: it launches one batched GEMM per
    adapter linear whatever the number of tasks, where segments launch one per task and
    per slot (a 32-task batch on 12 slots: hundreds of small launches), and the gathered
    weights (B x 2 x r x d per slot) are small next to the GPU's memory bandwidth.
    """
    return "gather"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@dataclass(frozen=True)
class BatchOutput:
    probs: list[Tensor]  # per clip: [C] softmax averaged over its views (cpu, float32)
    compute_s: float
    clips: int
    rows: int
    tasks: int
    shared_rows: int = 0  # rows whose embedding and unadapted blocks another row's computation gave


class ModelRunner:
    """The batched forward over the device slots.

    Args:
        trunk: the loaded trunk.
        slots: the device slots (device and dtype are theirs).
        mixed: how mixed batches run (default: :func:`mixed_mode_for` the device).
        max_rows: the most rows a forward gets (``--max-batch-size``); warm-up covers every
            batch-size bucket up to it.
    """

    def __init__(self, trunk: VideoTrunk, slots: AdapterSlots, mixed: Optional[MixedMode] = None,
                 max_rows: Optional[int] = None):
        self.trunk = trunk
        self.slots = slots
        self.device = slots.device
        self.dtype = slots.dtype
        self.mixed: MixedMode = mixed or mixed_mode_for(slots.device)
        self.max_rows = max_rows
        self._staging: Optional[Tensor] = None  # pinned host buffer for the one copy back per batch (CUDA)

    def batch_buckets(self) -> tuple[int, ...]:
        """Row counts the warm-up runs: powers of two below ``max_rows``, then ``max_rows`` (1 when unknown)."""
        if not self.max_rows:
            return (1,)
        sizes = [1]
        while sizes[-1] * 2 < self.max_rows:
            sizes.append(sizes[-1] * 2)
        return tuple(sizes + [self.max_rows] if self.max_rows > 1 else sizes)

    def warmup(self, tvs: Sequence[TaskVersion]) -> int:
        """Run the served shapes once before traffic, so the first request pays no one-time costs.

        Clips batch by (frames, input size, adapter activation); for each such group this
        runs, at every batch-size bucket (:meth:`batch_buckets`), a one-task forward (the
        fast path) and, when the group has several tasks, a two-task one (the mixed path),
        on blank clips (without ``max_rows``: one row, and two rows mixed). First forwards
        of a shape are slow everywhere (allocator; on CUDA the context, library handles
        and kernel choice per shape). Returns the number of forwards run.
        """
        groups: dict[tuple, list[TaskVersion]] = {}
        for tv in tvs:
            s = tv.spec.sampling
            groups.setdefault((s.num_frames, s.input_size, tv.host_stack.activation), []).append(tv)
        sizes = self.batch_buckets()
        mixed_sizes = [n for n in sizes if n >= 2] or ([2] if self.max_rows is None else [])
        runs = 0
        for (frames, size, _), members in groups.items():
            blank = torch.zeros(1, frames, 3, size, size)
            for n in sizes:
                self.forward([(members[0], blank)] * n)
                runs += 1
            for n in mixed_sizes if len(members) > 1 else ():
                self.forward([(members[i % 2], blank) for i in range(n)])
                runs += 1
        return runs

    @torch.inference_mode()
    def forward(self, clips: Sequence[tuple[TaskVersion, Tensor]]) -> BatchOutput:
        """clips: (task version, views [V, T, 3, S, S]) with equal T and S -> per-clip probabilities."""
        t0 = time.perf_counter()
        tvs = list({tv.uid: tv for tv, _ in clips}.values())
        with self.slots.lease(tvs) as lease:
            slot_of = [lease.slots[tv.uid] for tv, _ in clips]
            order = sorted(range(len(clips)), key=slot_of.__getitem__) if self.mixed == "segment" else list(range(len(clips)))
            rows = [clips[i][1].shape[0] for i in order]
            stack, task_index = self._adapters(lease.bank, [slot_of[i] for i in order], rows)
            inputs, row_input = self._inputs(stack, [clips[i][1] for i in order])
            frames = torch.cat(inputs).to(self.device, self.dtype, non_blocking=True)  # [inputs' rows, T, 3, S, S]
            logits = self.trunk(frames, stack, task_index, row_input).float()  # [N, C_max]
        for tv in tvs:
            if tv.retired:  # admitted before the registry retired it: it leaves once its requests end
                self.slots.retire(tv)
        host = self._to_host(self._clip_probs(logits, rows, [clips[i][0].spec.num_classes for i in order]))
        probs: list[Optional[Tensor]] = [None] * len(clips)
        for j, i in enumerate(order):
            probs[i] = host[j, : clips[i][0].spec.num_classes]  # [C]
        shared = 0 if row_input is None else sum(rows) - frames.shape[0]
        return BatchOutput(probs, time.perf_counter() - t0, len(clips), sum(rows), len(tvs), shared)  # type: ignore[arg-type]

    def _clip_probs(self, logits: Tensor, rows: list[int], classes: list[int]) -> Tensor:
        """logits [N, C_max] -> [clips, C_max]: each clip's softmax over its own classes, averaged over its rows."""
        n, c_max = len(rows), logits.shape[1]
        meta = torch.tensor([j for j, r in enumerate(rows) for _ in range(r)] + classes + rows, dtype=torch.long)
        meta = meta.to(logits.device, non_blocking=True)  # one small copy: [N] row -> clip | [n] classes | [n] rows
        row_clip, n_classes, n_rows = meta[:-2 * n], meta[-2 * n:-n], meta[-n:]
        cols = torch.arange(c_max, device=logits.device)
        p = logits.masked_fill(cols >= n_classes[row_clip].unsqueeze(1), float("-inf")).softmax(dim=-1)  # [N, C_max]
        sums = torch.zeros(n, c_max, device=logits.device, dtype=p.dtype).index_add_(0, row_clip, p)
        return sums / n_rows.unsqueeze(1).to(p.dtype)

    def _to_host(self, t: Tensor) -> Tensor:
        """The batch's one device-to-host copy (through a reused pinned buffer on CUDA)."""
        if self.device.type == "cpu":
            return t
        if self.device.type != "cuda":
            return t.cpu()
        if self._staging is None or self._staging.numel() < t.numel():
            self._staging = torch.empty(max(t.numel(), 1 << 12), dtype=t.dtype, pin_memory=True)
        buf = self._staging[: t.numel()].view(t.shape)
        buf.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return buf.clone()  # the callers keep it; the buffer serves the next batch

    def _inputs(self, stack: AdapterStack | Segments, views: list[Tensor]) -> tuple[list[Tensor], Optional[Tensor]]:
        """The distinct inputs of these clips (in order) and, when rows can share a prefix, the row -> input index.

        None (every clip its own rows, today's path) when no two clips hand in the same
        views tensor or when some task adapts block 0 (nothing to share).
        """
        first: dict[int, int] = {}  # id(views) -> index in distinct; the tensors are alive in ``views``
        distinct: list[Tensor] = []
        for v in views:
            if first.setdefault(id(v), len(distinct)) == len(distinct):
                distinct.append(v)
        if len(distinct) == len(views) or self.trunk.prefix_blocks(stack) == 0:
            return views, None
        offset = [0]
        for v in distinct:
            offset.append(offset[-1] + v.shape[0])
        idx = [offset[first[id(v)]] + j for v in views for j in range(v.shape[0])]
        return distinct, torch.tensor(idx, dtype=torch.long).to(self.device, non_blocking=True)  # [N]

    def _adapters(self, bank: SlotBank, slots: list[int], rows: list[int]) -> tuple[AdapterStack | Segments, Optional[Tensor]]:
        """The adapters for rows in this order: a one-task view, the bank + per-row slots, or segments."""
        distinct = sorted(set(slots))
        if len(distinct) == 1:
            return bank.view(distinct[0]), None
        if self.mixed == "gather":
            idx = [s for s, n in zip(slots, rows, strict=True) for _ in range(n)]
            return bank.stacked(distinct), torch.tensor(idx, dtype=torch.long).to(self.device, non_blocking=True)  # [N]
        seg_slots: list[int] = []
        bounds = [0]
        for s, n in zip(slots, rows, strict=True):  # clips are sorted by slot: each slot's rows are contiguous
            if not seg_slots or seg_slots[-1] != s:
                seg_slots.append(s)
                bounds.append(bounds[-1])
            bounds[-1] += n
        return bank.segments(seg_slots, bounds), None
