"""Clip decoding off the event loop: in sandboxed worker processes (default) or in threads.

A hostile clip may crash FFmpeg (segfault, abort) or make it loop forever. In a
thread that takes the whole server down or stalls a worker for good; in a child
process it costs only that request: the worker is killed (SIGKILL) and replaced.

Protocol with one worker (a ``multiprocessing`` pipe, "spawn" context: never fork,
the server runs gRPC threads):

* worker -> parent ``("ready",)`` once ``stadapter.video`` is imported;
* parent -> worker ``(sampling, limits, shm_name)`` then the clip as raw bytes;
* worker -> parent ``("ok", shape, dtype, decode_s)`` with the frames (uint8 crops, not normalised: the
  model normalises them on its device) written to a new ``SharedMemory`` block named ``shm_name``
  (frames are never pickled), or
  ``("error", exc)`` / ``("oom", message)``.

The parent picks the block's name, so it unlinks it on every path (worker killed
half-way included); a worker that dies shows up as EOF on the pipe.

Window mode (``windows``: a long clip decoded once, front to back; ``server.decode.window_jobs``):

* parent -> worker ``("windows", sampling, limits, job, prefix)`` then the clip;
* worker -> parent ``("batch", seq, spans, shape, dtype, decode_s, decoded)`` with the batch in block
  ``prefix + seq``; the parent copies it out, unlinks it and answers ``("next",)`` at once (the
  worker decodes the next batch while the model computes this one) or ``("stop",)``
  (answered ``("stopped",)``);
* worker -> parent ``("done", decode_s, decoded)``, or ``("error", exc)`` / ``("oom", message)``
  (``decoded``: the packets, frames and pixels read so far; a split video's parts are held to one
  decode's limits by their sum, ``window_jobs.SplitBudget``).

A batch must come within ``timeout_s`` of the last (a hung decode is killed as in one-clip
mode); a caller that goes away stops the job in the background and the worker is reused. A long
clip may be split between up to ``window_workers`` of the workers free when it starts: each gets
the same clip and a job for its part (``WindowJob.parts``), and their batches are merged as they
come (``server.engine.window_flow``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import itertools
import logging
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, AsyncGenerator, NoReturn, Optional, Protocol

from torch import Tensor

from server.decode.shm_blocks import read_block, unlink_block
from server.decode.window_jobs import SplitBudget, WindowBatch, WindowJob, window_batches
from server.decode.worker import CRASH_MAGIC, HANG_MAGIC, TEST_HOOK_ENV, decode_timed, worker_main
from server.engine.window_flow import interleave
from server.errors import DeadlineExpired, DecoderCrashed, DecoderOutOfMemory, DecodeTimeout, Draining
from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits, as_tensor

__all__ = ["CRASH_MAGIC", "HANG_MAGIC", "TEST_HOOK_ENV", "Decoder", "ProcessDecodePool", "ThreadDecoder"]

log = logging.getLogger("server")


class Decoder(Protocol):
    """What the pipeline needs from a decoding backend: both backends give uint8 views [V, T, 3, S, S], not
    normalised (``ModelRunner.stage`` normalises them on the model's device)."""

    async def decode(self, clip: bytes | bytearray | memoryview, sampling: SamplingConfig, limits: VideoLimits, timeout_s: float,
                     deadline: Optional[float] = None) -> tuple[Tensor, float]: ...

    def windows(self, clip: bytes | bytearray | memoryview, sampling: SamplingConfig, limits: VideoLimits, job: WindowJob,
                timeout_s: float, deadline: Optional[float] = None) -> AsyncGenerator[WindowBatch, None]:
        """The clip's windows in batches, in time order; closing the iterator early stops the decode."""
        ...

    def close(self) -> None: ...


class ThreadDecoder:
    """The in-process backend (``--decode-backend thread``): no sandbox, no timeouts; for benches and debugging."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

    async def decode(self, clip: bytes | bytearray | memoryview, sampling: SamplingConfig, limits: VideoLimits, timeout_s: float,
                     deadline: Optional[float] = None) -> tuple[Tensor, float]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, _decode_timed, clip, sampling, limits)

    async def windows(self, clip: bytes | bytearray | memoryview, sampling: SamplingConfig, limits: VideoLimits, job: WindowJob,
                      timeout_s: float, deadline: Optional[float] = None) -> AsyncGenerator[WindowBatch, None]:
        batches = window_batches(clip, sampling, limits, job)
        step = None
        try:
            while True:
                step = self.pool.submit(next, batches, None)
                batch = await asyncio.wrap_future(step)
                if batch is None:
                    return
                yield dataclasses.replace(batch, frames=as_tensor(batch.frames))
        finally:  # close the generator on a pool thread once no step of it runs (it holds the open clip)
            if step is None:
                batches.close()
            else:
                step.add_done_callback(lambda _: batches.close())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # a stuck thread cannot be stopped; do not wait for it


def _decode_timed(clip: bytes | bytearray | memoryview, sampling: SamplingConfig, limits: VideoLimits) -> tuple[Tensor, float]:
    """The thread backend's decode: as a worker's (uint8, not normalised), then a tensor (sharing the array's memory)."""
    views, decode_s = decode_timed(clip, sampling, limits)
    return as_tensor(views), decode_s


@dataclass(eq=False)
class Worker:
    proc: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    reply: Optional[asyncio.Future] = None  # the next message, once asked for

    def expect(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        """A future for the worker's next message (None on EOF: the worker died)."""
        fut = loop.create_future()
        fd = self.conn.fileno()

        def readable() -> None:
            loop.remove_reader(fd)
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = None
            except Exception:  # noqa: BLE001 - a reply that does not unpickle
                msg = ("error", VideoError("the decoder failed on this clip"))
            if not fut.done():
                fut.set_result(msg)

        loop.add_reader(fd, readable)
        self.reply = fut
        return fut

    def kill(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, ValueError):  # no loop, or the pipe already closed
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(1.0)  # SIGKILL cannot be ignored: this reaps it at once
        self.conn.close()


class ProcessDecodePool:
    """``workers`` decoder processes; at most that many decodes at once (``await decode(...)``).

    Call ``await start()`` in the event loop before use; ``close()`` kills every worker at once.
    """

    def __init__(self, workers: int, context: str = "spawn", window_workers: int = 1):
        self.workers = workers
        self.window_workers = max(1, window_workers)  # most workers one windowed decode splits over
        self.ctx: Any = multiprocessing.get_context(context)  # SpawnContext etc.: typeshed's BaseContext lacks Process
        self.shm_prefix = f"stadapter-dec-{os.getpid()}-{id(self):x}-"
        self._names = itertools.count()
        self._free: asyncio.Queue[Worker] = asyncio.Queue()
        self._all: set[Worker] = set()
        self._tasks: set[asyncio.Task] = set()  # background work (startups, waits after a cancel)
        self.closed = False

    async def start(self, timeout_s: float = 120.0) -> None:
        """Start all workers; return once each has imported the decoder."""
        ok = await asyncio.wait_for(asyncio.gather(*(self._spawn() for _ in range(self.workers))), timeout_s)
        if not all(ok):
            self.close()
            raise RuntimeError("decoder worker processes failed to start; see the log")

    async def _spawn(self) -> bool:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker_main, args=(child,), name="stadapter-decode", daemon=True)
        proc.start()
        child.close()  # only the worker holds it now: its death is EOF here
        w = Worker(proc, parent)
        self._all.add(w)
        msg = await w.expect(asyncio.get_running_loop())
        if msg != ("ready",) or self.closed:
            self._drop(w)
            if not self.closed:
                log.error("a decoder worker exited before ready (exit code %s)", proc.exitcode)
            return False
        self._free.put_nowait(w)
        return True

    def _drop(self, w: Worker) -> None:
        w.kill()
        self._all.discard(w)

    def _replace(self, w: Worker, shm_name: Optional[str] = None) -> None:
        """Kill ``w`` (then unlink the block it may have been writing); a fresh worker joins the queue once ready."""
        self._drop(w)
        if shm_name is not None:
            unlink_block(shm_name)
        if not self.closed:
            self._background(self._respawn())

    async def _respawn(self) -> None:
        while not self.closed and not await self._spawn():
            await asyncio.sleep(1.0)  # a worker that cannot start: do not spin

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def decode(self, clip: bytes | bytearray | memoryview, sampling: SamplingConfig, limits: VideoLimits, timeout_s: float,
                     deadline: Optional[float] = None) -> tuple[Tensor, float]:
        """Decode ``clip`` in a worker: ``(views [V,T,3,S,S] uint8, not normalised, decode seconds)``.

        ``timeout_s`` bounds the decode itself (from when a worker takes the clip); ``deadline``
        (``time.monotonic()``) bounds it too, and past it the error is DEADLINE_EXCEEDED.
        """
        if self.closed:
            raise Draining("server is shutting down; the decoders are stopped")
        w = await self._free.get()
        budget, by_deadline = timeout_s, False
        if deadline is not None and deadline - time.monotonic() < timeout_s:
            budget, by_deadline = deadline - time.monotonic(), True
        if budget <= 0:
            self._free.put_nowait(w)
            raise DeadlineExpired("deadline passed before decode; dropped")
        name = f"{self.shm_prefix}{next(self._names)}"
        reply = w.expect(asyncio.get_running_loop())
        try:
            # the worker is idle and blocked on recv, so this costs a copy through the pipe
            w.conn.send((sampling, limits, name))
            w.conn.send_bytes(clip)
        except OSError:
            pass  # the worker died while idle: the reply future sees EOF
        try:
            done, _ = await asyncio.wait({reply}, timeout=budget)
        except asyncio.CancelledError:  # the caller gave up: let the decode finish, then reuse the worker
            self._background(self._finish_later(w, reply, name, budget))
            raise
        if not done:
            self._replace(w, name)
            if by_deadline:
                raise DeadlineExpired(f"deadline passed during decode (after {budget:.2f} s); dropped")
            raise DecodeTimeout(f"decoding took longer than {timeout_s:g} s; the clip was dropped")
        return self._result(w, reply.result(), name)

    async def _finish_later(self, w: Worker, reply: asyncio.Future, name: str, budget: float) -> None:
        done, _ = await asyncio.wait({reply}, timeout=budget)
        if not done:
            self._replace(w, name)
            return
        with contextlib.suppress(Exception):  # nobody is waiting for this answer any more
            self._result(w, reply.result(), name)

    async def windows(self, clip: bytes | bytearray | memoryview, sampling: SamplingConfig, limits: VideoLimits, job: WindowJob,
                      timeout_s: float, deadline: Optional[float] = None) -> AsyncGenerator[WindowBatch, None]:
        """The clip's windows in batches (see the module docstring): from one worker, or split between as many as
        are free when it starts, up to ``window_workers`` (each decodes a run of the windows, after one seek;
        batches of different parts interleave, each in time order). ``timeout_s`` bounds the wait for each batch
        of a part, ``deadline`` all of them. Leaving early (cancel, close) stops the jobs in the background."""
        if self.closed:
            raise Draining("server is shutting down; the decoders are stopped")
        taken = [await self._free.get()]
        while len(taken) < self.window_workers and not self._free.empty():
            taken.append(self._free.get_nowait())
        idle = set(taken)  # a part that never starts (the call left first) gives its worker back below
        tally = SplitBudget(limits, job, len(taken)) if len(taken) > 1 else None
        parts = [self._window_part(w, idle, clip, sampling, limits, part, timeout_s, deadline, tally)
                 for w, part in zip(taken, job.parts(len(taken)), strict=True)]
        try:
            async with contextlib.aclosing(parts[0] if len(parts) == 1 else interleave(parts)) as batches:
                async for batch in batches:
                    yield batch
        finally:
            for w in idle:
                self._give_back(w)

    async def _window_part(self, w: Worker, idle: set[Worker], clip: bytes | bytearray | memoryview,
                           sampling: SamplingConfig, limits: VideoLimits, job: WindowJob, timeout_s: float,
                           deadline: Optional[float], tally: Optional[SplitBudget]) -> AsyncGenerator[WindowBatch, None]:
        """One window job on worker ``w``, taken from the free queue by the caller (and out of ``idle`` once this
        starts: from then on this generator frees, reuses or replaces it); ``tally``: the parts' counts, when the
        video is split."""
        idle.discard(w)
        loop = asyncio.get_running_loop()
        prefix = f"{self.shm_prefix}{next(self._names)}-"
        reply = w.expect(loop)
        try:
            w.conn.send(("windows", sampling, limits, job, prefix))
            w.conn.send_bytes(clip)
        except OSError:
            pass  # the worker died while idle: the reply future sees EOF
        seq, running = 0, True
        try:
            while True:
                budget, by_deadline = timeout_s, False
                if deadline is not None and deadline - time.monotonic() < timeout_s:
                    budget, by_deadline = deadline - time.monotonic(), True
                done, _ = await asyncio.wait({reply}, timeout=max(budget, 0.0))
                if not done:
                    running = False
                    self._replace(w, f"{prefix}{seq}")
                    if by_deadline:
                        raise DeadlineExpired(f"deadline passed during the windowed decode (after {seq} batches)")
                    raise DecodeTimeout(f"no window decoded for {timeout_s:g} s; the clip was dropped")
                msg = reply.result()
                if msg is None or msg[0] != "batch":
                    running = False
                    self._end_job(w, msg, f"{prefix}{seq}")
                    if tally is not None and msg is not None and msg[0] == "done":
                        tally.update(job.part.index, msg[2])  # the last frames after the last window count too
                    return
                _, _, spans, shape, dtype, decode_s, decoded = msg
                batch = WindowBatch(tuple(spans), read_block(f"{prefix}{seq}", shape, dtype), decode_s, decoded)
                if tally is not None:
                    tally.update(job.part.index, decoded)  # over the limits: the job is stopped (finally)
                seq += 1
                reply = w.expect(loop)
                try:
                    w.conn.send(("next",))
                except OSError:
                    pass
                yield batch
        finally:
            if running:
                self._background(self._stop_job(w, reply, prefix, seq, timeout_s))

    async def _stop_job(self, w: Worker, reply: asyncio.Future, prefix: str, seq: int, timeout_s: float) -> None:
        """Stop a window job nobody reads any more: let the batch in progress finish, drop it, say stop."""
        while True:
            done, _ = await asyncio.wait({reply}, timeout=timeout_s)
            if not done:
                self._replace(w, f"{prefix}{seq}")
                return
            msg = reply.result()
            unlink_block(f"{prefix}{seq}")
            if msg is None or msg[0] != "batch":
                with contextlib.suppress(Exception):  # nobody is waiting for this answer any more
                    self._end_job(w, msg, f"{prefix}{seq}")
                return
            seq += 1
            reply = w.expect(asyncio.get_running_loop())
            try:
                w.conn.send(("stop",))
            except OSError:
                pass

    def _end_job(self, w: Worker, msg: Optional[tuple], name: str) -> None:
        """The last message of a window job: the worker freed (or replaced); its error raised."""
        unlink_block(name)
        reply = self._settle(w, msg)
        if reply[0] not in ("done", "stopped"):
            raise_failure(reply)

    def _result(self, w: Worker, msg: Optional[tuple], name: str) -> tuple[Tensor, float]:
        """Turn the worker's reply into the answer; the shm block is gone and ``w`` freed or replaced after."""
        try:
            reply = self._settle(w, msg)
            if reply[0] == "ok":
                _, shape, dtype, decode_s = reply
                return read_block(name, shape, dtype), decode_s
            raise_failure(reply)
        finally:
            unlink_block(name)

    def _settle(self, w: Worker, msg: Optional[tuple]) -> tuple:
        """After a worker's last reply (None: it died or was stopped): free, drop or replace it; the reply."""
        if msg is None and self.closed:
            raise Draining("server is shutting down; the decode was stopped")
        if msg is None:
            self._replace(w)
            raise DecoderCrashed(f"the decoder crashed on this clip (worker exit code {w.proc.exitcode}); "
                                 "it is probably corrupt or hostile")
        self._give_back(w)
        return msg

    def _give_back(self, w: Worker) -> None:
        """A worker done with its job: back to the free queue, or dropped when the pool is closing."""
        if self.closed:
            self._drop(w)
        else:
            self._free.put_nowait(w)

    def close(self) -> None:
        """Kill every worker at once (SIGKILL first, then reap): never waits on a stuck decode."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for w in list(self._all):
            w.proc.kill()  # all at once, before any reaping
        for w in list(self._all):
            self._drop(w)
            if w.reply is not None and not w.reply.done():
                w.reply.set_result(None)  # a request still waiting on it fails at once


def raise_failure(reply: tuple) -> NoReturn:
    """A worker's failure reply (see :mod:`server.decode.worker_replies`) as the exception the services map: a copy, as
    frames on its traceback hold the reply (raising its own object would make a cycle keeping their clip alive)."""
    if reply[0] == "oom":
        raise DecoderOutOfMemory(f"the decoder ran out of memory on this clip ({reply[1]}); retry later")
    exc = reply[1]
    raise copy.copy(exc) if isinstance(exc, VideoError) else VideoError(str(exc))
