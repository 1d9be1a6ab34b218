"""One classification from bytes to top-k: admit, decode (worker processes, see server.decode.pool), batch, answer.

Admission happens before any work, through the request's :class:`~server.engine.admission.Ticket`:
a draining server answers UNAVAILABLE, a full queue (``--max-queue-size`` requests
admitted and not yet computed) RESOURCE_EXHAUSTED, an unknown task NOT_FOUND. The
task version is captured at admission and the request runs on it to the end; its weights are brought into host memory
(``TaskRegistry.ensure_loaded``: read off the event loop on first use, one read for all requests that
wait for it) before its clip is decoded, and stay there while the request holds the version.

Encoded clip bytes are a second budget (``--max-inflight-clip-bytes``): the services
hold a clip's bytes on the ticket from the moment they arrive (as a stream's buffer
grows) until the request ends, so many large uploads at once get RESOURCE_EXHAUSTED
instead of exhausting memory. Every bound comes from one :class:`ServerLimits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Iterator, Mapping, Optional, Sequence, Union

from torch import Tensor

from server.config import ServerConfig
from server.decode.pool import Decoder, ThreadDecoder
from server.decode.window_jobs import WindowBatch, WindowJob, WindowSpan
from server.engine.admission import Admission, Slot, Ticket
from server.engine.batcher import Batcher
from server.engine.response_cache import CacheKey, ResponseCache, clip_digest
from server.engine.window_flow import in_window_order
from server.errors import BadRequest, DeadlineExpired
from server.limits import ServerLimits
from server.observability.metrics import Metrics
from server.registry.registry import TaskRegistry, TaskVersion
from stadapter.config import ConfigError, SamplingConfig

ClipBytes = Union[bytes, bytearray, memoryview]  # the buffer a stream was received into (no joined copy), or a view
# of a unary request's wire bytes (server.frontends.wire_clip)


@dataclass(frozen=True)
class Classification:
    tv: TaskVersion
    top: list[tuple[int, float]]  # (class index, probability), best first
    decode_s: float
    queue_s: float
    compute_s: float
    total_s: float
    batch_clips: int
    cached: bool = False  # answered from the response cache (no decode, no forward)


@dataclass(frozen=True)
class WindowClassification:
    """One window of a long clip: where it lies and its answer (``decode_s``: its batch's decode)."""

    span: WindowSpan
    result: Classification


Outcome = Union[Classification, Exception]  # one task's answer in a several-task request


@dataclass(frozen=True)
class TaskOutcomes:
    """A several-task request's answer: one outcome per task (the request's order) and its decodes."""

    items: list[Outcome]
    decodes: int  # decodes run (one per distinct sampling among the tasks that got that far)
    decode_s: float  # their time, summed


class Pipeline:
    """Classification on top of the shared :class:`Admission` counters and :class:`ServerLimits`.

    ``decoder``: the decoding backend; the server passes the one ``--decode-workers`` sizes
    (:func:`server.app.new_decoder`). Default: that flag's default number of threads in this process.
    ``response_cache``: answers kept by clip digest, task version and sampling (None: every clip is computed).
    """

    def __init__(self, registry: TaskRegistry, batcher: Batcher, metrics: Optional[Metrics], limits: ServerLimits,
                 decoder: Optional[Decoder] = None, default_top_k: int = 5,
                 response_cache: Optional[ResponseCache] = None):
        self.registry = registry
        self.response_cache = response_cache
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits
        self.default_top_k = default_top_k
        self.decoder: Decoder = decoder if decoder is not None else ThreadDecoder(ServerConfig.decode_workers)
        self.admission = Admission(registry, limits)
        if metrics is not None:
            a = self.admission
            metrics.queue_depth.set_function(lambda: a.pending)
            metrics.clip_in_flight_bytes.set_function(lambda: a.held_bytes)
            metrics.requests_in_flight.set_function(lambda: a.inflight)

    # --- what drain and the metrics read ---

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.admission.draining = value

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    @property
    def pending(self) -> int:
        return self.admission.pending

    @property
    def held_bytes(self) -> int:
        return self.admission.held_bytes

    async def wait_idle(self, timeout: float) -> bool:
        return await self.admission.wait_idle(timeout)

    # --- classification ---

    async def classify(self, ticket: Ticket, task: str, clip: ClipBytes, top_k: int = 0,
                       overrides: Optional[Mapping[str, Any]] = None,
                       deadline: Optional[float] = None) -> Classification:
        """Classify ``clip`` for ``task``; the queue slot and task version are the ticket's (given back when
        the clip is computed, or when the request ends, whichever comes first)."""
        t0 = time.monotonic()
        await self.registry.preload(task)  # an older version's first pin loads off the event loop
        with self._one_task(ticket, task, top_k, overrides, len(clip)) as (slot, k, sampling):
            key = self._cache_key(await self._digest(clip), slot.tv, sampling)
            hit = self._cached(key, slot.tv, k, t0)
            if hit is not None:
                return hit
            await self.registry.ensure_loaded(slot.tv)
            _check_deadline(deadline, "before decode")
            views, decode_s = await self._decode(clip, sampling, deadline)
            del clip  # the caller may still hold it; this frame does not
            return await self.compute(slot.tv, views, decode_s, k, deadline, t0, key)

    async def classify_tasks(self, ticket: Ticket, tasks: Sequence[str], clip: ClipBytes, top_k: int = 0,
                             overrides: Optional[Mapping[str, Any]] = None,
                             deadline: Optional[float] = None) -> TaskOutcomes:
        """Classify one clip for several tasks: one :class:`Classification` or exception per task, in order.

        The request as a whole is refused (raised) for a bad task list, top-k or clip size, a draining
        server, a queue without a slot for every task, or a deadline gone before decoding. Everything
        else fails only the tasks it concerns: an unknown task, an override its sampling refuses, a
        decode that failed (every task sharing it). Tasks whose sampling resolves equal share one decode;
        their rows are submitted together, so they can share one forward.
        """
        t0 = time.monotonic()
        self.limits.check_tasks(tasks)
        k = self.top_k(top_k)
        self.limits.check_clip_size(len(clip))
        for task in tasks:
            await self.registry.preload(task)
        slots = ticket.take_slots(tasks)
        out: list[Optional[Outcome]] = [None] * len(tasks)
        groups: dict[SamplingConfig, list[int]] = {}
        decoded: list[float] = []
        try:
            for i, s in enumerate(slots):
                if isinstance(s, Exception):
                    out[i] = s
                    continue
                try:
                    groups.setdefault(self.sampling(s.tv, overrides), []).append(i)
                except BadRequest as e:
                    out[i] = e
                    s.release()
            digest = await self._digest(clip)
            keys: dict[int, Optional[CacheKey]] = {}
            for sampling, members in groups.items():
                for i in list(members):
                    slot = slots[i]
                    assert isinstance(slot, Slot)
                    keys[i] = self._cache_key(digest, slot.tv, sampling)
                    hit = self._cached(keys[i], slot.tv, k, t0)
                    if hit is not None:  # answered: this task needs neither the decode nor a row
                        out[i] = hit
                        members.remove(i)
                        slot.release()
            groups = {smp: members for smp, members in groups.items() if members}

            async def loaded(i: int) -> None:
                slot = slots[i]
                assert isinstance(slot, Slot)
                try:
                    await self.registry.ensure_loaded(slot.tv)
                except Exception as e:  # noqa: BLE001 - this task's error (a bundle that does not load)
                    out[i] = e
                    slot.release()

            await asyncio.gather(*(loaded(i) for members in groups.values() for i in members))
            groups = {smp: [i for i in members if out[i] is None] for smp, members in groups.items()}
            groups = {smp: members for smp, members in groups.items() if members}
            if groups:
                _check_deadline(deadline, "before decode")

            async def item(i: int, views: Tensor, decode_s: float) -> None:
                slot = slots[i]
                assert isinstance(slot, Slot)
                try:
                    out[i] = await self.compute(slot.tv, views, decode_s, k, deadline, t0, keys[i])
                except Exception as e:  # noqa: BLE001 - this task's error, reported in its item
                    out[i] = e
                finally:
                    slot.release()

            async def group(sampling: SamplingConfig, members: list[int]) -> None:
                try:
                    views, decode_s = await self._decode(clip, sampling, deadline)
                except Exception as e:  # noqa: BLE001 - every task of this decode gets its error
                    for i in members:
                        out[i] = e
                    return
                decoded.append(decode_s)
                await asyncio.gather(*(item(i, views, decode_s) for i in members))

            await asyncio.gather(*(group(smp, members) for smp, members in groups.items()))
        finally:
            for s in slots:
                if isinstance(s, Slot):
                    s.release()
        assert all(o is not None for o in out)
        return TaskOutcomes(out, len(decoded), sum(decoded))  # type: ignore[arg-type]

    async def classify_windows(self, ticket: Ticket, task: str, clip: ClipBytes, window_s: float, stride_s: float,
                               top_k: int = 0, overrides: Optional[Mapping[str, Any]] = None,
                               deadline: Optional[float] = None) -> AsyncGenerator[WindowClassification, None]:
        """Classify ``clip`` window by window, in time order, batch by batch as they complete.

        The clip is decoded once, front to back, by one decoder or a few that each take a run of the
        windows (``Decoder.windows``); each batch of windows goes to the batcher as rows of the task as
        it comes, while the decoders go on, and the answers go out in window order
        (``server.engine.window_flow``). One queue slot and one task version for the whole request; the decode is counted
        once (``stadapter_decode_seconds``: the request's decoding time), each window as a clip. Leaving
        early (the client cancels, an error) stops the decode.
        """
        t0 = time.monotonic()
        await self.registry.preload(task)
        with self._one_task(ticket, task, top_k, overrides, len(clip)) as (slot, k, sampling):
            self.limits.check_windows(window_s, stride_s)
            await self.registry.ensure_loaded(slot.tv)
            _check_deadline(deadline, "before decode")
            job = WindowJob(window_s, stride_s, max(1, self.limits.max_batch_rows // sampling.num_views),
                            self.limits.windows)
            decode_s, decoded = 0.0, False

            async def compute(batch: WindowBatch) -> list[Classification]:
                nonlocal decode_s, decoded
                decode_s, decoded = decode_s + batch.decode_s, True
                return await asyncio.gather(*(self.compute(slot.tv, batch.frames[i], batch.decode_s, k, deadline, t0)
                                              for i in range(len(batch.spans))))

            batches = self.decoder.windows(clip, sampling, self.limits.video, job, self.limits.decode_timeout_s, deadline)
            try:
                async with contextlib.aclosing(batches), \
                        contextlib.aclosing(in_window_order(batches, compute, job.per_batch)) as answers:
                    async for span, c in answers:
                        yield WindowClassification(span, c)
            finally:
                if decoded and self.metrics is not None:
                    self.metrics.decode_seconds.observe(decode_s)

    @contextlib.contextmanager
    def _one_task(self, ticket: Ticket, task: str, top_k: int, overrides: Optional[Mapping[str, Any]],
                  clip_bytes: int) -> Iterator[tuple[Slot, int, SamplingConfig]]:
        """A one-task request's admission: its queue slot (given back when the block ends), its top-k and its
        resolved sampling, the clip's size checked (the size only: the clip itself is not held here)."""
        slot = ticket.take_slot(task)
        try:
            k = self.top_k(top_k)
            sampling = self.sampling(slot.tv, overrides)
            self.limits.check_clip_size(clip_bytes)
            yield slot, k, sampling
        finally:
            slot.release()

    def top_k(self, top_k: int) -> int:
        k = top_k or self.default_top_k
        self.limits.check_top_k(k)
        return k

    def sampling(self, tv: TaskVersion, overrides: Optional[Mapping[str, Any]]) -> SamplingConfig:
        """The task's sampling with the request's overrides, checked before any decoding."""
        self.limits.check_overrides(overrides)
        sampling = _apply_overrides(tv.spec.sampling, overrides)
        self.limits.check_rows(sampling.num_views)
        return sampling

    async def _decode(self, clip: ClipBytes, sampling: SamplingConfig,
                      deadline: Optional[float]) -> tuple[Tensor, float]:
        views, decode_s = await self.decoder.decode(clip, sampling, self.limits.video, self.limits.decode_timeout_s,
                                                    deadline)
        if self.metrics is not None:
            self.metrics.decode_seconds.observe(decode_s)
        return views, decode_s

    async def compute(self, tv: TaskVersion, views: Tensor, decode_s: float, k: int, deadline: Optional[float],
                       t0: float, key: Optional[CacheKey] = None) -> Classification:
        _check_deadline(deadline, "after decode")
        res = await self.batcher.submit(tv, views, deadline)
        if key is not None and self.response_cache is not None:
            self.response_cache.put(key, res.probs)
        return self._answer(tv, res.probs, k, t0, decode_s, res.queue_s, res.compute_s, res.batch_clips)

    def _answer(self, tv: TaskVersion, probs: Tensor, k: int, t0: float, decode_s: float, queue_s: float,
                compute_s: float, batch_clips: int, cached: bool = False) -> Classification:
        """One clip's probabilities as its top-k answer (counted as a clip classified for ``tv``'s task)."""
        values, idx = probs.topk(min(k, tv.spec.num_classes))
        if self.metrics is not None:
            self.metrics.clips.labels(self.metrics.task_label(tv.name)).inc()
        return Classification(tv, list(zip(idx.tolist(), values.tolist(), strict=True)), decode_s, queue_s, compute_s,
                              time.monotonic() - t0, batch_clips, cached)

    # --- the response cache (all no-ops without one) ---

    async def _digest(self, clip: ClipBytes) -> Optional[bytes]:
        return await clip_digest(clip) if self.response_cache is not None else None

    def _cache_key(self, digest: Optional[bytes], tv: TaskVersion, sampling: SamplingConfig) -> Optional[CacheKey]:
        return CacheKey(digest, tv.uid, sampling) if digest is not None else None

    def _cached(self, key: Optional[CacheKey], tv: TaskVersion, k: int, t0: float) -> Optional[Classification]:
        """The answer the cache holds for ``key``, as this request's top-k; None on a miss (or no cache)."""
        if key is None or self.response_cache is None:
            return None
        probs = self.response_cache.get(key)
        return None if probs is None else self._answer(tv, probs, k, t0, 0.0, 0.0, 0.0, 0, cached=True)

    def close(self) -> None:
        """Stop the decoders without waiting for a stuck decode."""
        self.decoder.close()


def _check_deadline(deadline: Optional[float], where: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExpired(f"deadline passed {where}; dropped before compute")


def _apply_overrides(base: SamplingConfig, overrides: Optional[Mapping[str, Any]]) -> SamplingConfig:
    if not overrides:
        return base
    fixed = sorted(k for k in ("mean", "std") if k in overrides)
    if fixed:  # the model normalises a clip's frames with its task's values (ModelRunner.stage)
        raise BadRequest(f"bad sampling override: {', '.join(fixed)} cannot be overridden (the task's are used)")
    try:
        return base.replace(**overrides)
    except ConfigError as e:
        raise BadRequest(f"bad sampling override: {e}") from e
    except TypeError as e:
        raise BadRequest(f"bad sampling override: {e}") from e
