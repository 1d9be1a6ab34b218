"""A decoder process: PyAV and numpy, no torch. It decodes one clip (or one window job) per message and hands
the frames back as numpy in shared memory; the server process makes tensors of them.

Frames travel as uint8 crops, not normalised (``decode_clip_array(..., normalised=False)``): a quarter of the
float32 input's bytes in shared memory, in the server's copy and in its batch copies; the model normalises
them on its device (``stadapter.video.normalise_views``, in ``ModelRunner.stage``).

This module is what a spawned worker imports (its entry point, :func:`worker_main`), so what it imports, and what
the jobs it receives unpickle into (``stadapter.config``, ``stadapter.video``, ``server.decode.window_jobs``), must not
import torch: a worker then starts in a fraction of a second and holds a fraction of the memory.
"""

from __future__ import annotations

import os
import signal
import time
from multiprocessing.connection import Connection

import numpy as np

from server.decode.shm_blocks import write_block
from server.decode.window_jobs import run_window_job
from server.decode.worker_replies import failure_reply, send_reply
from stadapter.config import SamplingConfig
from stadapter.video import VideoLimits, decode_clip_array

# TEST ONLY: with this env var set to "crash-on-magic" and/or "hang-on-magic" (comma-separated, in the server's
# environment, read by the workers at start) a clip starting with the matching magic aborts / hangs the worker.
# Without the env var these bytes are an ordinary (invalid) clip: clients cannot trigger anything in production.
TEST_HOOK_ENV = "STADAPTER_DECODE_TEST_HOOK"
CRASH_MAGIC = b"STADAPTER-TEST-CRASH"
HANG_MAGIC = b"STADAPTER-TEST-HANG"


def decode_timed(clip: bytes | bytearray | memoryview, sampling: SamplingConfig,
                 limits: VideoLimits) -> tuple[np.ndarray, float]:
    """The clip's views (uint8 [V, T, 3, S, S], not normalised) and the time of the decode alone (not the wait
    for a free worker)."""
    t0 = time.perf_counter()
    views = decode_clip_array(clip, sampling, limits, normalised=False)
    return views, time.perf_counter() - t0


def worker_main(conn: Connection) -> None:
    """A decoder process: decode one clip per message until the pipe closes.

    Unpickling this function imported this module, hence ``stadapter.video``: "ready" means the first clip is fast.
    SIGINT is ignored: Ctrl-C in a terminal reaches the whole process group, and the server, which owns this
    process's lifetime, drains (letting a decode in progress finish) and then closes the pipe, which ends the loop.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    hooks = set(os.environ.get(TEST_HOOK_ENV, "").split(","))
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
            clip = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if "crash-on-magic" in hooks and clip.startswith(CRASH_MAGIC):
            os.abort()
        while "hang-on-magic" in hooks and clip.startswith(HANG_MAGIC):
            time.sleep(3600)
        if job[0] == "windows":
            try:
                run_window_job(conn, clip, *job[1:])
            except (EOFError, OSError):
                return
            continue
        sampling, limits, shm_name = job
        try:
            views, decode_s = decode_timed(clip, sampling, limits)
            arr = np.ascontiguousarray(views)
            write_block(shm_name, arr)
            reply: tuple = ("ok", arr.shape, arr.dtype.str, decode_s)
        except Exception as e:  # noqa: BLE001 - any failure on clip content is the clip's, not INTERNAL
            reply = failure_reply(e)
        send_reply(conn, reply)
