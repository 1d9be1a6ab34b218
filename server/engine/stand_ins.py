"""Stand-ins: task versions with zero weights of a served task's shapes, built from its ``task.json`` alone.

The start-up steps that need a task's shapes and not its weights use them, so start-up reads no weights
(the host tier loads a task's weights on its first request): the warm-up (every served input shape run
once) and the check that fixed ``--adapter-slots`` fit the device. A zero adapter is the identity, so a
stand-in computes what an untrained task would; its answers are thrown away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from server.engine.model import warmup_picks
from server.registry.version import TaskVersion
from stadapter.bank import AdapterStack, expected_shapes
from stadapter.trunk import VideoTrunk

if TYPE_CHECKING:
    from server.engine.batcher import Batcher


def stand_in(tv: TaskVersion, trunk: VideoTrunk, device: str = "cpu") -> TaskVersion:
    """A version with ``tv``'s spec and zero weights of its shapes (``device="meta"``: shapes only, no memory)."""
    s = tv.spec
    state = {k: torch.zeros(shape, device=device)
             for k, shape in expected_shapes(s.adapter, trunk.dim, trunk.num_blocks, s.num_classes).items()}
    stack = AdapterStack.from_state_dict(s.adapter, state, trunk.num_blocks)
    return TaskVersion(s, stack, tv.path, stack.nbytes if device != "meta" else 0)


def shape_stand_ins(tvs: Sequence[TaskVersion], trunk: VideoTrunk) -> list[TaskVersion]:
    """One shapes-only stand-in per distinct adapter config and class count among ``tvs`` (for
    ``AdapterSlots.check_fits``, which reads shapes only)."""
    distinct = {(tv.spec.adapter, tv.spec.num_classes): tv for tv in tvs}
    return [stand_in(tv, trunk, "meta") for tv in distinct.values()]


def warmup_stand_ins(tvs: Sequence[TaskVersion], trunk: VideoTrunk) -> list[TaskVersion]:
    """Zero-weight stand-ins enough for :meth:`ModelRunner.warmup` to run every served input shape: one for each
    task :func:`~server.engine.model.warmup_picks` picks (the prefix of a config read from a shapes-only stand-in)."""
    prefix: dict[object, int] = {}  # adapter config -> blocks before its first adapter (trunk.prefix_blocks)

    def prefix_blocks(tv: TaskVersion) -> int:
        cfg = tv.spec.adapter
        if cfg not in prefix:
            prefix[cfg] = trunk.prefix_blocks(stand_in(tv, trunk, "meta").stack)
        return prefix[cfg]

    out: list[TaskVersion] = []
    for members, sharing in warmup_picks(tvs, prefix_blocks).values():
        out += [stand_in(tv, trunk) for tv in members + [tv for tv in sharing if tv not in members]]
    return out


async def warm_up(batcher: "Batcher", tvs: Sequence[TaskVersion], trunk: VideoTrunk) -> int:
    """Run every served shape once (:meth:`Batcher.warmup`) on zero-weight stand-ins of ``tvs``, then free the
    stand-ins' device slots: they serve no request, and left there they held slots and counted as resident until
    evicted. Returns the number of forwards run."""
    stand_ins = warmup_stand_ins(tvs, trunk)  # shapes, not weights: none read
    try:
        return await batcher.warmup(stand_ins)
    finally:
        for tv in stand_ins:
            batcher.runner.slots.discard(tv)
