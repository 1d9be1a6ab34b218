"""A live stream from chunks to answers: one decoder process, its windows computed for every task as they come.

:func:`classify_live` opens the stream's decoder (``server.decode.live_streams``), pumps the client's chunks
into it in a task of its own (each chunk handed over before the next is read: backpressure; an idle
client, a chunk over ``--max-live-chunk-bytes`` or a stream past ``--max-live-s`` of wall clock ends the
stream), and answers each window for each task in window order as soon as its forward is done. The
tasks share one decode, so their samplings (with the request's overrides) must resolve equal. One queue
slot per task is held for the stream's life, as ClassifyWindows holds one for its video. Leaving early
(a cancel, an error, drain) kills the decoder process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Mapping, Optional, Sequence

from server.decode.live_streams import LiveDecode, LiveDecoders
from server.decode.window_jobs import WindowSpan
from server.engine.admission import Slot, Ticket
from server.engine.pipeline import Classification, Pipeline
from server.errors import BadRequest, Draining, StreamIdle
from server.live_limits import LiveLimits


@dataclass(frozen=True)
class LiveRequest:
    """What a live stream's first chunk asks for."""

    tasks: Sequence[str]
    window_s: float
    stride_s: float
    top_k: int = 0
    overrides: Optional[Mapping[str, Any]] = None


@dataclass(frozen=True)
class LiveAnswer:
    """One window of a live stream: where it lies, when its last frame's chunk arrived, one answer per task."""

    span: WindowSpan
    received_ns: int
    results: tuple[Classification, ...]


async def classify_live(pipeline: Pipeline, decoders: LiveDecoders, ticket: Ticket, req: LiveRequest,
                        chunks: AsyncIterator[bytes]) -> AsyncGenerator[LiveAnswer, None]:
    """The stream's windows, in time order, each answered for every task (see the module docstring)."""
    limits = pipeline.limits
    limits.check_tasks(req.tasks)
    limits.check_windows(req.window_s, req.stride_s)
    k = pipeline.top_k(req.top_k)
    for task in req.tasks:
        await pipeline.registry.preload(task)
    taken = ticket.take_slots(req.tasks)
    slots = [s for s in taken if isinstance(s, Slot)]
    try:
        for s in taken:
            if not isinstance(s, Slot):
                raise s
        samplings = {pipeline.sampling(s.tv, req.overrides) for s in slots}
        if len(samplings) > 1:
            raise BadRequest("the tasks of one live stream share its decode, so their sampling must be the same; "
                             f"{', '.join(req.tasks)} sample differently: open one stream per sampling")
        for s in slots:
            await pipeline.registry.ensure_loaded(s.tv)
        window_limits = dataclasses.replace(limits.windows, max_duration_s=limits.live.max_s)
        decode = await decoders.start(samplings.pop(), limits.video, window_limits, req.window_s, req.stride_s)
        try:
            pump = asyncio.get_running_loop().create_task(_pump(chunks, decode, limits.live))
            try:
                async for w in _windows(decode, pump):
                    t0 = time.monotonic()
                    results = await asyncio.gather(*(pipeline.compute(s.tv, w.frames, w.decode_s, k, None, t0)
                                                     for s in slots))
                    yield LiveAnswer(w.span, w.received_ns, tuple(results))
            finally:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
        finally:
            decode.close()
    finally:
        for s in slots:
            s.release()


async def _windows(decode: LiveDecode, pump: asyncio.Task) -> AsyncGenerator[Any, None]:
    """The decoder's windows; an error of the pump (the client's side) wins over the decoder's end it caused."""
    windows = decode.windows()
    async with contextlib.aclosing(windows):
        while True:
            nxt = asyncio.ensure_future(anext(windows, None))
            done, _ = await asyncio.wait({nxt, pump}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done and pump.exception() is not None and nxt not in done:
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                raise pump.exception()  # type: ignore[misc]
            try:
                w = await nxt
            except Exception:
                if pump.done() and pump.exception() is not None:
                    raise pump.exception() from None  # type: ignore[misc]
                raise
            if w is None:
                if decode.cut:
                    raise Draining("the server is draining: the live stream was ended after its last decoded window; "
                                   "reconnect to another replica")
                return
            yield w


def chunk_too_big(live: LiveLimits, size: Optional[int] = None) -> BadRequest:
    """The error of a chunk over ``--max-live-chunk-bytes`` (``size``: its length, where the frontend knows it)."""
    of = f"of {size} bytes " if size is not None else ""
    return BadRequest(f"a live chunk {of}is over --max-live-chunk-bytes of {live.max_chunk_bytes}; send smaller chunks")


async def _pump(chunks: AsyncIterator[bytes], decode: LiveDecode, live: LiveLimits) -> None:
    """Every chunk of the client into the decoder, one at a time; then the end of the stream (also on drain)."""
    stop = time.monotonic() + live.max_s + live.idle_s
    drained = asyncio.ensure_future(decode.drained.wait())
    try:
        while True:
            left = stop - time.monotonic()
            nxt = asyncio.ensure_future(anext(chunks, None))
            done, _ = await asyncio.wait({nxt, drained}, timeout=min(live.idle_s, max(left, 0.0)),
                                         return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                if drained in done:
                    decode.cut = True
                    await decode.end()
                    return
                decode.close()
                if left <= live.idle_s:
                    raise BadRequest(f"the live stream lasted longer than --max-live-s of {live.max_s:g} s (plus "
                                     f"--live-idle-s) of wall clock; start a new one")
                raise StreamIdle(f"the live stream sent nothing for {live.idle_s:g} s (--live-idle-s); it was ended")
            chunk = nxt.result()
            if chunk is None:
                await decode.end()
                return
            if len(chunk) > live.max_chunk_bytes:
                decode.close()
                raise chunk_too_big(live, len(chunk))
            if chunk:
                await decode.feed(chunk)
    finally:
        drained.cancel()
