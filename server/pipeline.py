"""One classification from bytes to top-k: admit, decode (worker processes, see decode_pool), batch, answer.

Admission happens before any work: a draining server answers UNAVAILABLE, a
full queue (``max_queue_size`` requests admitted and not yet computed)
RESOURCE_EXHAUSTED, an unknown task NOT_FOUND. The task version is captured
at admission and the request runs on it to the end.

Encoded clip bytes are a second budget (``max_inflight_bytes``): the services
hold a clip's bytes from the moment they arrive (chunk by chunk for a stream)
until the request ends, so many large uploads at once get RESOURCE_EXHAUSTED
instead of exhausting memory.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

from stadapter.config import ConfigError, SamplingConfig
from stadapter.video import VideoLimits

from .batcher import Batcher
from .decode_pool import Decoder, ThreadDecoder
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
                 video_limits: Optional[VideoLimits] = None, max_inflight_bytes: int = 1 << 30,
                 decoder: Optional[Decoder] = None, decode_timeout_s: float = 30.0):
        """``decoder``: the decoding backend (default: ``decode_workers`` threads in this process)."""
        self.registry = registry
        self.batcher = batcher
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.default_top_k = default_top_k
        self.max_clip_bytes = max_clip_bytes
        self.video_limits = video_limits or VideoLimits(max_bytes=max_clip_bytes)
        self.decoder: Decoder = decoder if decoder is not None else ThreadDecoder(decode_workers)
        self.decode_timeout_s = decode_timeout_s
        self.max_inflight_bytes = max_inflight_bytes
        self.held_bytes = 0  # encoded clip bytes held by requests in progress
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

    def check_clip_size(self, n: int) -> None:
        if not n:
            raise BadRequest("the clip is empty (0 bytes)")
        if n > self.max_clip_bytes:
            raise BadRequest(f"the clip is {n} bytes, above the limit of {self.max_clip_bytes}")

    def hold_bytes(self, n: int) -> None:
        """Count ``n`` more clip bytes against the budget, or refuse them (nothing is held then)."""
        if n > self.max_inflight_bytes:
            raise BadRequest(f"one request carries {n} bytes of clips, above the server's limit of "
                             f"{self.max_inflight_bytes} bytes in flight; send fewer or smaller clips per call")
        if self.held_bytes + n > self.max_inflight_bytes:
            raise QueueFull(f"clips in flight already hold {self.held_bytes} bytes; {n} more would pass the limit "
                            f"of {self.max_inflight_bytes}; retry later")
        self.held_bytes += n

    def free_bytes(self, n: int) -> None:
        self.held_bytes -= n

    @contextmanager
    def holding(self, n: int) -> Iterator[None]:
        """Hold ``n`` clip bytes for the duration of the block (see :meth:`hold_bytes`)."""
        self.hold_bytes(n)
        try:
            yield
        finally:
            self.free_bytes(n)

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
            self.batcher.check_rows(sampling.num_views)  # before any decoding
            self.check_clip_size(len(clip))
            _check_deadline(deadline, "before decode")
            views, decode_s = await self.decoder.decode(clip, sampling, self.video_limits, self.decode_timeout_s,
                                                        deadline)
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
        """Stop the decoders without waiting for a stuck decode."""
        self.decoder.close()


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
