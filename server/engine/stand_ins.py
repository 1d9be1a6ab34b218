"""Stand-ins: task versions with zero weights of a served task's shapes, built from its ``task.json`` alone.

The start-up steps that need a task's shapes and not its weights use them, so start-up reads no weights
(the host tier loads a task's weights on its first request): the warm-up (every served input shape run
once) and the check that fixed ``--adapter-slots`` fit the device. A zero adapter is the identity, so a
stand-in computes what an untrained task would; its answers are thrown away.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from server.engine.model import WarmupPlan, WarmupRun
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


class WarmUp:
    """The start's warm-up (every served shape run once, :class:`~server.engine.model.WarmupPlan`) on zero-weight
    stand-ins, begun while the first scan still reads the repository: the scan hands each version it reads to
    :meth:`add` (on the scan's thread), and :meth:`run` warms the runs those complete as they come, until the scan
    is done. The forwards release the interpreter's lock, the scan mostly holds it: the two overlap (a first scan
    of thousands of task folders and a warm-up both take seconds).

    Args:
        batcher: runs the forwards on the model thread.
        trunk: the served trunk (the stand-ins' shapes).
        check: given the versions of each batch of runs before it runs (the ``--adapter-slots`` fit: a count too
            large for the device is refused before a forward tries to allocate it).
    """

    def __init__(self, batcher: "Batcher", trunk: VideoTrunk,
                 check: Optional[Callable[[list[TaskVersion]], None]] = None):
        self.batcher, self.trunk, self.check = batcher, trunk, check
        self._prefix: dict[object, int] = {}  # adapter config -> blocks before its first adapter (scan thread only)
        self.plan = WarmupPlan(self._prefix_blocks)
        self._pending: list[WarmupRun] = []
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()

    def add(self, tv: TaskVersion) -> None:
        """A version the scan has read (any thread; the plan is the caller's thread's alone)."""
        runs = self.plan.add(tv)
        if runs:
            with self._lock:
                self._pending += runs
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, scan: "asyncio.Future[Any]") -> int:
        """Warm each run as :meth:`add` completes it until ``scan`` is done (however it ended) and every run
        found is warmed; returns the number of forwards."""
        count = 0
        while True:
            self._wake.clear()
            with self._lock:
                runs, self._pending = self._pending, []
            if runs:
                count += await self.warm(runs)
            elif scan.done():
                return count
            else:
                woken: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait([scan, woken], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()

    async def warm(self, runs: Sequence[WarmupRun]) -> int:
        """``runs`` on stand-ins of their versions, whose device slots are freed after: they serve no request,
        and left there they held slots and counted as resident until evicted."""
        stand_ins = {tv.uid: stand_in(tv, self.trunk) for run in runs for tv in run.tvs}  # shapes, not weights
        if self.check is not None:
            self.check(list(stand_ins.values()))
        try:
            return await self.batcher.warmup([WarmupRun(r.kind, tuple(stand_ins[tv.uid] for tv in r.tvs)) for r in runs])
        finally:
            for tv in stand_ins.values():
                self.batcher.runner.slots.discard(tv)

    def _prefix_blocks(self, tv: TaskVersion) -> int:
        cfg = tv.spec.adapter
        if cfg not in self._prefix:
            self._prefix[cfg] = self.trunk.prefix_blocks(stand_in(tv, self.trunk, "meta").stack)
        return self._prefix[cfg]

