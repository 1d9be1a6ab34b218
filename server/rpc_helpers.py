"""Small pieces every ``stadapter.v1`` servicer shares: a request's deadline, its sampling overrides, idle-bounded
client streams (used by ``server.service`` and ``server.window_service``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

import grpc

from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.wire import SAMPLING_OVERRIDE_FIELDS

from .errors import StreamIdle

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


def overrides_of(msg: pb.SamplingOverrides) -> dict[str, Any]:
    """The sampling fields a request set (unset ones keep the task's value)."""
    return {f: getattr(msg, f) for f in SAMPLING_OVERRIDE_FIELDS if msg.HasField(f)}


def deadline_of(context: grpc.aio.ServicerContext) -> Optional[float]:
    """The call's deadline as ``time.monotonic()`` seconds (None: the client set none)."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left
