"""What one request may cost the server: one frozen record, built once from ``ServerConfig.limits``.

The services, the pipeline, the batcher and the decoder all read their bounds from
this object, so each bound lives in one place (``max_clip_bytes`` is ``video.max_bytes``:
the decoder checks the same number the services do). Every refusal names the flag
that sets the bound, so an operator knows what to change and a client what to send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from server.errors import BadRequest
from server.live_limits import LiveLimits
from stadapter.bundle import BundleLimits
from stadapter.config import brief
from stadapter.video import VideoLimits, WindowLimits, check_window_args

MAX_TOP_K = 1000  # a protocol bound, not an operator's knob: no model here has more classes
MAX_TASKS_PER_REQUEST = 32  # tasks one clip may be classified for in one request (each takes a queue slot)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request and on all requests together.

    Args:
        video: the decoder's limits (clip bytes, duration, frame pixels, decode time, ...).
        max_inflight_clip_bytes: clip bytes all requests together may hold (``--max-inflight-clip-bytes``).
        max_queue_size: requests admitted and not yet computed (``--max-queue-size``).
        max_batch_rows: rows (clip views) in one forward pass, hence in one request (``--max-batch-size``).
        max_num_frames: frames per view a request may ask for with a sampling override (``--max-num-frames``).
        stream_idle_timeout_s: longest silence inside a client stream (``--stream-idle-timeout-s``).
        decode_timeout_s: longest decode of one clip before its worker is killed (``--decode-timeout-s``).
        bundle: sizes of an uploaded task bundle (``--max-bundle-bytes``).
        windows: ClassifyWindows' bounds, in place of the one-clip ones a long video would break: longest
            video (``max_duration_s``), windows per request (``max_windows``), frames and pixels decoded,
            decode time, frames held for overlapping windows (``stadapter.video.WindowLimits``).
        live: ClassifyLive's bounds (:class:`LiveLimits`); its windows are held to ``windows``' others.
    """

    video: VideoLimits
    max_inflight_clip_bytes: int
    max_queue_size: int
    max_batch_rows: int
    max_num_frames: int
    stream_idle_timeout_s: float
    decode_timeout_s: float
    bundle: BundleLimits
    windows: WindowLimits = WindowLimits()
    live: LiveLimits = LiveLimits()

    def __post_init__(self) -> None:
        for name in ("max_inflight_clip_bytes", "max_queue_size", "max_batch_rows", "max_num_frames"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive int, got {v!r}")
        for name in ("stream_idle_timeout_s", "decode_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_inflight_clip_bytes < self.max_clip_bytes:
            raise ValueError(f"max_inflight_clip_bytes ({self.max_inflight_clip_bytes}) must be >= max_clip_bytes "
                             f"({self.max_clip_bytes}), or the largest clip could never be accepted")

    @property
    def max_clip_bytes(self) -> int:
        """Largest clip, whole or streamed (``--max-clip-bytes``); the decoder checks the same number."""
        return self.video.max_bytes

    def check_clip_size(self, n: int, index: Optional[int] = None) -> None:
        """A clip of ``n`` bytes: neither empty nor above ``--max-clip-bytes``. ``index``: the clip's place among a
        request's several clips (an OIP ``CLIP`` element), named in the message."""
        if not n:
            raise BadRequest("the clip is empty (0 bytes)" + (f": clip {index} of the request" if index is not None
                                                                 else ""))
        if n > self.max_clip_bytes:
            which = "the clip" if index is None else f"clip {index}"
            raise BadRequest(f"{which} is {n} bytes, above the server's --max-clip-bytes of {self.max_clip_bytes}")

    def check_rows(self, rows: int) -> None:
        """One request's rows (its views) must fit one forward: ``max_batch_rows`` bounds every forward."""
        if rows > self.max_batch_rows:
            raise BadRequest(f"the request needs {rows} rows (views) in one forward pass, above the server's "
                             f"--max-batch-size of {self.max_batch_rows}; ask for fewer temporal or spatial views")

    def check_overrides(self, overrides: Optional[Mapping[str, Any]]) -> None:
        """Sampling overrides a client may send: frames per view are capped (views are capped by rows)."""
        n = (overrides or {}).get("num_frames")
        if isinstance(n, int) and n > self.max_num_frames:
            raise BadRequest(f"num_frames={brief(n)} is above the server's --max-num-frames of {self.max_num_frames}")

    def check_tasks(self, tasks: Sequence[str]) -> None:
        """The task list of one request: 1..MAX_TASKS_PER_REQUEST names, none empty, none twice."""
        if not tasks:
            raise BadRequest("the request names no task")
        if len(tasks) > MAX_TASKS_PER_REQUEST:
            raise BadRequest(f"the request names {len(tasks)} tasks, above the limit of {MAX_TASKS_PER_REQUEST} "
                             "tasks per request (MAX_TASKS_PER_REQUEST); split it")
        if any(not t for t in tasks):
            raise BadRequest(f"the request's task list has an empty name at position {list(tasks).index('')}")
        seen: set[str] = set()
        twice = [t for t in tasks if t in seen or seen.add(t)]  # type: ignore[func-returns-value]
        if twice:
            raise BadRequest(f"task {brief(twice[0])} is named twice in the request (task and tasks together "
                             "name each task once)")

    def check_windows(self, window_s: float, stride_s: float) -> None:
        """Window length and stride of a ClassifyWindows request, before anything is decoded (INVALID_ARGUMENT:
        ``WindowError`` is a ``VideoError``); what depends on the clip (its frame rate) is checked on decode."""
        check_window_args(window_s, stride_s, self.windows)

    def check_top_k(self, k: int) -> None:
        if k > MAX_TOP_K:
            raise BadRequest(f"top_k={brief(k)} is above the limit of {MAX_TOP_K}")
