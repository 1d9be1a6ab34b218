"""ClassifyLive of ``stadapter.v1.VideoClassifier``: a live stream's chunks in, one WindowResult per window and task out.

A bidirectional stream, served in the data plane's request scope by :func:`server.frontends.grpc_helpers.rpc` as
the other RPCs are (token, ticket, metrics, one status per error). The first chunk names the tasks, the windows,
top-k, the sampling overrides and the request id; every chunk may carry bytes. The stream's input ends on the
client's half-close (:func:`~server.frontends.grpc_helpers.confirm_half_close`); its idle time is bounded by
``--live-idle-s`` in ``server.engine.live_flow``. That check and the handler's results run in two tasks, ordered by
:class:`HeaderOrder`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncGenerator, AsyncIterator

from server.dataplane.scope import Call
from server.engine.live_flow import LiveAnswer, LiveRequest
from server.engine.pipeline import WindowClassification
from server.errors import BadRequest, StreamIdle
from server.frontends.grpc_helpers import confirm_half_close, overrides_of, rpc
from server.frontends.grpc_windows import window_result
from stadapter_api.v1 import inference_pb2 as pb


def live_results(a: LiveAnswer, request_id: str) -> list[pb.WindowResult]:
    """One window's answers, one per task: ClassifyWindows' result, with the receive time of its last frame."""
    out = []
    for c in a.results:
        r = window_result(WindowClassification(a.span, c), request_id)
        r.last_frame_received_unix_ns = a.received_ns
        out.append(r)
    return out


class HeaderOrder:
    """One at a time, the operations of a live call that may carry its response headers.

    The chunk pump (a task of its own in ``server.engine.live_flow``) checks the client's half-close by sending the
    headers (:func:`confirm_half_close`), while the handler writes results (the first write carries the headers)
    or ends with a status (which carries them if they were not sent). grpc's core refuses a second such operation
    while one is under way (``GRPC_CALL_ERROR_TOO_MANY_OPERATIONS``): the status is then never sent and the client
    waits for its deadline. One lock orders them, and the check, once begun, keeps it until grpc has answered,
    even when the pump that asked is cancelled (grpc cannot take back an operation it started).
    """

    def __init__(self, context):
        self.context = context
        self.lock = asyncio.Lock()

    async def confirm_half_close(self) -> None:
        async def confirm() -> None:
            async with self.lock:
                await confirm_half_close(self.context)

        await asyncio.shield(asyncio.ensure_future(confirm()))

    async def settled(self) -> None:
        """Wait until no header-carrying operation is under way (before the call's status is sent)."""
        async with self.lock:
            pass


class LiveServicer:
    """Mixed into ``server.frontends.grpc_service.VideoClassifierService`` (which has the data plane and limits)."""

    plane: Any
    limits: Any

    @rpc("ClassifyLive", "classify")
    async def ClassifyLive(self, request_iterator, context, call: Call) -> AsyncGenerator[pb.WindowResult, None]:
        it = request_iterator.__aiter__()
        idle_s = self.limits.live.idle_s
        try:
            first = await asyncio.wait_for(anext(it, None), idle_s)
        except asyncio.TimeoutError:
            raise StreamIdle(f"the live stream sent no first chunk for {idle_s:g} s (--live-idle-s)") from None
        if first is None:
            await confirm_half_close(context)
            raise BadRequest("the live stream carried no chunks (the first names the task and the windows)")
        names = ([first.task] if first.task else []) + list(first.tasks)
        call.task = names[0] if len(names) == 1 else ""
        request_id = call.request_id(first.request_id)
        req = LiveRequest(names, first.window_s, first.stride_s, first.top_k, overrides_of(first.sampling))
        order = HeaderOrder(context)
        answers = self.plane.classify_live(call, req, _chunks(first, it, order))
        try:
            async with contextlib.aclosing(answers):
                async for a in answers:
                    for r in live_results(a, request_id):
                        async with order.lock:  # held while grpc writes it (until it asks for the next)
                            yield r
        finally:
            await order.settled()


async def _chunks(first: pb.LiveChunk, it: AsyncIterator[pb.LiveChunk], order: HeaderOrder) -> AsyncIterator[bytes]:
    """The stream's bytes, chunk by chunk; ends only on the client's half-close (a cancel raises instead)."""
    yield first.data
    async for chunk in it:
        yield chunk.data
    await order.confirm_half_close()
