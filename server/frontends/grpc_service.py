"""gRPC servicers of ``stadapter.v1`` (VideoClassifier, TaskAdmin): codecs on the data plane (``server.dataplane``).

Each method parses its request, calls the data plane inside the request scope (entered through
:func:`server.frontends.grpc_helpers.rpc`: the token, the ticket, the count in
``stadapter_requests_total{method,task,code}`` and one status per error), and encodes the answer.
"""

from __future__ import annotations

import json
from typing import Sequence

from server.dataplane.inference import Answer, ClassifyArgs, ItemError
from server.dataplane.scope import Call
from server.engine.pipeline import Classification, ClipBytes
from server.errors import BadRequest
from server.frontends.grpc_helpers import Servicer, deadline_of, gather_clip, idle_bounded, overrides_of, rpc
from server.frontends.grpc_live import LiveServicer
from server.frontends.grpc_windows import WindowsServicer
from server.frontends.wire_clip import clip_of, items_of
from server.registry.registry import TaskVersion
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc


def task_info(tv: TaskVersion, servable_versions: Sequence[int] = (), residency: str = "") -> pb.TaskInfo:
    s = tv.spec
    return pb.TaskInfo(
        name=s.name, version=s.version, labels=list(s.labels), description=s.description,
        num_frames=s.sampling.num_frames, input_size=s.sampling.input_size, sampling_mode=s.sampling.mode,
        temporal_views=s.sampling.temporal_views, spatial_views=s.sampling.spatial_views,
        adapter_config_json=json.dumps(s.adapter.to_dict()), adapter_bytes=tv.nbytes, created=s.created,
        metrics_json=json.dumps(dict(s.metrics)), trunk_fingerprint=s.trunk_fingerprint, state="ready",
        servable_versions=list(servable_versions), residency=residency,
    )


def _response(c: Classification, request_id: str) -> pb.ClassifyResponse:
    labels = c.tv.spec.labels
    return pb.ClassifyResponse(
        task=c.tv.name, task_version=c.tv.version, request_id=request_id,
        predictions=[pb.Prediction(label=labels[i], score=p, index=i) for i, p in c.top],
        timings=pb.Timings(decode_ms=c.decode_s * 1e3, queue_ms=c.queue_s * 1e3, compute_ms=c.compute_s * 1e3,
                           total_ms=c.total_s * 1e3, batch_size=c.batch_clips, cached=c.cached),
    )


def _item_error(e: ItemError) -> pb.ItemError:
    return pb.ItemError(code=e.code.value[0], message=e.message)


def _task_result(name: str, o: Classification | ItemError) -> pb.TaskResult:
    if isinstance(o, ItemError):
        return pb.TaskResult(task=name, error=_item_error(o))
    r = _response(o, "")
    return pb.TaskResult(task=r.task, task_version=r.task_version, predictions=r.predictions, timings=r.timings)


def _answer(a: Answer) -> pb.ClassifyResponse:
    """``a.one``: the one-task response of before; else the task list's ``results``."""
    if a.one is not None:
        return _response(a.one, a.request_id)
    return pb.ClassifyResponse(request_id=a.request_id, results=[_task_result(i.name, i.outcome) for i in a.items],
                               timings=pb.Timings(decode_ms=a.decode_s * 1e3, total_ms=a.total_s * 1e3))


def _args(m, clip: ClipBytes) -> ClassifyArgs:
    """A ClassifyRequest's (or first ClassifyChunk's) fields, with its clip."""
    return ClassifyArgs(m.task, list(m.tasks), clip, m.top_k, overrides_of(m.sampling), m.request_id)


def _label(task: str, tasks: Sequence[str]) -> str:
    """The RPC's task label: its task when it names one; a several-task request counts its tasks per item."""
    return task if not tasks else ""


class VideoClassifierService(Servicer, WindowsServicer, LiveServicer, pb_grpc.VideoClassifierServicer):
    def _info(self, tv: TaskVersion) -> pb.TaskInfo:
        return task_info(tv, self.plane.servable_versions(tv.name), self.plane.residency(tv))

    @rpc("Classify", "classify", timed=True)
    async def Classify(self, request: pb.ClassifyRequest, context, call: Call) -> pb.ClassifyResponse:
        call.task = _label(request.task, request.tasks)
        clip = clip_of(request)  # over gRPC a view of the received bytes: the one copy
        self.plane.hold_clip(call, clip)
        return _answer(await self.plane.classify(call, _args(request, clip), deadline_of(context), "Classify"))

    @rpc("ClassifyStream", "classify", timed=True)
    async def ClassifyStream(self, request_iterator, context, call: Call) -> pb.ClassifyResponse:
        """Chunks are appended to one buffer as they arrive (no list of chunks, no joined copy); the ticket
        holds the buffer's length against the budget, and the buffer is what the decoder gets."""
        first, buf = await gather_clip(request_iterator, context, call.ticket, self.limits,
                                       lambda c: setattr(call, "task", _label(c.task, c.tasks)))
        return _answer(await self.plane.classify(call, _args(first, buf), deadline_of(context), "ClassifyStream"))

    @rpc("BatchClassify", "classify")
    async def BatchClassify(self, request: pb.BatchClassifyRequest, context, call: Call) -> pb.BatchClassifyResponse:
        items = items_of(request)  # over gRPC each clip a view of the received bytes
        answers = await self.plane.batch(call, [_args(r, r.clip) for r in items], deadline_of(context),
                                         "BatchClassify")
        return pb.BatchClassifyResponse(results=[
            pb.BatchClassifyResult(error=_item_error(a)) if isinstance(a, ItemError)
            else pb.BatchClassifyResult(response=_answer(a)) for a in answers])

    @rpc("ListTasks", "classify", timed=True)
    async def ListTasks(self, request, context, call: Call) -> pb.ListTasksResponse:
        trunk = self.plane.registry.trunk
        model = trunk.spec.model if trunk.spec is not None else ""
        return pb.ListTasksResponse(tasks=[self._info(tv) for tv in self.plane.tasks()], trunk_model=model,
                                    trunk_fingerprint=trunk.fingerprint)

    @rpc("DescribeTask", "classify", timed=True)
    async def DescribeTask(self, request: pb.DescribeTaskRequest, context, call: Call) -> pb.TaskInfo:
        call.task = request.task
        return self._info(self.plane.task(request.task))


class TaskAdminService(Servicer, pb_grpc.TaskAdminServicer):
    @rpc("RegisterTask", "admin")
    async def RegisterTask(self, request_iterator, context, call: Call) -> pb.RegisterTaskResponse:
        idle_s = self.limits.stream_idle_timeout_s
        tv = await self.plane.register(call, lambda held: idle_bounded(request_iterator, context, idle_s, held))
        return pb.RegisterTaskResponse(task=task_info(tv))  # this version's facts: a retry's answer is the same

    @rpc("UnregisterTask", "admin")
    async def UnregisterTask(self, request: pb.UnregisterTaskRequest, context,
                             call: Call) -> pb.UnregisterTaskResponse:
        call.task = request.task
        if not request.task:
            raise BadRequest("the request names no task")
        name, version = await self.plane.unregister(request.task)
        return pb.UnregisterTaskResponse(task=name, version=version)


__all__ = ["TaskAdminService", "VideoClassifierService", "task_info"]
