"""Many tasks' adapters and heads held side by side.

* :class:`TaskAdapters` is one task's trainable module. Its ``state_dict`` keys are
  those of the public ST-Adapter checkpoints
  (``transformer.resblocks.{i}.adapter_pre_{attn,mlp}.{fc1,conv,fc2}.{weight,bias}``,
  ``fc.{weight,bias}``), which are also the keys of ``adapter.safetensors``.
* :class:`AdapterStack` is the inference form: every slot's tensors stacked over
  K tasks. ``AdapterStack.concat`` stacks tasks whose adapters differ in width,
  kernel, placement or depth by zero-padding: a zero adapter is exactly the
  identity, so padding changes no logit. Heads of different class counts are
  padded to the widest; ``num_classes`` says how many columns are real.
* :class:`SlotBank` is the serving form: S task slots preallocated on the device,
  written once per activation, read as narrow views (one task) or with a per-row slot
  index (:meth:`SlotBank.stacked`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import SlotWeights, STAdapter, slot_weights_from_state
from .config import AdapterConfig

SlotKey = tuple[int, str]  # (block index, "pre_attn" | "pre_mlp")


def slot_prefix(block: int, position: str) -> str:
    return f"transformer.resblocks.{block}.adapter_{position}"


def expected_shapes(cfg: AdapterConfig, dim: int, num_blocks: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a task with this config must have."""
    r, (kt, kh, kw) = cfg.width, cfg.kernel
    shapes: dict[str, tuple[int, ...]] = {}
    for i in cfg.adapted_blocks(num_blocks):
        for pos in cfg.positions():
            p = slot_prefix(i, pos)
            shapes[f"{p}.fc1.weight"] = (r, dim)
            shapes[f"{p}.fc1.bias"] = (r,)
            shapes[f"{p}.conv.weight"] = (r, 1, kt, kh, kw)
            shapes[f"{p}.conv.bias"] = (r,)
            shapes[f"{p}.fc2.weight"] = (dim, r)
            shapes[f"{p}.fc2.bias"] = (dim,)
    shapes["fc.weight"] = (num_classes, dim)
    shapes["fc.bias"] = (num_classes,)
    return shapes


