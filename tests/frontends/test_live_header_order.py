"""ClassifyLive's two tasks (the chunk pump's half-close check, the handler's results and status) never put two
header-carrying operations on the call at once: grpc's core refuses the second (TOO_MANY_OPERATIONS), the status is
lost and the client waits for its deadline (seen as a hung test on an MP4 refused as its upload ended).

A fake call stands for grpc's: its header send takes a while, and any write or abort that would carry the headers
while it is under way is recorded as a clash."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import grpc
import pytest

from server.dataplane.scope import Refused
from server.errors import BadRequest
from server.frontends import grpc_live
from stadapter_api.v1 import inference_pb2 as pb


class FakeCall:
    """The header bookkeeping of a grpc.aio server call: one header-carrying operation at a time."""

    def __init__(self):
        self.headers_sent = False
        self.sending = asyncio.Event()  # a header send is under way
        self.clashes: list[str] = []
        self.written: list[object] = []
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def send_initial_metadata(self, metadata) -> None:
        if self.headers_sent:
            raise grpc.aio.UsageError("Send initial metadata failed: already sent")
        self._check("send_initial_metadata")
        self.sending.set()
        await asyncio.sleep(0.05)
        self.sending.clear()
        self.headers_sent = True

    async def write(self, item) -> None:  # what grpc does with each item the handler yields
        if not self.headers_sent:
            self._check("write")
            self.headers_sent = True
        self.written.append(item)

    async def abort(self, code, details) -> None:
        if not self.headers_sent:
            self._check("abort")
        self.status = (code, details)
        raise grpc.aio.AbortError()

    def _check(self, op: str) -> None:
        if self.sending.is_set():
            self.clashes.append(op)


class FakePlane:
    """The data plane's scope and live flow, reduced to what the ordering needs: the flow reads every chunk in a
    task of its own (as ``server.engine.live_flow``'s pump) and, once the half-close check is under way, either
    fails (``fail``) or answers a window."""

    def __init__(self, ctx: FakeCall, fail: bool):
        self.ctx, self.fail = ctx, fail
        self.limits = SimpleNamespace(live=SimpleNamespace(idle_s=5.0))

    @contextlib.asynccontextmanager
    async def request(self, wire, method, access, timed):
        try:
            yield SimpleNamespace(task="", request_id=lambda given: given or "r-1")
        except BadRequest as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e

    async def classify_live(self, call, req, chunks):
        async def pump():
            async for _ in chunks:
                pass

        task = asyncio.ensure_future(pump())
        try:
            await asyncio.wait_for(self.ctx.sending.wait(), 5)
            if self.fail:
                raise BadRequest("the stream is an MP4 whose index comes at its end")
            yield "window 0"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _serve(fail: bool) -> FakeCall:
    ctx = FakeCall()
    servicer = grpc_live.LiveServicer()
    servicer.plane = FakePlane(ctx, fail)
    servicer.limits = servicer.plane.limits

    async def chunks():
        yield pb.LiveChunk(task="motion", window_s=2, stride_s=1, data=b"head")
        yield pb.LiveChunk(data=b"tail")

    with contextlib.suppress(grpc.aio.AbortError):
        async for item in servicer.ClassifyLive(chunks(), ctx):
            await ctx.write(item)
    await asyncio.sleep(0.1)  # a header send left running would clash with nothing more, but must end
    return ctx


@pytest.fixture
def one_result_per_answer(monkeypatch):
    monkeypatch.setattr(grpc_live, "live_results", lambda a, request_id: [a])


def test_an_error_while_the_half_close_check_is_under_way_waits_for_it(one_result_per_answer):
    ctx = asyncio.run(_serve(fail=True))
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.INVALID_ARGUMENT, ctx.status
    assert "index comes at its end" in ctx.status[1]
    assert ctx.clashes == []


def test_a_result_while_the_half_close_check_is_under_way_waits_for_it(one_result_per_answer):
    ctx = asyncio.run(_serve(fail=False))
    assert ctx.written == ["window 0"] and ctx.status is None
    assert ctx.clashes == []
