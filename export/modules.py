"""Exportable wrappers: the frozen trunk plus an :class:`AdapterStack` held as buffers.

:class:`~stadapter.bank.AdapterStack` is a plain frozen dataclass, so an exporter
would see its tensors as free constants (and refuse ones that require grad).
These modules register every stack tensor as a buffer and rebuild the stack view
in ``forward``; the maths is the library's own (``VideoTrunk.forward``), so the
exported graph and the PyTorch server run the same code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stadapter.adapter import SlotWeights
from stadapter.bank import AdapterStack, SlotKey
from stadapter.trunk import VideoTrunk

_SLOT_FIELDS = ("fc1_w", "fc1_b", "conv_w", "conv_b", "fc2_w", "fc2_b")


class _StackBuffers(nn.Module):
    """An AdapterStack's tensors as buffers (detached copies), and the stack rebuilt from them."""

    head_w: Tensor  # the buffers registered below, declared for type checkers (nn.Module's getattr is untyped)
    head_b: Tensor
    num_classes: Tensor

    def __init__(self, stack: AdapterStack):
        super().__init__()
        self.keys: list[SlotKey] = sorted(stack.slots)
        for n, key in enumerate(self.keys):
            for f, t in zip(_SLOT_FIELDS, stack.slots[key].tensors(), strict=True):
                self.register_buffer(f"s{n}_{f}", t.detach().clone())
        self.register_buffer("head_w", stack.head_w.detach().clone())  # [K, C_max, d]
        self.register_buffer("head_b", stack.head_b.detach().clone())  # [K, C_max]
        self.register_buffer("num_classes", torch.tensor(stack.num_classes, dtype=torch.long))  # [K]
        self.class_counts: tuple[int, ...] = tuple(stack.num_classes)
        self.activation = stack.activation

    def stack(self) -> AdapterStack:
        slots = {
            key: SlotWeights(*(getattr(self, f"s{n}_{f}") for f in _SLOT_FIELDS)) for n, key in enumerate(self.keys)
        }
        return AdapterStack(slots, self.head_w, self.head_b, self.class_counts, self.activation)


class SingleTaskModel(nn.Module):
    """frames [B, T, 3, S, S] -> logits [B, C] for one task (K=1 stack, no gather)."""

    def __init__(self, trunk: VideoTrunk, stack: AdapterStack):
        super().__init__()
        if stack.num_tasks != 1:
            raise ValueError(f"SingleTaskModel needs a K=1 stack, got {stack.num_tasks} tasks")
        self.trunk = trunk
        self.bank = _StackBuffers(stack)

    def forward(self, frames: Tensor) -> Tensor:
        return self.trunk(frames, self.bank.stack(), None)


class MultiTaskModel(nn.Module):
    """(frames [B, T, 3, S, S], task_index [B] int64) -> (logits [B, C_max] zero-padded, num_classes [B] int64)."""

    def __init__(self, trunk: VideoTrunk, stack: AdapterStack):
        super().__init__()
        self.trunk = trunk
        self.bank = _StackBuffers(stack)

    def forward(self, frames: Tensor, task_index: Tensor) -> tuple[Tensor, Tensor]:
        # ONNX Gather (like torch indexing) wraps negative indices to the last tasks; map them
        # out of range so that a bad index fails the request instead of picking another task.
        k = self.bank.num_classes.shape[0]
        task_index = torch.where(task_index < 0, torch.full_like(task_index, k), task_index)  # [B]
        # AdapterStack.concat pads heads (weights and biases) with zeros, so the
        # padded columns of each clip's logits are exactly 0.
        logits = self.trunk(frames, self.bank.stack(), task_index)  # [B, C_max]
        return logits, self.bank.num_classes[task_index]  # [B, C_max], [B]

