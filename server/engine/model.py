"""The model side of serving: one trunk, the device slots, and the batched forward.

:meth:`ModelRunner.forward` runs on the single model thread (never on the event
loop). Each task version of a batch is activated into a device slot
(:class:`server.engine.slots.AdapterSlots`; no per-batch concatenation). A one-task batch
runs on narrow views of its slot (the library's K=1 fast path). A mixed batch runs
with a per-row slot index: the weights are gathered per row and applied with batched
GEMMs (on CPU, a chunk of rows that are all one task's runs on that task's views). A
clip with V views is V rows; its answer is the softmax averaged over its rows.

Clips of one batch that hand in the same views tensor (one request's decode, submitted
once per task) share one input: when their tasks adapt only the last blocks, the patch
embedding and the blocks below the lowest adapted one run once for that input, and
their tokens fan out to the task rows (``VideoTrunk.forward(..., row_input=...)``).
Inputs are matched by object identity, never by content: every views tensor of a
batch is alive during its forward, so two distinct clips cannot share an identity.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from server.engine.slot_copies import has_streams
from server.engine.slots import AdapterSlots, Lease
from server.registry.registry import TaskVersion
from stadapter.bank import AdapterStack, SlotBank
from stadapter.devices import native_bf16
from stadapter.trunk import VideoTrunk
from stadapter.video import normalise_views


def _blanks(n: int, frames: int, size: int) -> list[Tensor]:
    """``n`` blank one-view clips [1, T, 3, S, S] in uint8, as the decoders hand clips over, each its own tensor
    (clips share an input only by identity)."""
    return list(torch.zeros(n, 1, frames, 3, size, size, dtype=torch.uint8).unbind(0))


WarmupGroup = tuple[int, int, str]  # (frames, input size, adapter activation): what clips of one batch share


@dataclass(frozen=True)
class WarmupRun:
    """One kind of warm-up forward of one batch group, run at every batch-size bucket: ``one-task`` (the fast
    path), ``mixed`` (two tasks, each row a clip of its own) or ``shared-prefix`` (two tasks that leave blocks
    unadapted, each clip going to both)."""

    kind: str
    tvs: tuple[TaskVersion, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """(frames, input size) of the group's clips."""
        s = self.tvs[0].spec.sampling
        return s.num_frames, s.input_size


