"""Small pieces every gRPC servicer shares (``stadapter.v1`` and OIP): the data plane's request scope as a method
decorator (:func:`rpc`), a request's deadline, its sampling overrides, idle-bounded client streams that end only on
the client's half-close."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

import grpc

from server.dataplane.plane import DataPlane
from server.dataplane.scope import Access, Refused
from server.engine.admission import Ticket
from server.errors import BadRequest, StreamIdle, ended_code
from server.frontends.auth import Auth
from server.limits import ServerLimits
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.wire import SAMPLING_OVERRIDE_FIELDS

T = TypeVar("T")


class GrpcWire:
    """The request scope's view of a gRPC call: the token in its metadata; a call its client ended shows as
    ``CancelledError`` (or, for a server stream grpc closes, ``GeneratorExit``)."""

    __slots__ = ("context",)

    def __init__(self, context: grpc.aio.ServicerContext):
        self.context = context

    def check(self, auth: Auth, access: Access) -> None:
        if access == "admin":
            auth.check_admin(self.context)
        elif access == "classify":
            auth.check_classify(self.context)

    def ended(self, exc: BaseException) -> Optional[grpc.StatusCode]:
        return ended_code(self.context) if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else None


def rpc(method: str, access: Access, timed: bool = False):
    """Serve a servicer method ``fn(self, request, context, call)`` in the data plane's request scope
    (``self.plane``): a coroutine's return value or an async generator's items are the answer; an error is the
    status the scope mapped it to. ``timed``: the call's latency is observed too. For a server stream, the scope
    (and the ticket) spans the whole stream: a client that cancels mid-stream closes it and frees what it held."""

    def deco(fn):
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream(self, request, context: grpc.aio.ServicerContext):
                try:
                    async with self.plane.request(GrpcWire(context), method, access, timed) as call:
                        async with contextlib.aclosing(fn(self, request, context, call)) as items:
                            async for item in items:  # closed at once when grpc closes this generator
                                yield item
                except Refused as e:
                    await context.abort(e.code, e.message)

            return stream

        @functools.wraps(fn)
        async def unary(self, request, context: grpc.aio.ServicerContext):
            try:
                async with self.plane.request(GrpcWire(context), method, access, timed) as call:
                    return await fn(self, request, context, call)
            except Refused as e:
                await context.abort(e.code, e.message)

        return unary

    return deco


class Servicer:
    """A gRPC servicer on the data plane (``stadapter.v1``'s and OIP's)."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    @property
    def limits(self) -> ServerLimits:
        return self.plane.limits


async def confirm_half_close(context: grpc.aio.ServicerContext) -> None:
    """Make sure a client stream that just ended was ended by the client's half-close; raise
    ``asyncio.CancelledError`` when the call is over instead (a cancel, a passed deadline, a closed channel).

    grpc.aio ends the request iterator the same way in all of these cases: it cannot tell a failed read from
    the end of the stream, and ``context.cancelled()`` / ``context.done()`` only describe this server's own
    status. The cancellation reaches the handler later, as ``CancelledError`` at some await. So before a
    stream's end is acted on, one operation goes through the call: the response headers. On a call the
    client ended it fails, or the cancellation arrives while it is under way; on a live call it is what
    would be sent anyway."""
    try:
        await context.send_initial_metadata(())
    except grpc.aio.UsageError:  # headers already sent: the call was live then; nothing more to learn here
        return
    except grpc.aio.InternalError:  # the operation failed in grpc's core: the call is over
        raise asyncio.CancelledError("the client ended the call before its stream was complete") from None


async def idle_bounded(iterator: AsyncIterator[T], context: grpc.aio.ServicerContext, idle_s: float,
                       held: Callable[[], int]) -> AsyncIterator[T]:
    """``iterator``'s messages; a gap of more than ``idle_s`` seconds ends the call with :class:`StreamIdle`
    (``held()``: the bytes received so far, for the message; the caller's ticket frees them). The stream ends
    only on the client's half-close (:func:`confirm_half_close`): a stream the client cancelled, closed or let
    run past its deadline raises ``CancelledError`` however many messages it sent, so it is never acted on."""
    it = iterator.__aiter__()
    while True:
        try:
            item = await asyncio.wait_for(it.__anext__(), idle_s)
        except StopAsyncIteration:
            await confirm_half_close(context)
            return
        except asyncio.TimeoutError:
            raise StreamIdle(f"the stream sent nothing for {idle_s:g} s (--stream-idle-timeout-s) after "
                             f"{held()} bytes; it was ended and its bytes freed") from None
        yield item


async def gather_clip(chunks: AsyncIterator[T], context: grpc.aio.ServicerContext, ticket: Ticket,
                      limits: ServerLimits, on_first: Callable[[T], object]) -> tuple[T, bytearray]:
    """A client stream's clip: chunks appended to one buffer as they arrive (no list of chunks, no joined copy),
    its length held on ``ticket`` against the clip-byte budget; returns the first chunk (its header fields;
    ``on_first`` sees it as it arrives) and the buffer, which is what the decoder gets. Returns only after the
    client's half-close (see :func:`idle_bounded`)."""
    first: Optional[T] = None
    buf = bytearray()
    ticket.own(buf)
    limit = limits.max_clip_bytes
    async for chunk in idle_bounded(chunks, context, limits.stream_idle_timeout_s, lambda: len(buf)):
        if first is None:
            first = chunk
            on_first(chunk)
        data = chunk.data  # type: ignore[attr-defined]  # a copy out of the message: taken once
        if len(buf) + len(data) > limit:
            raise BadRequest(f"the streamed clip exceeds the server's --max-clip-bytes of {limit} bytes")
        ticket.hold(len(data))
        buf.extend(data)  # in place: the length callback above sees this buffer
        del data
    if first is None:
        raise BadRequest("the stream carried no chunks")
    return first, buf


def overrides_of(msg: pb.SamplingOverrides) -> dict[str, Any]:
    """The sampling fields a request set (unset ones keep the task's value)."""
    return {f: getattr(msg, f) for f in SAMPLING_OVERRIDE_FIELDS if msg.HasField(f)}


def deadline_of(context: grpc.aio.ServicerContext) -> Optional[float]:
    """The call's deadline as ``time.monotonic()`` seconds (None: the client set none)."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left
