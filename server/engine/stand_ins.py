"""Stand-ins: task versions with zero weights of a served task's shapes, built from its ``task.json`` alone.

The start-up steps that need a task's shapes and not its weights use them, so start-up reads no weights
(the host tier loads a task's weights on its first request): the warm-up (every served input shape run
once) and the check that fixed ``--adapter-slots`` fit the device. A zero adapter is the identity, so a
stand-in computes what an untrained task would; its answers are thrown away.
"""

from __future__ import annotations

from typing import Sequence

import torch

from server.registry.version import TaskVersion
from stadapter.bank import AdapterStack, expected_shapes
from stadapter.trunk import VideoTrunk

WARMUP_PER_GROUP = 2  # tasks warm-up mixes per input shape (ModelRunner.warmup uses two of each kind)


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
    """Zero-weight stand-ins enough for :meth:`ModelRunner.warmup` to run every served input shape: per
    (frames, input size, activation), the first tasks of each kind it mixes (any, and those leaving a shared
    prefix of blocks unadapted)."""
    groups: dict[tuple, list[TaskVersion]] = {}
    for tv in tvs:
        s = tv.spec.sampling
        groups.setdefault((s.num_frames, s.input_size, tv.spec.adapter.activation), []).append(tv)
    prefix: dict[object, int] = {}  # adapter config -> blocks before its first adapter (trunk.prefix_blocks)
    out: list[TaskVersion] = []
    for members in groups.values():
        chosen = members[:WARMUP_PER_GROUP]
        sharing = []
        for tv in members:
            cfg = tv.spec.adapter
            if cfg not in prefix:
                prefix[cfg] = trunk.prefix_blocks(stand_in(tv, trunk, "meta").stack)
            if prefix[cfg] > 0:
                sharing.append(tv)
                if len(sharing) == WARMUP_PER_GROUP:
                    break
        chosen += [tv for tv in sharing if tv not in chosen]
        out += [stand_in(tv, trunk) for tv in chosen]
    return out
