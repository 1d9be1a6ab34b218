"""The model side of serving: one trunk, the device cache, and the batched forward.

:meth:`ModelRunner.forward` runs on the single model thread (never on the event
loop). Clips of several tasks share one forward through
``AdapterStack.concat`` + a per-row task index; a batch of one task takes the
library's fast path (K=1 stack, no gather). A clip with V views is V rows; its
answer is the softmax averaged over its rows.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from stadapter.bank import AdapterStack
from stadapter.trunk import VideoTrunk

from .cache import DeviceCache
from .registry import TaskVersion


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


_serial = itertools.count()


def cache_key(tv: TaskVersion) -> tuple:
    """Unique per loaded version (a task removed and registered anew may reuse a version number)."""
    key = getattr(tv, "_cache_key", None)
    if key is None:
        key = (tv.name, tv.version, next(_serial))
        tv._cache_key = key  # type: ignore[attr-defined]
    return key


@dataclass(frozen=True)
class BatchOutput:
    probs: list[Tensor]  # per clip: [C] softmax averaged over its views (cpu, float32)
    compute_s: float
    clips: int
    rows: int
    tasks: int


class ModelRunner:
    def __init__(self, trunk: VideoTrunk, cache: DeviceCache):
        self.trunk = trunk
        self.cache = cache
        self.device = cache.device
        self.dtype = cache.dtype
        self._last_concat: Optional[tuple[tuple, AdapterStack]] = None

    def _stack_for(self, keys: tuple, stacks: list[AdapterStack]) -> AdapterStack:
        if len(stacks) == 1:
            return stacks[0]
        if self._last_concat is not None and self._last_concat[0] == keys:
            return self._last_concat[1]
        stack = AdapterStack.concat(stacks)
        self._last_concat = (keys, stack)  # the same task mix often repeats batch after batch
        return stack

    def warmup(self, tvs: Sequence[TaskVersion]) -> int:
        """Run the served shapes once before traffic, so the first request pays no one-time costs.

        Clips batch by (frames, input size, adapter activation); for each such group
        this runs a one-task forward (the fast path) and, when the group has several
        tasks, a two-task one (the gathered path), on a blank clip. First forwards
        are slow everywhere (allocator, kernel choice; on CUDA the context and library
        handles too). Returns the number of forwards run.
        """
        groups: dict[tuple, list[TaskVersion]] = {}
        for tv in tvs:
            s = tv.spec.sampling
            groups.setdefault((s.num_frames, s.input_size, tv.host_stack.activation), []).append(tv)
        runs = 0
        for (frames, size, _), members in groups.items():
            blank = torch.zeros(1, frames, 3, size, size)
            for n in (1, 2) if len(members) > 1 else (1,):  # the fast path, then the gathered one
                self.forward([(tv, blank) for tv in members[:n]])
                runs += 1
        return runs

    @torch.inference_mode()
    def forward(self, clips: Sequence[tuple[TaskVersion, Tensor]]) -> BatchOutput:
        """clips: (task version, views [V, T, 3, S, S]) with equal T and S -> per-clip probabilities."""
        t0 = time.perf_counter()
        tvs = sorted({cache_key(tv): tv for tv, _ in clips}.items())
        keys = tuple(k for k, _ in tvs)
        order = {k: i for i, k in enumerate(keys)}
        stacks = self.cache.get_many((k, tv.host_stack) for k, tv in tvs)
        stack = self._stack_for(keys, stacks)
        rows = [v.shape[0] for _, v in clips]
        frames = torch.cat([v for _, v in clips]).to(self.device, self.dtype, non_blocking=True)  # [N, T, 3, S, S]
        if len(stacks) == 1:
            task_index = None
        else:
            idx = [order[cache_key(tv)] for (tv, _), n in zip(clips, rows) for _ in range(n)]
            task_index = torch.tensor(idx, dtype=torch.long).to(self.device, non_blocking=True)  # [N]
        logits = self.trunk(frames, stack, task_index).float()  # [N, C_max]
        probs, start = [], 0
        for (tv, _), n in zip(clips, rows):
            c = tv.spec.num_classes
            probs.append(logits[start:start + n, :c].softmax(dim=-1).mean(dim=0))  # [C]
            start += n
        probs = [p.cpu() for p in probs] if self.device.type != "cpu" else probs
        return BatchOutput(probs, time.perf_counter() - t0, len(clips), sum(rows), len(keys))
