"""Small pieces every ``stadapter.v1`` servicer shares: a request's deadline, its sampling overrides, idle-bounded
client streams (used by ``server.service`` and ``server.window_service``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

import grpc

from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.wire import SAMPLING_OVERRIDE_FIELDS

from .admission import Ticket
from .errors import BadRequest, StreamIdle
from .limits import ServerLimits

T = TypeVar("T")


async def idle_bounded(iterator: AsyncIterator[T], idle_s: float, held: Callable[[], int]) -> AsyncIterator[T]:
    """``iterator``'s messages; a gap of more than ``idle_s`` seconds ends the call with :class:`StreamIdle`
    (``held()``: the bytes received so far, for the message; the caller's ticket frees them)."""
    it = iterator.__aiter__()
    while True:
        try:
            item = await asyncio.wait_for(it.__anext__(), idle_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise StreamIdle(f"the stream sent nothing for {idle_s:g} s (--stream-idle-timeout-s) after "
                             f"{held()} bytes; it was ended and its bytes freed") from None
        yield item


async def gather_clip(chunks: AsyncIterator[T], ticket: Ticket, limits: ServerLimits,
                      on_first: Callable[[T], object]) -> tuple[T, bytearray]:
    """A client stream's clip: chunks appended to one buffer as they arrive (no list of chunks, no joined copy),
    its length held on ``ticket`` against the clip-byte budget; returns the first chunk (its header fields;
    ``on_first`` sees it as it arrives) and the buffer, which is what the decoder gets."""
    first: Optional[T] = None
    buf = bytearray()
    ticket.own(buf)
    limit = limits.max_clip_bytes
    async for chunk in idle_bounded(chunks, limits.stream_idle_timeout_s, lambda: len(buf)):
        if first is None:
            first = chunk
            on_first(chunk)
        data = chunk.data  # type: ignore[attr-defined]  # a copy out of the message: taken once
        if len(buf) + len(data) > limit:
            raise BadRequest(f"the streamed clip exceeds the server's --max-clip-bytes of {limit} bytes")
        ticket.hold(len(data))
        buf += data
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
