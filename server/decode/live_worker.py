"""A live stream's decoder process: PyAV and numpy, no torch; one stream, then it exits.

Each live stream gets a process of its own (``server.decode.live_streams``), not one of the clip pool's
workers: a stream lasts as long as its camera does, and would starve the clips. Two pipes:

* ``data`` (parent -> worker): the stream's chunks as they come (``send_bytes``), ``b""`` at its end. The
  worker reads them through :class:`stadapter.video.live_input.ChunkReader`, only as fast as it decodes: a
  parent whose send blocks stops reading its client (backpressure);
* ``control`` (both ways): worker -> parent ``("ready",)`` once imported; parent -> worker
  ``(sampling, limits, window_limits, window_s, stride_s, prefix)``; then for each window worker -> parent
  ``("window", seq, span, shape, dtype, chunks, decode_s)`` with the window's uint8 frames in block
  ``prefix + seq`` (``chunks``: the chunks read when its last frame decoded) and it waits for ``("next",)``
  (any other word stops it); at the end ``("done", decode_s, decoded)``, or ``("error", exc)`` / ``("oom", msg)``.

Frames cross shared memory as uint8 (``server.decode.shm_blocks``), as in the pool's workers.
"""

from __future__ import annotations

import signal
from multiprocessing.connection import Connection

import numpy as np

from server.decode.shm_blocks import write_block
from server.decode.window_jobs import WindowSpan
from server.decode.worker_replies import failure_reply, send_reply
from stadapter.video import DecodeStats
from stadapter.video.live import decode_live_windows
from stadapter.video.live_input import ChunkReader


def live_worker_main(control: Connection, data: Connection) -> None:
    """Decode one live stream (see the module docstring). SIGINT is ignored: the server owns this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control.send(("ready",))
    try:
        sampling, limits, window_limits, window_s, stride_s, prefix = control.recv()
    except (EOFError, OSError):
        return

    def next_chunk() -> bytes:
        try:
            return data.recv_bytes()
        except (EOFError, OSError):
            return b""  # the parent closed the pipe: the end of the stream

    reader = ChunkReader(next_chunk)
    stats = DecodeStats()
    windows = decode_live_windows(reader, sampling, window_s, stride_s, limits, window_limits, stats)
    seq, counted = 0, 0.0
    try:
        for w in windows:
            arr = np.ascontiguousarray(w.frames)
            write_block(f"{prefix}{seq}", arr)
            span = WindowSpan(w.index, w.start_frame, w.end_frame, w.start_s, w.end_s)
            control.send(("window", seq, span, arr.shape, arr.dtype.str, reader.chunks, stats.decode_s - counted))
            counted = stats.decode_s
            seq += 1
            del arr, w
            if control.recv() != ("next",):
                return
        reply: tuple = ("done", stats.decode_s, stats.counts)
    except (EOFError, OSError):
        return
    except Exception as e:  # noqa: BLE001 - any failure on the stream's content is the stream's, not INTERNAL
        reply = failure_reply(e)
    finally:
        windows.close()
    try:
        send_reply(control, reply)
    except (EOFError, OSError):
        return
