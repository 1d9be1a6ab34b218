"""The timeline RPCs of ``stadapter.v1.VideoClassifier``: ClassifyWindows (clip whole) and ClassifyWindowsStream.

Server-streaming handlers are async generators, served in the data plane's request scope by
:func:`server.frontends.grpc_helpers.rpc` as the unary methods are: the token, the request's ticket around the
whole stream (a client that cancels mid-stream raises CancelledError through it, so the decode stops and
everything held is given back), the count in ``stadapter_requests_total`` and one status per error.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncGenerator, Optional

from server.dataplane.scope import Call
from server.engine.pipeline import ClipBytes, WindowClassification
from server.frontends.grpc_helpers import deadline_of, gather_clip, overrides_of, rpc
from server.frontends.wire_clip import clip_of
from stadapter_api.v1 import inference_pb2 as pb


def window_result(w: WindowClassification, request_id: str) -> pb.WindowResult:
    c, s = w.result, w.span
    labels = c.tv.spec.labels
    return pb.WindowResult(
        index=s.index, start_s=s.start_s, end_s=s.end_s, start_frame=s.start_frame, end_frame=s.end_frame,
        predictions=[pb.Prediction(label=labels[i], score=p, index=i) for i, p in c.top],
        task=c.tv.name, task_version=c.tv.version, request_id=request_id,
        timings=pb.Timings(decode_ms=c.decode_s * 1e3, queue_ms=c.queue_s * 1e3, compute_ms=c.compute_s * 1e3,
                           total_ms=c.total_s * 1e3, batch_size=c.batch_clips),
    )


class WindowsServicer:
    """Mixed into ``server.frontends.grpc_service.VideoClassifierService`` (which has the data plane and limits)."""

    plane: Any
    limits: Any

    async def _windows(self, call: Call, task: str, clip: ClipBytes, window_s: float, stride_s: float, top_k: int,
                       sampling: pb.SamplingOverrides, request_id: str,
                       deadline: Optional[float]) -> AsyncGenerator[pb.WindowResult, None]:
        request_id = call.request_id(request_id)  # the id logged and echoed
        windows = self.plane.windows(call, task, clip, window_s, stride_s, top_k, overrides_of(sampling), deadline)
        async with contextlib.aclosing(windows):
            async for w in windows:
                yield window_result(w, request_id)

    @rpc("ClassifyWindows", "classify", timed=True)
    async def ClassifyWindows(self, request: pb.ClassifyWindowsRequest, context,
                              call: Call) -> AsyncGenerator[pb.WindowResult, None]:
        call.task = request.task
        clip = clip_of(request)  # over gRPC a view of the received bytes: the one copy
        self.plane.hold_clip(call, clip)
        results = self._windows(call, request.task, clip, request.window_s, request.stride_s, request.top_k,
                                request.sampling, request.request_id, deadline_of(context))
        async with contextlib.aclosing(results):
            async for r in results:
                yield r

    @rpc("ClassifyWindowsStream", "classify", timed=True)
    async def ClassifyWindowsStream(self, request_iterator, context,
                                    call: Call) -> AsyncGenerator[pb.WindowResult, None]:
        """Chunks go into one buffer held on the ticket (as ClassifyStream); the windows start once it is whole."""
        first, buf = await gather_clip(request_iterator, context, call.ticket, self.limits,
                                       lambda c: setattr(call, "task", c.task))
        results = self._windows(call, first.task, buf, first.window_s, first.stride_s, first.top_k, first.sampling,
                                first.request_id, deadline_of(context))
        async with contextlib.aclosing(results):
            async for r in results:
                yield r
