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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import STAdapter, SlotWeights, slot_weights_from_state
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

    def to(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> "AdapterStack":
        fn = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return AdapterStack(
            slots={k: s.map(fn) for k, s in self.slots.items()},
            head_w=fn(self.head_w),
            head_b=fn(self.head_b),
            num_classes=self.num_classes,
            activation=self.activation,
        )

    def head(self, feats: Tensor, task_index: Optional[Tensor]) -> Tensor:
        """feats [B, d] -> logits [B, C] (one task) or [B, C_max] (mixed, zero-padded)."""
        if task_index is None:
            return F.linear(feats, self.head_w[0, : self.num_classes[0]], self.head_b[0, : self.num_classes[0]])
        w = self.head_w[task_index]  # [B, C_max, d]
        return torch.baddbmm(self.head_b[task_index].unsqueeze(1), feats.unsqueeze(1), w.transpose(1, 2)).squeeze(1)

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
            kernel = tuple(max(p.kernel[i] for p in present) for i in range(3))
            dim = present[0].fc2_w.shape[1]
            parts = [
                _pad_slot(s.slots[key], width, kernel) if key in s.slots else _zero_slot(s.num_tasks, dim, width, kernel, ref)
                for s in stacks
            ]
            slots[key] = SlotWeights(*(torch.cat(ts, 0) for ts in zip(*(p.tensors() for p in parts))))
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
        for i, block in self.transformer.resblocks.items():
            for pos in self.config.positions():
                yield (int(i), pos), getattr(block, f"adapter_{pos}")

    def stack(self) -> AdapterStack:
        """K=1 differentiable view for the trunk's forward (training uses this)."""
        slots = {key: a.slot_weights() for key, a in self.adapters()}
        return AdapterStack(
            slots, self.fc.weight.unsqueeze(0), self.fc.bias.unsqueeze(0), (self.num_classes,), self.config.activation
        )


@dataclass
class TaskTable:
    """Name -> K=1 stack, with a cached concatenation for a fixed set of tasks.

    Useful offline (and for export): build once, then route clips by name.
    """

    stacks: dict[str, AdapterStack] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.stacks)

    def combined(self) -> AdapterStack:
        return AdapterStack.concat(list(self.stacks.values()))

    def index_of(self, names: Sequence[str]) -> Tensor:
        order = {n: i for i, n in enumerate(self.stacks)}
        missing = [n for n in names if n not in order]
        if missing:
            raise KeyError(f"unknown tasks {missing}; known: {list(order)}")
        return torch.tensor([order[n] for n in names], dtype=torch.long)
