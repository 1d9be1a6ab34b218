"""One classification from bytes to top-k: admit, decode (worker pool), batch, answer.

Admission happens before any work: a draining server answers UNAVAILABLE, a
full queue (``max_queue_size`` requests admitted and not yet computed)
RESOURCE_EXHAUSTED, an unknown task NOT_FOUND. The task version is captured
at admission and the request runs on it to the end.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import Tensor

from stadapter.config import ConfigError, SamplingConfig
from stadapter.video import VideoLimits, decode_clip

from .batcher import Batcher
from .errors import BadRequest, DeadlineExpired, Draining, QueueFull
from .metrics import Metrics
from .registry import TaskRegistry, TaskVersion

MAX_TOP_K = 1000


@dataclass(frozen=True)
class Classification:
    tv: TaskVersion
    top: list[tuple[int, float]]  # (class index, probability), best first
    decode_s: float
    queue_s: float
    compute_s: float
    total_s: float
    batch_clips: int


class Pipeline:
    def __init__(self, registry: TaskRegistry, batcher: Batcher, metrics: Metrics, max_queue_size: int,
                 decode_workers: int, default_top_k: int = 5, max_clip_bytes: int = 1 << 28,
                 video_limits: Optional[VideoLimits] = None):
        self.registry = registry
        self.batcher = batcher
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.default_top_k = default_top_k
        self.max_clip_bytes = max_clip_bytes
        self.video_limits = video_limits or VideoLimits(max_bytes=max_clip_bytes)
        self.decode_pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")
        self.pending = 0  # admitted, not yet computed
        self.inflight = 0  # every RPC in progress (for draining)
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    # --- RPC bookkeeping used by the services (drain waits for inflight == 0) ---

    def enter(self) -> None:
        if self.draining:
            raise Draining("server is draining (shutting down); retry on another replica")
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # --- classification ---

    async def classify(self, task: str, clip: bytes, top_k: int = 0, overrides: Optional[Mapping[str, Any]] = None,
                       deadline: Optional[float] = None) -> Classification:
        t0 = time.monotonic()
        if self.draining:
            raise Draining("server is draining (shutting down); retry on another replica")
        if not task:
            raise BadRequest("the request names no task")
        if self.pending >= self.max_queue_size:
            raise QueueFull(f"queue is full ({self.max_queue_size} requests waiting); retry later")
        tv = self.registry.acquire(task)
        self.pending += 1
        try:
            k = top_k or self.default_top_k
            if k > MAX_TOP_K:
                raise BadRequest(f"top_k={top_k} is above the limit of {MAX_TOP_K}")
            sampling = _apply_overrides(tv.spec.sampling, overrides)
            if not clip:
                raise BadRequest("the clip is empty (0 bytes)")
            if len(clip) > self.max_clip_bytes:
                raise BadRequest(f"the clip is {len(clip)} bytes, above the limit of {self.max_clip_bytes}")
            _check_deadline(deadline, "before decode")
            loop = asyncio.get_running_loop()
            views, decode_s = await loop.run_in_executor(self.decode_pool, _decode_timed, clip, sampling,
                                                         self.video_limits)
            self.metrics.decode_seconds.observe(decode_s)
            _check_deadline(deadline, "after decode")
            res = await self.batcher.submit(tv, views, deadline)
            values, idx = res.probs.topk(min(k, tv.spec.num_classes))
            self.metrics.clips.labels(tv.name).inc()
            return Classification(tv, list(zip(idx.tolist(), values.tolist())), decode_s, res.queue_s, res.compute_s,
                                  time.monotonic() - t0, res.batch_clips)
        finally:
            self.pending -= 1
            tv.release()

    def close(self) -> None:
        self.decode_pool.shutdown(wait=True, cancel_futures=True)


def _decode_timed(clip: bytes, sampling: SamplingConfig, limits: VideoLimits) -> tuple[Tensor, float]:
    """Decode in a worker thread; the time is the decode alone, not the wait for a free worker."""
    t0 = time.perf_counter()
    views = decode_clip(clip, sampling, limits)  # [V, T, 3, S, S]
    return views, time.perf_counter() - t0


def _check_deadline(deadline: Optional[float], where: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExpired(f"deadline passed {where}; dropped before compute")


def _apply_overrides(base: SamplingConfig, overrides: Optional[Mapping[str, Any]]) -> SamplingConfig:
    if not overrides:
        return base
    try:
        return base.replace(**overrides)
    except ConfigError as e:
        raise BadRequest(f"bad sampling override: {e}") from e
    except TypeError as e:
        raise BadRequest(f"bad sampling override: {e}") from e
