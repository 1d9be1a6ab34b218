"""gRPC servicers of ``stadapter.v1`` (VideoClassifier, TaskAdmin) on the data plane (``server.dataplane``).

Every method is served in the data plane's request scope through :func:`server.frontends.grpc_helpers.rpc`:
the token, the ticket, the count in ``stadapter_requests_total{method,task,code}`` and one status per error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

from server.dataplane.scope import Call
from server.engine.admission import Ticket
from server.engine.pipeline import Classification, ClipBytes
from server.errors import BadRequest, TaskNotFound, ended_code, status_for
from server.frontends.grpc_helpers import Servicer, gather_clip, idle_bounded, rpc
from server.frontends.grpc_helpers import deadline_of as _deadline
from server.frontends.grpc_helpers import overrides_of as _overrides
from server.frontends.grpc_windows import WindowsServicer
from server.frontends.wire_clip import clip_of, items_of
from server.observability.logs import current_request_id
from server.registry.registry import UPLOAD_FILES, TaskVersion
from stadapter.bundle import ADAPTER_FILE, TASK_FILE
from stadapter.config import brief
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("server.frontends.grpc_service")

def task_info(tv: TaskVersion, servable_versions: Sequence[int] = ()) -> pb.TaskInfo:
    s = tv.spec
    return pb.TaskInfo(
        name=s.name, version=s.version, labels=list(s.labels), description=s.description,
        num_frames=s.sampling.num_frames, input_size=s.sampling.input_size, sampling_mode=s.sampling.mode,
        temporal_views=s.sampling.temporal_views, spatial_views=s.sampling.spatial_views,
        adapter_config_json=json.dumps(s.adapter.to_dict()), adapter_bytes=tv.nbytes, created=s.created,
        metrics_json=json.dumps(dict(s.metrics)), trunk_fingerprint=s.trunk_fingerprint, state="ready",
        servable_versions=list(servable_versions),
    )


def _response(c: Classification, request_id: str) -> pb.ClassifyResponse:
    labels = c.tv.spec.labels
    return pb.ClassifyResponse(
        task=c.tv.name, task_version=c.tv.version, request_id=request_id,
        predictions=[pb.Prediction(label=labels[i], score=p, index=i) for i, p in c.top],
        timings=pb.Timings(decode_ms=c.decode_s * 1e3, queue_ms=c.queue_s * 1e3, compute_ms=c.compute_s * 1e3,
                           total_ms=c.total_s * 1e3, batch_size=c.batch_clips, cached=c.cached),
    )


def _task_result(c: Classification) -> pb.TaskResult:
    r = _response(c, "")
    return pb.TaskResult(task=r.task, task_version=r.task_version, predictions=r.predictions, timings=r.timings)


def _label(task: str, tasks: Sequence[str]) -> str:
    """The RPC's task label: its task when it names one; a several-task request counts its tasks per item."""
    return task if not tasks else ""


