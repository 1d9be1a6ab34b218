"""The mixed batch's per-row weight gather: one index_select per weight tensor, no advanced indexing.

Advanced indexing (``w[task_index]``) and ``index_select`` give the same rows; on CPU the
second gathered 1.4-3.5x faster (tiny and ViT-B/16 bank tensors), and a mixed forward
makes 6 gathers per adapter slot plus 2 for the head: on the loaded 2-core machine the
tiny trunk's mixed batch went from 0.92 to 1.03 of a one-task batch with this alone.
"""

from __future__ import annotations

from collections import Counter

import torch
from factories import make_task_adapters
from torch.utils._python_dispatch import TorchDispatchMode

from stadapter import AdapterConfig, AdapterStack

CFG = AdapterConfig(width=8, pre_attn=True, pre_mlp=True)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_a_mixed_forward_gathers_with_one_index_select_per_tensor(tiny_trunk):
    stacks = [make_task_adapters(tiny_trunk, 3 + k, CFG, seed=k).stack() for k in range(3)]
    with torch.no_grad():
        stack = AdapterStack.concat([s.to() for s in stacks])
        frames = torch.randn(5, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        task_index = torch.tensor([0, 2, 1, 2, 0])
        with _Ops() as ops:
            mixed = tiny_trunk(frames, stack, task_index)
        assert ops.count["aten.index"] == 0
        assert ops.count["aten.index_select"] == 6 * len(stack.slots) + 2
        for b, k in enumerate(task_index.tolist()):  # and each clip's logits are its task's alone
            alone = tiny_trunk(frames[b:b + 1], stacks[k])[0]
            torch.testing.assert_close(mixed[b, : alone.shape[0]], alone, atol=1e-5, rtol=0)
