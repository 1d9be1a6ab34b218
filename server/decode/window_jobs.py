"""Window mode in the decoders: a long clip decoded once, front to back, its windows handed over in batches.

:func:`window_batches` groups :func:`stadapter.video.decode_windows`' windows into batches of
``WindowJob.per_batch`` (one forward's rows), the first ones smaller (``first_batch``, a third
of a forward, tripling up to ``per_batch``) so the model computes the first windows while the decoder goes on with the
next instead of waiting for a whole forward's worth; a batch is handed over early once its first
window has waited ``flush_s``, so results stream while a slow video decodes. The thread backend
iterates it directly; a worker process runs :func:`run_window_job`, which writes each batch to
a shared-memory block and waits for the parent's word before decoding on (see
``server.decode.pool`` for the protocol): at most one batch is in shared memory and one in the
parent, whatever the video's length.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Generator, Iterator, Optional

import numpy as np

from server.decode.shm_blocks import write_block
from server.decode.worker_replies import failure_reply, send_reply
from stadapter.config import SamplingConfig
from stadapter.video import DecodeStats, VideoLimits, Window, WindowLimits, WindowPart, decode_windows
from stadapter.video.limits import Budget

FLUSH_S = 0.1  # longest a decoded window waits for the rest of its batch


@dataclass(frozen=True)
class WindowJob:
    """What a windowed decode needs besides the clip and the sampling."""

    window_s: float
    stride_s: float
    per_batch: int  # windows handed over together (their rows fit one forward)
    limits: WindowLimits = field(default_factory=WindowLimits)
    flush_s: float = FLUSH_S
    first_batch: Optional[int] = None  # windows in the first batch (x3 per batch up to per_batch); None: per_batch // 3
    part: WindowPart = field(default_factory=WindowPart)  # this decoder's share when several decode the video

    def __post_init__(self) -> None:
        for name, v in (("per_batch", self.per_batch), ("first_batch", 1 if self.first_batch is None else self.first_batch)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"WindowJob.{name} must be a positive int, got {v!r}")

    def batch_sizes(self) -> Iterator[int]:
        """Windows per batch, batch after batch: small first, so the model starts while the decoder goes on."""
        n = self.first_batch if self.first_batch is not None else max(1, self.per_batch // 3)
        while True:
            yield min(n, self.per_batch)
            n *= 3  # few forwards: each has a cost of its own

    def parts(self, n: int) -> list["WindowJob"]:
        """The job split for ``n`` decoders: part j of n each, batches of ``per_batch / n`` windows (the batcher
        puts the parts' batches together in its forwards), so the rows held at once stay as for one decoder."""
        per = max(1, -(-self.per_batch // n))
        first = None if self.first_batch is None else max(1, -(-self.first_batch // n))
        return [dataclasses.replace(self, per_batch=per, first_batch=first, part=WindowPart(j, n)) for j in range(n)]


@dataclass(frozen=True)
class WindowSpan:
    index: int
    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float


@dataclass(frozen=True)
class WindowBatch:
    spans: tuple[WindowSpan, ...]
    frames: Any  # uint8 [N, V, T, 3, S, S], not normalised, one entry per span: numpy as decoded, a torch.Tensor in the server
    decode_s: float  # decoding time of this batch alone
    decoded: tuple[int, int, int] = (0, 0, 0)  # (packets, frames, pixels) the decode has read so far, this batch's too


class SplitBudget:
    """One video's decode limits over the parts that decode it at once (``WindowJob.parts``): each part's decoder
    counts against a budget of its own, so their latest counts are summed here and held to the limits of one
    decode (a video over ``max_frames_decoded`` is refused whether it is split or not)."""

    def __init__(self, limits: VideoLimits, job: WindowJob, parts: int) -> None:
        self.budget = Budget(job.limits.video_limits(limits))
        self.counts = [(0, 0, 0)] * parts

    def update(self, part: int, counts: tuple[int, int, int]) -> None:
        """Part ``part`` has read ``counts`` (packets, frames, pixels) so far; VideoError if the sum is over."""
        self.counts[part] = counts
        packets, frames, pixels = (sum(c) for c in zip(*self.counts, strict=True))
        self.budget.check_totals(packets, frames, pixels)


def window_batches(clip: bytes | bytearray | memoryview, sampling: SamplingConfig, limits: VideoLimits, job: WindowJob,
                   stats: Optional[DecodeStats] = None) -> Generator[WindowBatch, None, None]:
    stats = stats if stats is not None else DecodeStats()
    batch: list[Window] = []
    first_at = 0.0
    counted = 0.0
    sizes = job.batch_sizes()
    size = next(sizes)
    for w in decode_windows(clip, sampling, job.window_s, job.stride_s, limits, job.limits, stats, job.part,
                            as_array=True, normalised=False):
        if not batch:
            first_at = time.monotonic()
        batch.append(w)
        if len(batch) >= size or time.monotonic() - first_at >= job.flush_s:
            yield _batch(batch, stats.decode_s - counted, stats)
            counted, batch, size = stats.decode_s, [], next(sizes)
    if batch:
        yield _batch(batch, stats.decode_s - counted, stats)


def _batch(windows: list[Window], decode_s: float, stats: DecodeStats) -> WindowBatch:
    spans = tuple(WindowSpan(w.index, w.start_frame, w.end_frame, w.start_s, w.end_s) for w in windows)
    return WindowBatch(spans, np.stack([w.frames for w in windows]), decode_s, stats.counts)


def run_window_job(conn: Connection, clip: bytes, sampling: SamplingConfig, limits: VideoLimits, job: WindowJob,
                   prefix: str) -> None:
    """In a decoder process: send each batch (block ``prefix + seq``), wait for ``("next",)``; any other word
    stops the job (answered ``("stopped",)``). Ends with ``("done", decode seconds, decoded)``, or the
    error. A closed pipe (EOFError/OSError) propagates: the parent is gone."""
    stats = DecodeStats()
    batches = window_batches(clip, sampling, limits, job, stats)
    seq = 0
    try:
        for b in batches:
            arr = np.ascontiguousarray(b.frames)
            write_block(f"{prefix}{seq}", arr)
            conn.send(("batch", seq, b.spans, arr.shape, arr.dtype.str, b.decode_s, b.decoded))
            seq += 1
            del arr, b
            if conn.recv() != ("next",):
                conn.send(("stopped",))
                return
        reply: tuple = ("done", stats.decode_s, stats.counts)
    except (EOFError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure on clip content is the clip's, not INTERNAL
        reply = failure_reply(e)
    finally:
        batches.close()
    send_reply(conn, reply)
