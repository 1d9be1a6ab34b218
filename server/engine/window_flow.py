"""How a windowed request's batches flow: several decoders' batches merged, computed as they come, answered in order.

A long video may be split between decoder workers (``server.decode.pool``: each decodes a run of its
windows), so batches arrive from several parts at once and out of time order. :func:`interleave`
merges the parts' streams as they come; :func:`in_window_order` computes each batch as soon as it
arrives, several at once (the batcher puts them together in its forwards), and gives out the
answers by window index, each as soon as every window before it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncGenerator, AsyncIterator, Awaitable, Callable, Optional, Sequence, TypeVar

from server.decode.window_jobs import WindowBatch, WindowSpan

T = TypeVar("T")


async def interleave(gens: Sequence[AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
    """The items of several async generators, each run in a task of its own, as they come; the first error
    ends it. Each task holds at most one item beyond what the shared queue (one slot per generator) holds;
    leaving early cancels the tasks, which closes their generators."""
    queue: asyncio.Queue[tuple[Optional[T], Optional[Exception]]] = asyncio.Queue(maxsize=len(gens))

    async def pump(gen: AsyncGenerator[T, None]) -> None:
        try:
            async with contextlib.aclosing(gen):
                async for item in gen:
                    await queue.put((item, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((None, e))
            return
        await queue.put((None, None))

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(g)) for g in gens]
    try:
        running = len(tasks)
        while running:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def in_window_order(batches: AsyncIterator[WindowBatch], compute: Callable[[WindowBatch], Awaitable[Sequence[T]]],
                          max_rows: int) -> AsyncGenerator[tuple[WindowSpan, T], None]:
    """``compute`` each batch as it arrives (its answers, one per span); (span, answer) pairs in window order.

    The next batch is asked for while earlier ones compute, until ``max_rows`` windows are being computed;
    an answer is given out once every window before it is (windows are numbered from 0; should a part of
    the video end early, the windows after the gap come last, still in order). The first error ends it and
    cancels what is still computing."""
    loop = asyncio.get_running_loop()
    computing: dict[asyncio.Task, tuple[WindowSpan, ...]] = {}
    ready: dict[int, tuple[WindowSpan, T]] = {}
    nxt = 0  # the next window index to give out
    pull: Optional[asyncio.Task] = loop.create_task(_next(batches))
    ended = False
    try:
        while pull is not None or computing:
            done, _ = await asyncio.wait({*computing, *([pull] if pull is not None else [])},
                                         return_when=asyncio.FIRST_COMPLETED)
            if pull is not None and pull in done:
                batch, pull = pull.result(), None
                if batch is None:
                    ended = True
                else:
                    computing[loop.create_task(_computed(compute, batch))] = batch.spans
            for t in done & computing.keys():
                spans = computing.pop(t)
                for span, answer in zip(spans, t.result(), strict=True):
                    ready[span.index] = (span, answer)
            while nxt in ready:
                yield ready.pop(nxt)
                nxt += 1
            if pull is None and not ended and sum(map(len, computing.values())) < max_rows:
                pull = loop.create_task(_next(batches))
        for k in sorted(ready):
            yield ready[k]
    finally:
        for t in [*computing, *([pull] if pull is not None else [])]:
            t.cancel()
        await asyncio.gather(*computing, *([pull] if pull is not None else []), return_exceptions=True)


async def _next(batches: AsyncIterator[WindowBatch]) -> Optional[WindowBatch]:
    return await anext(batches, None)


async def _computed(compute: Callable[[WindowBatch], Awaitable[Sequence[T]]], batch: WindowBatch) -> Sequence[T]:
    answers = await compute(batch)
    if len(answers) != len(batch.spans):
        raise RuntimeError(f"{len(answers)} answers for a batch of {len(batch.spans)} windows")
    return answers
