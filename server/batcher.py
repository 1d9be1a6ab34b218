"""Dynamic batching: decoded clips wait (at most ``max_delay``) to share a forward pass.

Clips are grouped only by what must match inside one forward: frame count T,
input size S and the adapter activation (``AdapterStack.concat`` refuses mixed
activations). Tasks mix freely. A batch closes when its group has
``max_batch_rows`` rows (a V-view clip is V rows) or when its oldest clip has
waited ``max_delay``. One forward runs at a time on the model thread; while it
runs, the next batch fills up. Work whose deadline has passed, or whose caller
went away, is dropped before compute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from .errors import DeadlineExpired, Draining
from .limits import ServerLimits
from .metrics import Metrics
from .model import ModelRunner
from .registry import TaskVersion

log = logging.getLogger("server.batcher")


@dataclass(eq=False)
class WorkItem:
    tv: TaskVersion
    views: Tensor  # [V, T, 3, S, S]
    deadline: Optional[float]  # time.monotonic() seconds, None = no deadline
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return int(self.views.shape[0])

    @property
    def group(self) -> tuple:
        return (int(self.views.shape[1]), int(self.views.shape[-1]), self.tv.host_stack.activation)


@dataclass(frozen=True)
class ClipResult:
    probs: Tensor  # [C]
    queue_s: float
    compute_s: float
    batch_clips: int


class Batcher:
    def __init__(self, runner: ModelRunner, limits: ServerLimits, max_delay_s: float,
                 metrics: Optional[Metrics] = None):
        """``limits.max_batch_rows`` closes a batch (and bounds one request's rows)."""
        self.runner = runner
        self.limits = limits
        self.max_delay = max_delay_s
        self.metrics = metrics
        self._groups: dict[tuple, deque[WorkItem]] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._task: Optional[asyncio.Task] = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # owns the model

    async def warmup(self, tvs: list[TaskVersion]) -> int:
        """:meth:`ModelRunner.warmup` on the model thread, whose thread-local pools it warms too."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.warmup, tvs)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    @property
    def max_rows(self) -> int:
        return self.limits.max_batch_rows

    async def submit(self, tv: TaskVersion, views: Tensor, deadline: Optional[float]) -> ClipResult:
        if self._closed:
            raise Draining("server is shutting down")
        self.limits.check_rows(int(views.shape[0]))
        item = WorkItem(tv, views, deadline, asyncio.get_running_loop().create_future())
        self._groups.setdefault(item.group, deque()).append(item)
        self._wake.set()
        return await item.future

    def _take_batch(self, key: tuple) -> list[WorkItem]:
        q = self._groups[key]
        batch = [q.popleft()]
        rows = batch[0].rows
        while q and rows + q[0].rows <= self.max_rows:
            rows += q[0].rows
            batch.append(q.popleft())
        if not q:
            del self._groups[key]
        return batch

    def _group_rows(self, key: tuple) -> int:
        return sum(it.rows for it in self._groups.get(key, ()))

    async def _run(self) -> None:
        while True:
            if not self._groups:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._run_one()
            except Exception:  # noqa: BLE001 - the loop must survive anything one batch does
                log.exception("batcher step failed")

    async def _run_one(self) -> None:
        key = min(self._groups, key=lambda k: self._groups[k][0].enqueued)
        flush_at = self._groups[key][0].enqueued + self.max_delay
        while not self._closed and self._group_rows(key) < self.max_rows:
            left = flush_at - time.monotonic()
            if left <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                break
        batch = self._live(self._take_batch(key))
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self._executor, self.runner.forward, [(it.tv, it.views) for it in batch])
        except Exception as e:  # noqa: BLE001 - every caller in the batch gets the error
            log.exception("forward failed for a batch of %d clips", len(batch))
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        started = time.monotonic() - out.compute_s
        if self.metrics is not None:
            self.metrics.compute_seconds.observe(out.compute_s)
            self.metrics.batch_size.observe(out.clips)
            self.metrics.batch_rows.observe(out.rows)
            self.metrics.batch_tasks.observe(out.tasks)
            self.metrics.shared_prefix_rows.inc(out.shared_rows)
        for it, p in zip(batch, out.probs, strict=True):
            wait = max(0.0, started - it.enqueued)
            if self.metrics is not None:
                self.metrics.queue_wait_seconds.observe(wait)
            if not it.future.done():
                it.future.set_result(ClipResult(p, wait, out.compute_s, out.clips))

    def _live(self, batch: list[WorkItem]) -> list[WorkItem]:
        """Drop cancelled work and fail work whose deadline has passed."""
        now = time.monotonic()
        live = []
        for it in batch:
            expired = it.deadline is not None and now >= it.deadline
            if it.future.done() or expired:  # done = the caller went away (gRPC cancels on its deadline)
                if self.metrics is not None:
                    self.metrics.dropped.labels("deadline" if expired else "cancelled").inc()
                if not it.future.done():
                    it.future.set_exception(DeadlineExpired("deadline passed while queued; dropped before compute"))
                continue
            live.append(it)
        return live

    async def close(self) -> None:
        """Finish what is queued, then stop the loop and the model thread."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