class WarmupPlan:
    """The warm-up's runs, decided as task versions are added one at a time (the start's scan adds each version as
    it reads it, so the warm-up can begin before the scan ends): per group (:data:`WarmupGroup`), a one-task run
    for its first task, a mixed run once it has two, a shared-prefix run once two of its tasks leave blocks
    unadapted (``prefix_blocks(tv) > 0``). :meth:`add` returns the runs the version completes, each run once; the
    adds of a list of versions give the runs of :meth:`ModelRunner.warmup` over that list."""

    def __init__(self, prefix_blocks: Callable[[TaskVersion], int]):
        self.prefix_blocks = prefix_blocks
        self._groups: dict[WarmupGroup, tuple[list[TaskVersion], list[TaskVersion]]] = {}

    def add(self, tv: TaskVersion) -> list[WarmupRun]:
        s = tv.spec.sampling
        members, sharing = self._groups.setdefault((s.num_frames, s.input_size, tv.spec.adapter.activation), ([], []))
        runs = []
        if len(members) < 2:
            members.append(tv)
            runs.append(WarmupRun("one-task" if len(members) == 1 else "mixed", tuple(members)))
        if len(sharing) < 2 and self.prefix_blocks(tv) > 0:
            sharing.append(tv)
            if len(sharing) == 2:
                runs.append(WarmupRun("shared-prefix", tuple(sharing)))
        return runs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype``: a named dtype as given; ``auto`` = bfloat16 where the device multiplies it natively
    (:func:`stadapter.devices.native_bf16`: a GPU of compute capability 8.0+, a CPU with AMX or AVX512-BF16),
    else float16 on a GPU and float32 on a CPU."""
    if name == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def prepare_trunk(trunk: VideoTrunk, device: torch.device, dtype: torch.dtype, cpu_chunk_bytes: int,
                  int8: bool = False) -> bool:
    """How the loaded trunk serves on its device. On a CPU its blocks run over a few clips at a time
    (``cpu_chunk_bytes``) and, in bf16, with their weights packed once for oneDNN
    (:meth:`VideoTrunk.pack_for_cpu`; ``int8``: quantised to int8, ``--quantize int8``; ``python -m bench.serving
    --cpu-dtype`` compares). Returns whether the weights were packed."""
    if int8 and (device.type != "cpu" or dtype != torch.bfloat16):
        raise ValueError(f"--quantize int8 runs on a CPU in bfloat16, not on device {device} in {dtype_name(dtype)} "
                         "(give --device cpu --dtype bfloat16, or leave --quantize none)")
    if device.type != "cpu":
        return False
    trunk.chunk_bytes = cpu_chunk_bytes  # blocks over a few frames at a time: faster on a CPU
    if dtype != torch.bfloat16:
        return False
    packed = trunk.pack_for_cpu(cpu_rows_hint(trunk, dtype, cpu_chunk_bytes), int8)
    if int8 and not packed:
        raise ValueError("--quantize int8: this torch has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise), "
                         "or the trunk's blocks are not plain open_clip attention-and-MLP blocks")
    return packed


def cpu_rows_hint(trunk: VideoTrunk, dtype: torch.dtype, cpu_chunk_bytes: int) -> Optional[int]:
    """oneDNN's hint when packing the trunk's weights: the token rows a linear sees a call (``--cpu-chunk-bytes``)."""
    return cpu_chunk_bytes // (trunk.dim * (torch.finfo(dtype).bits // 8)) or None


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as ``--dtype`` spells it (``bfloat16``, not ``torch.bfloat16``)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BatchOutput:
    probs: list[Tensor]  # per clip: [C] softmax averaged over its views (cpu, float32)
    compute_s: float  # the forward alone (staging, which may overlap the previous forward, is stage_s)
    clips: int
    rows: int
    tasks: int
    shared_rows: int = 0  # rows whose embedding and unadapted blocks another row's computation gave
    stage_s: float = 0.0  # the batch's staging (ModelRunner.stage)


@dataclass(frozen=True)
class StagedBatch:
    """A batch ready to compute (:meth:`ModelRunner.stage`): its slots leased, its input on the device."""

    clips: list[tuple[TaskVersion, Tensor]]
    tvs: list[TaskVersion]  # distinct versions
    rows: list[int]  # rows per clip
    lease: Lease
    stack: AdapterStack
    task_index: Optional[Tensor]
    frames: Tensor  # the distinct inputs on the device (float32, normalised), [inputs' rows, T, 3, S, S]
    row_input: Optional[Tensor]
    ready: Optional[torch.cuda.Event]  # recorded on the side stream after the copies (CUDA)
    stage_s: float

    def release(self) -> None:
        """Give the slots back without computing (a staged batch that will not run)."""
        self.lease.end()


class ModelRunner:
    """The batched forward over the device slots.

    Args:
        trunk: the loaded trunk.
        slots: the device slots (device and dtype are theirs).
        max_rows: the most rows a forward gets (``--max-batch-size``); warm-up covers every
            batch-size bucket up to it.
    """

    def __init__(self, trunk: VideoTrunk, slots: AdapterSlots, max_rows: Optional[int] = None):
        self.trunk = trunk
        self.slots = slots
        self.device = slots.device
        self.dtype = slots.dtype
        self.max_rows = max_rows
        self._staging: Optional[Tensor] = None  # pinned host buffer for the one copy back per batch (CUDA)
        self._side: Optional[torch.cuda.Stream] = None  # the staging copies' stream (CUDA), made on first use

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
        each row a clip of its own as in serving (without ``max_rows``: one row, and two
        rows mixed). When two of the group's tasks leave blocks unadapted, a mixed forward
        whose clips each go to both tasks (one request naming two tasks) warms the shared
        prefix too. First forwards of a shape are slow everywhere (allocator; on CUDA the
        context, library handles and kernel choice per shape). Returns the number of forwards run.
        """
        plan = WarmupPlan(lambda tv: self.trunk.prefix_blocks(tv.host_stack))
        return self.warmup_runs([run for tv in tvs for run in plan.add(tv)])

    def warmup_runs(self, runs: Sequence[WarmupRun]) -> int:
        """The forwards of ``runs`` (:class:`WarmupPlan`), each at every batch-size bucket; returns how many ran."""
        sizes = self.batch_buckets()
        mixed_sizes = [n for n in sizes if n >= 2] or ([2] if self.max_rows is None else [])
        count = 0
        for run in runs:
            frames, size = run.shape
            tvs = run.tvs
            for n in sizes if run.kind == "one-task" else mixed_sizes:
                if run.kind == "shared-prefix":
                    shared = _blanks((n + 1) // 2, frames, size)
                    self.forward([(tvs[i % 2], shared[i // 2]) for i in range(n)])
                else:
                    self.forward([(tvs[i % len(tvs)], b) for i, b in enumerate(_blanks(n, frames, size))])
                count += 1
        return count

    def forward(self, clips: Sequence[tuple[TaskVersion, Tensor]]) -> BatchOutput:
        """clips: (task version, views [V, T, 3, S, S]) with equal T and S -> per-clip probabilities."""
        return self.run(self.stage(clips))

    @torch.inference_mode()
    def stage(self, clips: Sequence[tuple[TaskVersion, Tensor]]) -> StagedBatch:
        """Everything of a forward but the compute: the slots (activating what is cold), the adapters' views and
        the input on the device (on CUDA: through pinned host memory, on a side stream), normalised there when it
        comes as uint8 (:meth:`_normalised`).

        May run on another thread while :meth:`run` computes the previous batch (the batcher stages a full
        batch that way): the lease pins this batch's slots, so nothing it uses is evicted meanwhile. The
        caller must hand the result to :meth:`run` (which ends the lease) or :meth:`StagedBatch.release` it.
        """
        t0 = time.perf_counter()
        tvs = list({tv.uid: tv for tv, _ in clips}.values())
        lease = self.slots.lease(tvs, self._side_stream())  # cold tasks' weights copied on the side stream too
        try:
            with self._copy_stream():
                rows = [views.shape[0] for _, views in clips]
                stack, task_index = self._adapters(lease.bank, [lease.slots[tv.uid] for tv, _ in clips], rows)
                inputs, row_input = self._inputs(stack, [views for _, views in clips])
                task_of = {id(v): tv for tv, v in clips}  # the views are alive in ``clips``: ids are unique
                frames = self._normalised(self._to_device(inputs), inputs, [task_of[id(v)] for v in inputs])
                ready = None
                if self._side is not None:
                    ready = torch.cuda.Event()
                    ready.record(self._side)
        except BaseException:
            lease.end()
            raise
        return StagedBatch(list(clips), tvs, rows, lease, stack, task_index, frames, row_input, ready,
                           time.perf_counter() - t0)

    @torch.inference_mode()
    def run(self, staged: StagedBatch) -> BatchOutput:
        """The forward of a staged batch (on the model thread); ends its lease."""
        t0 = time.perf_counter()
        s = staged
        with s.lease:
            if s.ready is not None:  # the side stream's copies come first
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(s.ready)
                for t in (s.frames, s.task_index, s.row_input):  # made on the side stream, read on this one
                    if t is not None:
                        t.record_stream(compute)
            logits = self.trunk(s.frames.to(self.dtype), s.stack, s.task_index, s.row_input).float()  # [N, C_max]
        for tv in s.tvs:
            if tv.retired:  # admitted before the registry retired it: it leaves once its requests end
                self.slots.retire(tv)
        classes = [tv.spec.num_classes for tv, _ in s.clips]
        host = self._to_host(self._clip_probs(logits, s.rows, classes))
        self.slots.report_copies()  # the activations this forward waited for are done: their times are known
        probs = [host[i, :c] for i, c in enumerate(classes)]  # [C] each
        shared = 0 if s.row_input is None else sum(s.rows) - s.frames.shape[0]
        return BatchOutput(probs, time.perf_counter() - t0, len(s.clips), sum(s.rows), len(s.tvs), shared, s.stage_s)

    def _side_stream(self) -> Optional[torch.cuda.Stream]:
        """The side stream the staging copies run on (CUDA, made on first use), else None."""
        if self._side is None and has_streams(self.device):
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _copy_stream(self):
        """The side stream as the current one (CUDA), else no stream at all."""
        side = self._side_stream()
        return contextlib.nullcontext() if side is None else torch.cuda.stream(side)

    def _to_device(self, inputs: list[Tensor]) -> Tensor:
        """One host tensor of the inputs and its copy on the device (uint8 as decoded, or float32; cast to the
        serving dtype on the compute stream). On CUDA the host tensor is pinned, so the copy is asynchronous;
        the caching host allocator keeps that block until the copy is done."""
        if len({v.dtype for v in inputs}) > 1:
            raise ValueError(f"a batch mixes input dtypes {sorted({str(v.dtype) for v in inputs})}")
        if self.device.type == "cpu":
            return torch.cat(inputs) if len(inputs) > 1 else inputs[0]
        n = sum(int(v.shape[0]) for v in inputs)
        host = torch.empty((n, *inputs[0].shape[1:]), dtype=inputs[0].dtype, pin_memory=self.device.type == "cuda")
        torch.cat(inputs, out=host)
        return host.to(self.device, non_blocking=True)

    def _normalised(self, frames: Tensor, inputs: list[Tensor], tvs: list[TaskVersion]) -> Tensor:
        """The model input: uint8 frames (as the decoders hand them over) normalised on their device with each
        input's mean/std (``stadapter.video.normalise_views``: exactly ``decode_clip``'s float32); float frames
        are model input already (benches, tests)."""
        if frames.dtype != torch.uint8:
            return frames
        norms = [(tv.spec.sampling.mean, tv.spec.sampling.std) for tv in tvs]
        if len(set(norms)) == 1:
            return normalise_views(frames, *norms[0])
        rows = [int(v.shape[0]) for v in inputs]
        per_row = [norm for norm, n in zip(norms, rows, strict=True) for _ in range(n)]
        mean, std = (torch.tensor([r[k] for r in per_row], dtype=torch.float32).view(-1, 1, 3, 1, 1) for k in (0, 1))
        return normalise_views(frames, mean, std)

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

    def _inputs(self, stack: AdapterStack, views: list[Tensor]) -> tuple[list[Tensor], Optional[Tensor]]:
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

    def _adapters(self, bank: SlotBank, slots: list[int], rows: list[int]) -> tuple[AdapterStack, Optional[Tensor]]:
        """The adapters for the clips' rows: a one-task view, or the bank + per-row slots."""
        distinct = sorted(set(slots))
        if len(distinct) == 1:
            return bank.view(distinct[0]), None
        idx = [s for s, n in zip(slots, rows, strict=True) for _ in range(n)]
        return bank.stacked(distinct), torch.tensor(idx, dtype=torch.long).to(self.device, non_blocking=True)  # [N]
