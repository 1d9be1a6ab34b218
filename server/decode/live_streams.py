"""Live streams' decoder processes: one per stream, at most ``max_streams`` at once (``--max-live-streams``).

A live stream may last hours, so it never takes one of the clip pool's workers (``server.decode.pool``);
it gets a process of its own (:mod:`server.decode.live_worker`, the protocol), started when the stream
opens and killed when it ends, however it ends (its end, an error, a cancel, drain). The processes are forked
from a ``multiprocessing`` fork server that imported the worker's modules (PyAV, numpy) once
(``context="forkserver"``, :meth:`LiveDecoders.warm` at the server's start): a fresh interpreter per stream
("spawn") would import them again each time, a cost paid at every stream's start (in CPU and in the wait for
its first window) that a burst of cameras connecting at once pays many times over. The fork server is itself a
fresh process (no torch, no gRPC threads, none of the server's sockets), so what a decoder starts from is what
a spawned one would have. The parent's side
of one stream is a :class:`LiveDecode`: :meth:`LiveDecode.feed` hands a chunk to the process (in a thread
of the stream's own, as the pipe blocks while the decoder is behind: the caller awaits it before reading
its client on, which is the backpressure), :meth:`LiveDecode.windows` gives each window's frames as they
decode, with the receive time of the chunk that completed the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncGenerator

from torch import Tensor

from server.decode.live_worker import live_worker_main
from server.decode.pool import Worker, raise_failure
from server.decode.shm_blocks import read_block, unlink_block
from server.decode.window_jobs import WindowSpan
from server.errors import DecoderCrashed, Draining, QueueFull
from stadapter.config import SamplingConfig
from stadapter.video import VideoLimits, WindowLimits

START_TIMEOUT_S = 60.0  # a decoder process that has not imported PyAV by then failed to start


class LiveFull(QueueFull):
    """Every live stream slot is taken (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class LiveWindow:
    span: WindowSpan
    frames: Tensor  # uint8 [V, T, 3, S, S], not normalised
    received_ns: int  # unix ns: when the chunk that completed the window's last frame arrived
    decode_s: float  # decoding time since the window before


class LiveDecoders:
    """The live streams' decoder processes (see the module docstring). ``refused``: called with a reason
    (``full``, ``draining``, ``disabled``) for each stream refused here."""

    def __init__(self, max_streams: int, context: str = "forkserver", refused: Any = None) -> None:
        self.max_streams = max_streams
        self.ctx: Any = multiprocessing.get_context(context)
        if context == "forkserver":
            self.ctx.set_forkserver_preload([live_worker_main.__module__])
        self.open = 0
        self.closed = False
        self.refused = refused or (lambda reason: None)
        self.shm_prefix = f"stadapter-live-{os.getpid()}-{id(self):x}-"
        self._names = itertools.count()
        self._streams: set[LiveDecode] = set()

    def warm(self) -> None:
        """Start the fork server now (it imports the worker's modules), not at the first stream; a no-op once it
        runs. It starts with SIGINT ignored, which it keeps: a Ctrl-C to the process group while it imports is
        the server's to handle (it drains), not a ``KeyboardInterrupt`` traceback of the fork server."""
        if self.max_streams == 0 or self.ctx.get_start_method() != "forkserver":
            return
        from multiprocessing import forkserver

        main = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            forkserver.ensure_running()
        finally:
            if before is not None:
                signal.signal(signal.SIGINT, before)

    async def start(self, sampling: SamplingConfig, limits: VideoLimits, window_limits: WindowLimits,
                    window_s: float, stride_s: float) -> "LiveDecode":
        """A decoder process for a new stream, ready for its chunks; LiveFull when ``max_streams`` are open."""
        if self.closed:
            self.refused("draining")
            raise Draining("server is shutting down; no new live streams")
        if self.max_streams == 0:
            self.refused("disabled")
            raise LiveFull("live streams are turned off on this server (--max-live-streams 0)")
        if self.open >= self.max_streams:
            self.refused("full")
            raise LiveFull(f"the server already decodes {self.open} live streams, its --max-live-streams; "
                           "retry later or on another replica")
        self.warm()
        self.open += 1  # taken before the first await: two openers never both get the last slot
        stream = LiveDecode(self, f"{self.shm_prefix}{next(self._names)}-")
        self._streams.add(stream)
        try:
            await stream.spawn((sampling, limits, window_limits, window_s, stride_s, stream.prefix))
        except BaseException:
            stream.close()
            raise
        return stream

    def _ended(self, stream: "LiveDecode") -> None:
        if stream in self._streams:
            self._streams.discard(stream)
            self.open -= 1

    def drain(self) -> None:
        """Refuse new streams; every open one stops reading its client, answers what its decoder still gives, and
        ends UNAVAILABLE (``server.engine.live_flow``)."""
        self.closed = True
        for s in list(self._streams):
            s.drained.set()

    def close(self) -> None:
        """Kill every stream's process (drain's end, shutdown): their requests fail at once."""
        self.closed = True
        for s in list(self._streams):
            s.close()


class LiveDecode:
    """One stream's decoder process, seen from the server (see the module docstring)."""

    def __init__(self, owner: LiveDecoders, prefix: str) -> None:
        self.owner, self.prefix = owner, prefix
        self.worker: Worker | None = None
        self.data: Any = None  # the parent's end of the data pipe
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-feed")
        self.sent = 0  # chunks handed over
        self.received: dict[int, int] = {}  # chunk count -> unix ns when that chunk arrived
        self.seq = 0  # the next window's block
        self.closed = False
        self.drained = asyncio.Event()  # set by drain: read no more chunks, end the stream
        self.cut = False  # the stream's input was ended by drain, not by its client

    async def spawn(self, job: tuple) -> None:
        ctx = self.owner.ctx
        control, child_control = ctx.Pipe()
        data_in, data_out = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=live_worker_main, args=(child_control, data_in), name="stadapter-live",
                           daemon=True)
        proc.start()
        child_control.close()
        data_in.close()
        self.worker, self.data = Worker(proc, control), data_out
        msg = await asyncio.wait_for(self.worker.expect(asyncio.get_running_loop()), START_TIMEOUT_S)
        if msg != ("ready",):
            raise DecoderCrashed(f"the live decoder process failed to start (exit code {proc.exitcode})")
        self.worker.conn.send(job)

    @property
    def pid(self) -> int:
        assert self.worker is not None
        return int(self.worker.proc.pid)

    async def feed(self, chunk: bytes) -> None:
        """Hand ``chunk`` (just received) to the decoder; returns once the pipe took it (the decoder may be behind:
        then this waits, and the caller reads no more of its client). A dead process is seen by :meth:`windows`."""
        self.sent += 1
        self.received[self.sent] = time.time_ns()
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().run_in_executor(self.sender, self.data.send_bytes, chunk)

    async def end(self) -> None:
        """The stream's end: the decoder drains and gives its last windows."""
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().run_in_executor(self.sender, self.data.send_bytes, b"")

    async def windows(self) -> AsyncGenerator[LiveWindow, None]:
        """Each window as its last frame decodes; ends at the stream's end, or raises the decoder's error."""
        assert self.worker is not None
        loop = asyncio.get_running_loop()
        while True:
            msg = await self.worker.expect(loop)
            if msg is None:
                if self.owner.closed:
                    raise Draining("server is shutting down; the live stream was stopped")
                raise DecoderCrashed(f"the live stream's decoder crashed (exit code {self.worker.proc.exitcode}); "
                                     "the stream is probably corrupt or hostile")
            if msg[0] != "window":
                if msg[0] == "done":
                    return
                raise_failure(msg)
            _, seq, span, shape, dtype, chunks, decode_s = msg
            frames = read_block(f"{self.prefix}{seq}", shape, dtype)
            self.seq = seq + 1
            received = self.received.get(chunks, time.time_ns())
            for n in [n for n in self.received if n < chunks]:
                del self.received[n]
            with contextlib.suppress(OSError):
                self.worker.conn.send(("next",))
            yield LiveWindow(span, frames, received, decode_s)

    def close(self) -> None:
        """Kill the process (whatever it does), unlink a block it may have been writing, free the stream's slot."""
        if self.closed:
            return
        self.closed = True
        if self.worker is not None:
            self.worker.kill()
        if self.data is not None:
            with contextlib.suppress(OSError):
                self.data.close()
        self.sender.shutdown(wait=False, cancel_futures=True)
        unlink_block(f"{self.prefix}{self.seq}")
        self.owner._ended(self)
