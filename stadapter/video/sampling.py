"""Which frames a view takes: pure integer arithmetic (no av, no torch)."""

from __future__ import annotations

from typing import Mapping

from ..config import SamplingConfig


def sample_indices(num_frames_total: int, cfg: SamplingConfig, temporal_view: int = 0) -> list[int]:
    """The ``cfg.num_frames`` frame indices of one temporal view, non-decreasing, in range.

    ``uniform``: T equal segments, one frame per segment; view v of V takes the
    frame at fraction (v + 0.5) / V of each segment (V = 1: the middle frame, as
    the public ST-Adapter code tests SSv2). ``stride``: T frames ``stride`` apart
    (span (T-1)*stride+1); the span starts are spread evenly over the clip (one
    view: centred); a clip shorter than the span starts at 0 and repeats its last
    frame.
    """
    n, T, V = num_frames_total, cfg.num_frames, cfg.temporal_views
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_frames_total must be a positive int, got {n!r}")
    if not isinstance(temporal_view, int) or not 0 <= temporal_view < V:
        raise ValueError(f"temporal_view must be in [0, {V}), got {temporal_view!r}")
    v = temporal_view
    if cfg.mode == "uniform":
        # floor((i + (2v+1)/(2V)) * n / T) in integers: no float edge cases
        return [min(n - 1, ((2 * i * V + 2 * v + 1) * n) // (2 * T * V)) for i in range(T)]
    span = (T - 1) * cfg.stride + 1
    if n <= span:
        start = 0
    elif V == 1:
        start = (n - span) // 2
    else:
        start = (2 * v * (n - span) + (V - 1)) // (2 * (V - 1))  # round(v * (n-span) / (V-1))
    return [min(n - 1, start + i * cfg.stride) for i in range(T)]


def unique_indices(views: list[list[int]]) -> list[int]:
    return sorted({i for v in views for i in v})


def missing_indices(views: list[list[int]], got: Mapping[int, object]) -> list[int]:
    return [i for i in unique_indices(views) if i not in got]