class VideoClassifierService(Servicer, WindowsServicer, pb_grpc.VideoClassifierServicer):
    def _info(self, tv: TaskVersion) -> pb.TaskInfo:
        return task_info(tv, self.plane.registry.servable_versions(tv.name))

    async def _classify(self, ticket: Ticket, task: str, tasks: Sequence[str], clip: ClipBytes, top_k: int,
                        sampling: pb.SamplingOverrides, request_id: str, deadline: Optional[float],
                        method: str) -> pb.ClassifyResponse:
        """``tasks`` empty: the one-task request and response of before. Otherwise ``task`` (if set) and
        ``tasks`` are the task list, answered in ``results``; each task is counted as ``<method>.task``."""
        request_id = request_id or current_request_id() or uuid.uuid4().hex  # the id logged and echoed
        if not tasks:
            c = await self.plane.pipeline.classify(ticket, task, clip, top_k, _overrides(sampling), deadline)
            return _response(c, request_id)
        t0 = time.monotonic()
        names = ([task] if task else []) + list(tasks)
        outcomes = await self.plane.pipeline.classify_tasks(ticket, names, clip, top_k, _overrides(sampling), deadline)
        results = []
        for name, o in zip(names, outcomes.items):
            if isinstance(o, Classification):
                code = "OK"
                results.append(_task_result(o))
            else:
                status, message = status_for(o)
                code = status.name
                results.append(pb.TaskResult(task=name, error=pb.ItemError(code=status.value[0], message=message)))
            self.plane.metrics.requests.labels(f"{method}.task", self.plane.task_label(name), code).inc()
        timings = pb.Timings(decode_ms=outcomes.decode_s * 1e3, total_ms=(time.monotonic() - t0) * 1e3)
        return pb.ClassifyResponse(request_id=request_id, results=results, timings=timings)

    @rpc("Classify", "classify", timed=True)
    async def Classify(self, request: pb.ClassifyRequest, context, call: Call) -> pb.ClassifyResponse:
        call.task = _label(request.task, request.tasks)
        ticket = call.ticket
        clip = clip_of(request)  # over gRPC a view of the received bytes: the one copy
        if len(clip) > self.limits.max_clip_bytes:
            self.limits.check_clip_size(len(clip))  # too big is INVALID_ARGUMENT, whatever the budget
        ticket.hold(len(clip))
        ticket.own(clip)
        return await self._classify(ticket, request.task, request.tasks, clip, request.top_k, request.sampling,
                                    request.request_id, _deadline(context), "Classify")

    @rpc("ClassifyStream", "classify", timed=True)
    async def ClassifyStream(self, request_iterator, context, call: Call) -> pb.ClassifyResponse:
        """Chunks are appended to one buffer as they arrive (no list of chunks, no joined copy); the ticket
        holds the buffer's length against the budget, and the buffer is what the decoder gets."""
        ticket = call.ticket
        first, buf = await gather_clip(request_iterator, context, ticket, self.limits,
                                       lambda c: setattr(call, "task", _label(c.task, c.tasks)))
        return await self._classify(ticket, first.task, first.tasks, buf, first.top_k, first.sampling,
                                    first.request_id, _deadline(context), "ClassifyStream")

    @rpc("BatchClassify", "classify")
    async def BatchClassify(self, request: pb.BatchClassifyRequest, context,
                            call: Call) -> pb.BatchClassifyResponse:
        ticket = call.ticket
        deadline = _deadline(context)
        items = items_of(request)  # over gRPC each clip a view of the received bytes
        ticket.hold(sum(len(r.clip) for r in items))
        for r in items:
            ticket.own(r.clip)

        async def one(req: pb.ClassifyRequest) -> pb.BatchClassifyResult:
            try:
                resp = await self._classify(ticket, req.task, req.tasks, req.clip, req.top_k, req.sampling,
                                            req.request_id, deadline, "BatchClassify")
                self.plane.metrics.requests.labels("BatchClassify.item", self.plane.task_label(req.task), "OK").inc()
                return pb.BatchClassifyResult(response=resp)
            except Exception as e:  # noqa: BLE001 - each item gets its own status
                code, message = status_for(e)
                self.plane.metrics.requests.labels("BatchClassify.item", self.plane.task_label(req.task), code.name).inc()
                return pb.BatchClassifyResult(error=pb.ItemError(code=code.value[0], message=message))

        results = await asyncio.gather(*(one(r) for r in items))
        return pb.BatchClassifyResponse(results=results)

    @rpc("ListTasks", "classify", timed=True)
    async def ListTasks(self, request, context, call: Call) -> pb.ListTasksResponse:
        trunk = self.plane.registry.trunk
        tasks = [self._info(tv) for _, tv in sorted(self.plane.registry.tasks.items())]
        model = trunk.spec.model if trunk.spec is not None else ""
        return pb.ListTasksResponse(tasks=tasks, trunk_model=model, trunk_fingerprint=trunk.fingerprint)

    @rpc("DescribeTask", "classify", timed=True)
    async def DescribeTask(self, request: pb.DescribeTaskRequest, context, call: Call) -> pb.TaskInfo:
        call.task = request.task
        return self._info(self.plane.registry.get(request.task))


