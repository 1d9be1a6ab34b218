"""Classification as every frontend asks for it: one clip for one task or several, a batch of such requests,
a clip's windows, and the ``N`` clips of one OIP request. Answers are protocol-neutral (``Classification`` and
the dataclasses here); the frontends encode them. Several-task and batch items are counted here, per item,
under ``<method>.task`` and ``<method>.item``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Mapping, Optional, Sequence, Union

import grpc

from server.dataplane.scope import Call
from server.engine.pipeline import Classification, ClipBytes, Pipeline, WindowClassification
from server.errors import status_for
from server.limits import ServerLimits
from server.observability.metrics import Metrics
from server.registry.registry import TaskVersion


@dataclass(frozen=True)
class ClassifyArgs:
    """One classify request: ``tasks`` empty, the one task ``task``; else ``task`` (if set) and ``tasks`` together."""

    task: str
    tasks: Sequence[str]
    clip: ClipBytes
    top_k: int = 0
    overrides: Optional[Mapping[str, Any]] = None  # None: the tasks' own sampling
    request_id: str = ""


@dataclass(frozen=True)
class ItemError:
    """Why one task of a several-task request, or one item of a batch, failed: its status and message."""

    code: grpc.StatusCode
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> "ItemError":
        return cls(*status_for(exc))


@dataclass(frozen=True)
class TaskItem:
    name: str
    outcome: Union[Classification, ItemError]


@dataclass(frozen=True)
class Answer:
    """A classify request's answer: ``one`` for a one-task request, else ``items`` (one per task, in order) with
    the request's decoding time, decodes and total time."""

    request_id: str
    one: Optional[Classification] = None
    items: tuple[TaskItem, ...] = ()
    decode_s: float = 0.0
    decodes: int = 0
    total_s: float = 0.0


class Inference:
    """The classification operations of :class:`server.dataplane.plane.DataPlane`."""

    pipeline: Pipeline
    metrics: Metrics

    def task_label(self, name: str) -> str:  # pragma: no cover - DataPlane's
        raise NotImplementedError

    @property
    def limits(self) -> ServerLimits:  # pragma: no cover - DataPlane's
        raise NotImplementedError

    def hold_clip(self, call: Call, clip: ClipBytes) -> None:
        """A whole clip a request brought: held on its ticket (too large is INVALID_ARGUMENT, whatever the budget)."""
        if len(clip) > self.limits.max_clip_bytes:
            self.limits.check_clip_size(len(clip))
        call.ticket.hold(len(clip))
        call.ticket.own(clip)

    def check_clips(self, clips: Sequence[ClipBytes]) -> None:
        """The clips of one request (OIP's ``CLIP`` elements), each checked as one clip is, before any is held."""
        for i, clip in enumerate(clips):
            self.limits.check_clip_size(len(clip), i)

    async def classify(self, call: Call, args: ClassifyArgs, deadline: Optional[float], method: str) -> Answer:
        request_id = call.request_id(args.request_id)  # the id logged and echoed
        if not args.tasks:
            c = await self.pipeline.classify(call.ticket, args.task, args.clip, args.top_k, args.overrides, deadline)
            return Answer(request_id, one=c)
        t0 = time.monotonic()
        names = ([args.task] if args.task else []) + list(args.tasks)
        outcomes = await self.pipeline.classify_tasks(call.ticket, names, args.clip, args.top_k, args.overrides,
                                                      deadline)
        items = []
        for name, o in zip(names, outcomes.items, strict=True):
            item = TaskItem(name, o if isinstance(o, Classification) else ItemError.of(o))
            code = grpc.StatusCode.OK if isinstance(item.outcome, Classification) else item.outcome.code
            self.metrics.requests.labels(f"{method}.task", self.task_label(name), code.name).inc()
            items.append(item)
        return Answer(request_id, items=tuple(items), decode_s=outcomes.decode_s, decodes=outcomes.decodes,
                      total_s=time.monotonic() - t0)

    async def batch(self, call: Call, requests: Sequence[ClassifyArgs], deadline: Optional[float],
                    method: str) -> list[Union[Answer, ItemError]]:
        """Every request of a batch on the one ticket (their clips held on it first); each item its own answer
        or error, counted under ``<method>.item``."""
        call.ticket.hold(sum(len(r.clip) for r in requests))
        for r in requests:
            call.ticket.own(r.clip)

        async def one(r: ClassifyArgs) -> Union[Answer, ItemError]:
            try:
                answer: Union[Answer, ItemError] = await self.classify(call, r, deadline, method)
                code = grpc.StatusCode.OK
            except Exception as e:  # noqa: BLE001 - each item gets its own status
                answer = ItemError.of(e)
                code = answer.code
            self.metrics.requests.labels(f"{method}.item", self.task_label(r.task), code.name).inc()
            return answer

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def windows(self, call: Call, task: str, clip: ClipBytes, window_s: float, stride_s: float, top_k: int,
                overrides: Optional[Mapping[str, Any]], deadline: Optional[float]) -> AsyncGenerator[WindowClassification, None]:
        """The clip's windows, in time order (``Pipeline.classify_windows``); close it to stop the decode."""
        return self.pipeline.classify_windows(call.ticket, task, clip, window_s, stride_s, top_k, overrides, deadline)

    async def classify_clips(self, call: Call, tv: TaskVersion, clips: Sequence[bytes], top_k: int,
                             overrides: Optional[Mapping[str, Any]],
                             deadline: Optional[float]) -> list[Classification]:
        """Every clip of one request for model ``tv`` on its ticket (the caller holds their bytes); the first
        failure is the answer."""
        task = tv.name if self.pipeline.registry.tasks.get(tv.name) is tv else f"{tv.name}@{tv.version}"  # a pin
        results = await asyncio.gather(
            *(self.pipeline.classify(call.ticket, task, clip, top_k, overrides, deadline) for clip in clips),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, Classification)]
