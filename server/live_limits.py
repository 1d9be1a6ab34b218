"""ClassifyLive's bounds: a record free of heavy imports, so the flag parser takes its defaults from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LiveLimits:
    """Bounds on ClassifyLive (each named after its flag).

    Args:
        max_streams: live streams open at once, each with a decoder process of its own (``--max-live-streams``).
        max_s: longest stream, in its own presentation time, and in wall clock once its idle allowance is added
            (``--max-live-s``).
        idle_s: longest wait for a stream's next chunk (``--live-idle-s``).
        max_chunk_bytes: largest chunk, hence the bytes a stream holds received but not yet read by its decoder:
            the chunk being handed over and the pipe's buffer (``--max-live-chunk-bytes``).
    """

    max_streams: int = 4
    max_s: float = 4 * 3600.0
    idle_s: float = 10.0
    max_chunk_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_streams", "max_chunk_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or (v == 0 and name != "max_streams"):
                raise ValueError(f"LiveLimits.{name} must be a positive int, got {v!r}")
        for name in ("max_s", "idle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LiveLimits.{name} must be > 0, got {getattr(self, name)!r}")