class TaskAdminService(Servicer, pb_grpc.TaskAdminServicer):
    @rpc("RegisterTask", "admin")
    async def RegisterTask(self, request_iterator, context, call: Call) -> pb.RegisterTaskResponse:
        upload = self.plane.registry.upload_path()
        owner = _UploadOwner()
        try:
            await asyncio.to_thread(upload.mkdir)  # a cancellation during it still reaches the finally below
            upload_id = await self._receive(request_iterator, context, upload)
            tv = await asyncio.to_thread(self._register_owned, upload, owner, upload_id)
        except BaseException as e:  # CancelledError too: a client that hangs up mid-upload (or after its last chunk)
            code = ended_code(context) if isinstance(e, asyncio.CancelledError) else status_for(e)[0]
            self.plane.metrics.registrations.labels(code.name.lower()).inc()
            raise
        finally:
            if owner.claim("cleanup"):  # shielded: a second cancellation cannot stop the removal
                await asyncio.shield(asyncio.to_thread(_rmtree, upload))
        call.task = tv.name
        self.plane.metrics.registrations.labels("ok").inc()
        log.info("registered task %s version %d", tv.name, tv.version)
        return pb.RegisterTaskResponse(task=task_info(tv))  # this version's facts: a retry's answer is the same

    def _register_owned(self, upload: Path, owner: "_UploadOwner", upload_id: str):
        """register_upload consumes the folder; it publishes only if the cleanup has not taken it by then (the
        claim is made right before the publishing rename: a call cancelled while its bundle is validated, or
        before this job's thread starts, publishes nothing)."""
        return self.plane.registry.register_upload(upload, upload_id=upload_id, claim=lambda: owner.claim("register"))

    async def _receive(self, request_iterator, context, upload: Path) -> str:
        """Write the upload's files; returns its upload id (from the first chunk, "" when the client sent none)."""
        bundle = self.limits.bundle
        limits = {TASK_FILE: bundle.max_json_bytes, ADAPTER_FILE: bundle.max_tensor_bytes}
        sizes = {name: 0 for name in UPLOAD_FILES}
        handles = {}
        upload_id: Optional[str] = None
        try:
            async for chunk in idle_bounded(request_iterator, context, self.limits.stream_idle_timeout_s,
                                            lambda: sum(sizes.values())):
                if upload_id is None:
                    upload_id = _check_upload_id(chunk.upload_id)
                elif chunk.upload_id and chunk.upload_id != upload_id:
                    raise BadRequest(f"chunk with upload id {brief(chunk.upload_id)} inside upload "
                                     f"{brief(upload_id)}; the first chunk names the upload")
                name = chunk.filename
                if name not in sizes:
                    raise BadRequest(f"unexpected file {brief(name)} in the upload; a bundle is {TASK_FILE} + {ADAPTER_FILE}")
                data = chunk.data  # a copy out of the message: taken once
                sizes[name] += len(data)
                if sizes[name] > limits[name]:
                    raise BadRequest(f"{name} exceeds the limit of {limits[name]} bytes")
                if name not in handles:
                    handles[name] = open(upload / name, "wb")
                await asyncio.to_thread(handles[name].write, data)
        finally:
            for h in handles.values():
                h.close()
        missing = [n for n in UPLOAD_FILES if n not in handles]
        if missing:
            raise BadRequest(f"the upload lacks {missing}; a bundle is {TASK_FILE} + {ADAPTER_FILE}")
        return upload_id or ""

    @rpc("UnregisterTask", "admin")
    async def UnregisterTask(self, request: pb.UnregisterTaskRequest, context,
                             call: Call) -> pb.UnregisterTaskResponse:
        call.task = request.task
        if not request.task:
            raise BadRequest("the request names no task")
        try:
            name, version = await asyncio.to_thread(self.plane.registry.unregister, request.task)
        except TaskNotFound:
            self.plane.metrics.unregistrations.labels("not_found").inc()
            raise
        self.plane.metrics.unregistrations.labels("ok").inc()
        log.info("unregistered %s %s version %d", "one version of task" if "@" in request.task else "task", name, version)
        return pb.UnregisterTaskResponse(task=name, version=version)


class _UploadOwner:
    """Exactly one party takes an upload folder: registration (in its thread) or the cleanup."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[str] = None

    def claim(self, who: str) -> bool:
        with self._lock:
            if self._owner is None:
                self._owner = who
            return self._owner == who


_UPLOAD_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _check_upload_id(upload_id: str) -> str:
    if upload_id and not _UPLOAD_ID.fullmatch(upload_id):
        raise BadRequest(f"upload id {brief(upload_id)} is not 1-128 characters of A-Z a-z 0-9 . _ : -")
    return upload_id


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


__all__ = ["TaskAdminService", "VideoClassifierService", "task_info"]