@dataclass(frozen=True)
class AdapterStack:
    """Inference weights of K tasks: adapters per slot and padded heads."""

    slots: Mapping[SlotKey, SlotWeights]
    head_w: Tensor  # [K, C_max, d]
    head_b: Tensor  # [K, C_max]
    num_classes: tuple[int, ...]  # real head rows per task
    activation: str = "none"

    @property
    def num_tasks(self) -> int:
        return self.head_w.shape[0]

    @property
    def nbytes(self) -> int:
        ts = [t for s in self.slots.values() for t in s.tensors()] + [self.head_w, self.head_b]
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def first_block(self) -> Optional[int]:
        """The lowest block holding an adapter slot (None: no adapter); the blocks below it run unadapted."""
        return min((block for block, _ in self.slots), default=None)

    def to(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> "AdapterStack":
        fn = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return AdapterStack(
            slots={k: s.map(fn) for k, s in self.slots.items()},
            head_w=fn(self.head_w),
            head_b=fn(self.head_b),
            num_classes=self.num_classes,
            activation=self.activation,
        )

    def task(self, k: int) -> "AdapterStack":
        """Task ``k`` alone (K=1) as narrow views of this stack's tensors (no copy)."""
        slots = {key: w.map(lambda t: t.narrow(0, k, 1)) for key, w in self.slots.items()}
        return AdapterStack(slots, self.head_w.narrow(0, k, 1), self.head_b.narrow(0, k, 1), (self.num_classes[k],),
                            self.activation)

    def head(self, feats: Tensor, task_index: Optional[Tensor]) -> Tensor:
        """feats [B, d] -> logits [B, C] (one task) or [B, C_max] (mixed, zero-padded)."""
        if task_index is None:
            return F.linear(feats, self.head_w[0, : self.num_classes[0]], self.head_b[0, : self.num_classes[0]])
        w = self.head_w.index_select(0, task_index)  # [B, C_max, d]
        b = self.head_b.index_select(0, task_index)  # [B, C_max]
        return torch.baddbmm(b.unsqueeze(1), feats.unsqueeze(1), w.transpose(1, 2)).squeeze(1)

    @classmethod
    def from_state_dict(
        cls, cfg: AdapterConfig, state: Mapping[str, Tensor], num_blocks: int
    ) -> "AdapterStack":
        """K=1 stack from one task's checkpoint tensors (no copies beyond the conv layout)."""
        slots = {
            (i, pos): slot_weights_from_state(slot_prefix(i, pos), dict(state))
            for i in cfg.adapted_blocks(num_blocks)
            for pos in cfg.positions()
        }
        w, b = state["fc.weight"], state["fc.bias"]
        return cls(slots, w.unsqueeze(0), b.unsqueeze(0), (w.shape[0],), cfg.activation)

    @classmethod
    def concat(cls, stacks: Sequence["AdapterStack"]) -> "AdapterStack":
        """Stack several tasks (each a K>=1 stack) into one; task order is kept."""
        if not stacks:
            raise ValueError("AdapterStack.concat: no tasks given")
        if len(stacks) == 1:
            return stacks[0]
        acts = {s.activation for s in stacks}
        if len(acts) > 1:
            raise ValueError(f"AdapterStack.concat: tasks with different adapter activations {sorted(acts)} cannot share a batch")
        ref = stacks[0].head_w
        keys = sorted({k for s in stacks for k in s.slots})
        slots = {}
        for key in keys:
            present = [s.slots[key] for s in stacks if key in s.slots]
            width = max(p.width for p in present)
            kernel = (max(p.kernel[0] for p in present), max(p.kernel[1] for p in present),
                      max(p.kernel[2] for p in present))
            dim = present[0].fc2_w.shape[1]
            parts = [
                _pad_slot(s.slots[key], width, kernel) if key in s.slots else _zero_slot(s.num_tasks, dim, width, kernel, ref)
                for s in stacks
            ]
            slots[key] = SlotWeights(*(torch.cat(ts, 0) for ts in zip(*(p.tensors() for p in parts), strict=True)))
        c_max = max(s.head_w.shape[1] for s in stacks)
        head_w = torch.cat([F.pad(s.head_w, (0, 0, 0, c_max - s.head_w.shape[1])) for s in stacks])
        head_b = torch.cat([F.pad(s.head_b, (0, c_max - s.head_b.shape[1])) for s in stacks])
        num_classes = tuple(c for s in stacks for c in s.num_classes)
        return cls(slots, head_w, head_b, num_classes, stacks[0].activation)


def _pad_slot(s: SlotWeights, width: int, kernel: tuple[int, int, int]) -> SlotWeights:
    dr = width - s.width
    kt, kh, kw = (kernel[i] - s.kernel[i] for i in range(3))
    if dr == 0 and kt == kh == kw == 0:
        return s
    return SlotWeights(
        fc1_w=F.pad(s.fc1_w, (0, 0, 0, dr)),
        fc1_b=F.pad(s.fc1_b, (0, dr)),
        conv_w=F.pad(s.conv_w, (0, dr, kw // 2, kw // 2, kh // 2, kh // 2, kt // 2, kt // 2)),
        conv_b=F.pad(s.conv_b, (0, dr)),
        fc2_w=F.pad(s.fc2_w, (0, dr)),
        fc2_b=s.fc2_b,
    )


def _zero_slot(k: int, dim: int, width: int, kernel: tuple[int, int, int], like: Tensor) -> SlotWeights:
    z = lambda *shape: torch.zeros(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
    return SlotWeights(z(k, width, dim), z(k, width), z(k, *kernel, width), z(k, width), z(k, dim, width), z(k, dim))


class TaskAdapters(nn.Module):
    """One task's trainable adapters + classification head (the public checkpoint layout)."""

    def __init__(self, cfg: AdapterConfig, dim: int, num_blocks: int, num_classes: int, head_init_std: float = 0.02):
        super().__init__()
        self.config = cfg
        self.num_blocks = num_blocks
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleDict()
        for i in cfg.adapted_blocks(num_blocks):
            block = nn.Module()
            for pos in cfg.positions():
                setattr(block, f"adapter_{pos}", STAdapter(dim, cfg))
            self.transformer.resblocks[str(i)] = block
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=head_init_std)
        nn.init.zeros_(self.fc.bias)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def adapters(self) -> Iterable[tuple[SlotKey, STAdapter]]:
        blocks = self.transformer.resblocks
        assert isinstance(blocks, nn.ModuleDict)  # set in __init__
        for i, block in blocks.items():
            for pos in self.config.positions():
                yield (int(i), pos), getattr(block, f"adapter_{pos}")

    def stack(self) -> AdapterStack:
        """K=1 differentiable view for the trunk's forward (training uses this)."""
        slots = {key: a.slot_weights() for key, a in self.adapters()}
        return AdapterStack(
            slots, self.fc.weight.unsqueeze(0), self.fc.bias.unsqueeze(0), (self.num_classes,), self.config.activation
        )


# --- the device slot bank ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskShape:
    """One task's adapter geometry: (width, kernel) per slot key, and its class count."""

    slots: Mapping[SlotKey, tuple[int, tuple[int, int, int]]]
    num_classes: int

    @classmethod
    def of(cls, stack: AdapterStack) -> "TaskShape":
        if stack.num_tasks != 1:
            raise ValueError(f"TaskShape.of: a one-task stack is needed, got {stack.num_tasks} tasks")
        return cls({k: (s.width, s.kernel) for k, s in stack.slots.items()}, stack.num_classes[0])


def _region(w: SlotWeights, rows: slice, width: int, kernel: tuple[int, int, int]) -> SlotWeights:
    """The view of ``w``'s rows that an adapter of this width and kernel occupies (kernel centred, width first)."""
    (KT, KH, KW), (kt, kh, kw) = w.kernel, kernel
    ot, oh, ow = (KT - kt) // 2, (KH - kh) // 2, (KW - kw) // 2
    return SlotWeights(
        fc1_w=w.fc1_w[rows, :width],
        fc1_b=w.fc1_b[rows, :width],
        conv_w=w.conv_w[rows, ot:ot + kt, oh:oh + kh, ow:ow + kw, :width],
        conv_b=w.conv_b[rows, :width],
        fc2_w=w.fc2_w[rows, :, :width],
        fc2_b=w.fc2_b[rows],
    )


class SlotBank:
    """Adapters and heads of up to ``capacity`` tasks in preallocated tensors on one device.

    Every slot key any resident task uses has tensors ``[capacity, ...]`` padded to the
    widest width and kernel seen; heads are ``[capacity, C_max, d]``. A task is
    written into a slot (zeros where it has no adapter or narrower weights: zero weights
    are exactly the identity adapter), read back as narrow views (:meth:`view`, the
    one-task fast path: no copy), or used by many rows at once through :meth:`stacked`
    (per-row slot index). Tasks of one bank
    share one adapter activation. The bank only stores; which task lives in which
    slot, and when to grow, is the caller's policy. Not thread-safe.
    """

    def __init__(self, dim: int, device: torch.device | str, dtype: torch.dtype, activation: str = "none"):
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.activation = activation
        self.capacity = 0
        self._geometry: dict[SlotKey, tuple[int, tuple[int, int, int]]] = {}
        self._classes = 0
        self._slots: dict[SlotKey, SlotWeights] = {}
        self._head_w = self._zeros(0, 0, dim)  # [S, C_max, d]
        self._head_b = self._zeros(0, 0)  # [S, C_max]
        self._shapes: list[Optional[TaskShape]] = []

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)

    # --- geometry and bytes ---

    def _widened(self, shapes: Iterable[TaskShape]) -> tuple[dict[SlotKey, tuple[int, tuple[int, int, int]]], int]:
        geo, classes = dict(self._geometry), self._classes
        for sh in shapes:
            for key, (r, k) in sh.slots.items():
                r0, k0 = geo.get(key, (0, (1, 1, 1)))
                geo[key] = (max(r0, r), tuple(max(a, b) for a, b in zip(k0, k, strict=True)))  # type: ignore[assignment]
            classes = max(classes, sh.num_classes)
        return geo, classes

    def fits(self, shape: TaskShape) -> bool:
        return self._widened([shape]) == (self._geometry, self._classes)

    def slot_bytes(self, also_fit: Sequence[TaskShape] = ()) -> int:
        """Device bytes of one slot at the current geometry (widened to also fit ``also_fit``)."""
        geo, classes = self._widened(also_fit)
        d = self.dim
        per = sum(2 * r * d + r * kt * kh * kw + 2 * r + d for r, (kt, kh, kw) in geo.values()) + classes * (d + 1)
        return per * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Device bytes held by the bank's tensors (every slot, used or not)."""
        ts = [t for s in self._slots.values() for t in s.tensors()] + [self._head_w, self._head_b]
        return sum(t.numel() * t.element_size() for t in ts)

    def reserve(self, capacity: int, also_fit: Sequence[TaskShape] = ()) -> None:
        """Reallocate for ``capacity`` slots at a geometry that also fits ``also_fit``; contents are kept."""
        geo, classes = self._widened(also_fit)
        if capacity < self.capacity:
            raise ValueError(f"SlotBank.reserve: cannot shrink from {self.capacity} to {capacity} slots")
        if capacity == self.capacity and (geo, classes) == (self._geometry, self._classes):
            return
        old, n, d = self._slots, self.capacity, self.dim
        slots = {}
        for key, (r, k) in geo.items():
            new = SlotWeights(self._zeros(capacity, r, d), self._zeros(capacity, r), self._zeros(capacity, *k, r),
                              self._zeros(capacity, r), self._zeros(capacity, d, r), self._zeros(capacity, d))
            if key in old and n:
                for dst, src in zip(_region(new, slice(0, n), *self._geometry[key]).tensors(), old[key].tensors(), strict=True):
                    dst.copy_(src)
            slots[key] = new
        head_w, head_b = self._zeros(capacity, classes, d), self._zeros(capacity, classes)
        head_w[:n, : self._classes] = self._head_w
        head_b[:n, : self._classes] = self._head_b
        self._slots, self._head_w, self._head_b = slots, head_w, head_b
        self._geometry, self._classes = geo, classes
        self._shapes += [None] * (capacity - n)
        self.capacity = capacity

    def shrink(self, keep: Sequence[int], capacity: int) -> dict[int, int]:
        """Reallocate for ``capacity`` slots holding only the slots ``keep`` (moved to 0, 1, ...); returns old -> new."""
        if capacity < len(keep):
            raise ValueError(f"SlotBank.shrink: {len(keep)} slots to keep do not fit {capacity}")
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        n = len(keep)

        def moved(t: Tensor) -> Tensor:
            out = torch.zeros((capacity, *t.shape[1:]), device=self.device, dtype=self.dtype)
            out[:n] = t.index_select(0, idx)
            return out

        self._slots = {key: w.map(moved) for key, w in self._slots.items()}
        self._head_w, self._head_b = moved(self._head_w), moved(self._head_b)
        self._shapes = [self._shapes[i] for i in keep] + [None] * (capacity - n)
        self.capacity = capacity
        return {old: new for new, old in enumerate(keep)}

    # --- writing ---

    def write(self, slot: int, stack: AdapterStack) -> None:
        """Copy one task's weights into ``slot`` (converted to the bank's dtype); the bank must fit it."""
        shape = TaskShape.of(stack)
        if not self.fits(shape):
            raise ValueError("SlotBank.write: the task does not fit the bank's geometry; reserve() it first")
        if stack.activation != self.activation:
            raise ValueError(f"SlotBank.write: adapter activation {stack.activation!r}, the bank's is {self.activation!r}")
        rows = slice(slot, slot + 1)
        for key, bank in self._slots.items():
            geo = self._geometry[key]
            mine = shape.slots.get(key)
            if mine != geo:
                for t in _region(bank, rows, *geo).tensors():
                    t.zero_()
            if mine is not None:
                for dst, src in zip(_region(bank, rows, *mine).tensors(), stack.slots[key].tensors(), strict=True):
                    dst.copy_(src, non_blocking=True)
        c = shape.num_classes
        self._head_w[slot, c:].zero_()
        self._head_b[slot, c:].zero_()
        self._head_w[slot, :c].copy_(stack.head_w[0], non_blocking=True)
        self._head_b[slot, :c].copy_(stack.head_b[0], non_blocking=True)
        self._shapes[slot] = shape

    def clear(self, slot: int) -> None:
        """Mark ``slot`` empty (its tensors are overwritten by the next write)."""
        self._shapes[slot] = None

    # --- reading ---

    def view(self, slot: int) -> AdapterStack:
        """One task's K=1 stack as narrow views of its slot (no copy; for a one-task batch)."""
        shape = self._shapes[slot]
        if shape is None:
            raise ValueError(f"SlotBank.view: slot {slot} is empty")
        rows, c = slice(slot, slot + 1), shape.num_classes
        slots = {key: _region(self._slots[key], rows, *geo) for key, geo in shape.slots.items()}
        return AdapterStack(slots, self._head_w[rows, :c], self._head_b[rows, :c], (c,), self.activation)

    def stacked(self, used_by: Optional[Sequence[int]] = None) -> AdapterStack:
        """Every slot, padded: run with ``task_index`` = each row's slot (the per-row gather path).

        ``used_by``: the slots the rows will index; only the slot keys one of their tasks has
        are kept (the others hold zeros for those rows: the identity, skipped), so the stack's
        :attr:`AdapterStack.first_block` is the lowest block those tasks adapt.
        """
        classes = tuple(s.num_classes if s is not None else 0 for s in self._shapes)
        if used_by is None:
            slots = dict(self._slots)
        else:
            shapes = [self._shapes[i] for i in used_by]
            if any(sh is None for sh in shapes):
                raise ValueError(f"SlotBank.stacked: slots {[i for i in used_by if self._shapes[i] is None]} are empty")
            keys = {key for sh in shapes if sh is not None for key in sh.slots}
            slots = {key: w for key, w in self._slots.items() if key in keys}
        return AdapterStack(slots, self._head_w, self._head_b, classes, self.activation)
