"""Dynamic batching: decoded clips wait (at most ``max_delay``) to share a forward pass.

Clips are grouped only by what must match inside one forward: frame count T,
input size S, the adapter activation (``AdapterStack.concat`` refuses mixed
activations) and the frames' dtype (uint8 as the decoders give them, normalised on
the device while staging; float32 already normalised). Tasks mix freely. A batch closes when its group has
``max_batch_rows`` rows (a V-view clip is V rows) or when its oldest clip has
waited ``max_delay``. One forward runs at a time on the model thread; while it
runs, the next batch fills up, and once it is full it is staged on a second
thread (its slots activated, its input copied to the device: on CUDA from pinned
memory on a side stream), so the copies overlap the forward in progress. Work
whose deadline has passed, or whose caller went away, is dropped before compute.
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

from server.engine.model import BatchOutput, ModelRunner, StagedBatch, WarmupRun
from server.errors import DeadlineExpired, Draining
from server.limits import ServerLimits
from server.observability.metrics import Metrics
from server.registry.registry import TaskVersion

log = logging.getLogger("server.engine.batcher")


@dataclass(eq=False)
class WorkItem:
    tv: TaskVersion
    views: Tensor  # [V, T, 3, S, S], uint8 as decoded (or float32, normalised)
    deadline: Optional[float]  # time.monotonic() seconds, None = no deadline
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return int(self.views.shape[0])

    @property
    def group(self) -> tuple:
        return (int(self.views.shape[1]), int(self.views.shape[-1]), self.tv.host_stack.activation, self.views.dtype)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def gone(self, now: float) -> bool:
        """Nobody waits for it: the caller went away (gRPC cancels on its deadline too) or its deadline passed."""
        return self.future.done() or self.expired(now)


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
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")  # slots + input copies

    async def warmup(self, runs: list[WarmupRun]) -> int:
        """:meth:`ModelRunner.warmup_runs` on the model thread, whose thread-local pools it warms too."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.warmup_runs, runs)

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

    def _full_key(self) -> Optional[tuple]:
        """The group, oldest first, that has a whole batch's rows waiting."""
        full = [k for k in self._groups if self._group_rows(k) >= self.max_rows]
        return min(full, key=lambda k: self._groups[k][0].enqueued) if full else None

    async def _until_woken_or(self, computing: asyncio.Task) -> None:
        """Wait for a new clip or the end of the forward in progress."""
        self._wake.clear()
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({woken, computing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()

    async def _run(self) -> None:
        """Form, stage and compute batches: one forward at a time on the model thread and, while it runs, the
        next batch staged (slots activated, input copied to the device on a side stream) once it is full."""
        computing: Optional[asyncio.Task] = None
        while True:
            if computing is not None and computing.done():
                computing = None
            if not self._groups:
                if computing is not None:
                    await self._until_woken_or(computing)
                    continue
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if computing is not None and self._full_key() is None:
                await self._until_woken_or(computing)  # a partial batch keeps filling while the model is busy
                continue
            try:
                step = await self._stage_next(busy=computing is not None)
            except Exception:  # noqa: BLE001 - the loop must survive anything one batch does
                log.exception("batcher step failed")
                continue
            if step is None:
                continue
            if computing is not None:
                await computing  # one forward at a time
            computing = asyncio.get_running_loop().create_task(self._compute(*step), name="forward")

    async def _stage_next(self, busy: bool) -> Optional[tuple[list[WorkItem], StagedBatch]]:
        """Take the next batch and stage it: while the model is busy only a full batch (so batches are as big
        as before), else the oldest group once it is full or its oldest clip has waited ``max_delay``."""
        key = self._full_key() if busy else min(self._groups, key=lambda k: self._groups[k][0].enqueued)
        if key is None:
            return None
        flush_at = self._groups[key][0].enqueued + self.max_delay
        while not busy and not self._closed and self._group_rows(key) < self.max_rows:
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
            return None
        try:
            staged = await asyncio.get_running_loop().run_in_executor(
                self._stager, self.runner.stage, [(it.tv, it.views) for it in batch])
        except Exception as e:  # noqa: BLE001 - every caller in the batch gets the error
            self._fail(batch, e)
            return None
        return batch, staged

    async def _compute(self, batch: list[WorkItem], staged: StagedBatch) -> None:
        try:
            now = time.monotonic()
            if all(it.gone(now) for it in batch):
                staged.release()  # every caller left or expired while the batch waited for the model
                self._live(batch)
                return
            try:
                out = await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.run, staged)
            except Exception as e:  # noqa: BLE001 - every caller in the batch gets the error
                self._fail(batch, e)
                return
            self._resolve(batch, out)
        except Exception:  # noqa: BLE001 - the loop must survive anything one batch does
            log.exception("batcher step failed")

    def _fail(self, batch: list[WorkItem], e: Exception) -> None:
        log.exception("forward failed for a batch of %d clips", len(batch), exc_info=e)
        for it in batch:
            if not it.future.done():
                it.future.set_exception(e)

    def _resolve(self, batch: list[WorkItem], out: BatchOutput) -> None:
        started = time.monotonic() - out.compute_s  # the forward's start: a clip's wait includes its staging
        if self.metrics is not None:
            self.metrics.compute_seconds.observe(out.compute_s)
            self.metrics.stage_seconds.observe(out.stage_s)
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
            if it.gone(now):
                if self.metrics is not None:
                    self.metrics.dropped.labels("deadline" if it.expired(now) else "cancelled").inc()
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
        self._stager.shutdown(wait=True)
        self._executor.shutdown(wait=True)
