"""Which frames a view takes: pure integer arithmetic (no av, no torch).

The fast sampling mode (``SamplingConfig.seek == "keyframe"``)
-----------------------------------------------------------------
Exact sampling decodes every sampled frame from the keyframe before it: the
frames between cost as much as the one wanted. The fast mode moves each sample
to the frame of its *segment* that is cheapest to decode, given the clip's
keyframe positions (read from the demuxer, see ``Clip.keyframes``):

* the segment holds a keyframe: that keyframe (one frame to decode; of several,
  the one nearest the exact index, earlier on a tie);
* it holds none: its first frame, the frame nearest the keyframe before it, so
  the fewest frames are decoded (decoding only runs forward from a keyframe);
* no keyframe is known at or before the segment (positions unknown, e.g. packets
  without timestamps): the exact index stays.

A segment is the cell of the sampling grid that the exact index stands for, so
segments never overlap within a view and the order of the samples is kept:

* ``uniform`` with V temporal views: the clip is cut into T x V equal cells
  ``[floor(c n / (T V)), floor((c + 1) n / (T V)))``, c = t V + v; view v's t-th
  sample (at fraction (v + 0.5) / V of the t-th of T segments) is the centre of cell
  c. With V = 1 these are the T segments of segment-based sampling. Splitting each
  segment by view keeps the views apart: snapping to the whole segment would give
  every view the same keyframe and make the views copies of each other.
* ``stride``: the ``stride`` frames centred on the sample, ``[s - stride // 2,
  s - stride // 2 + stride)``, cut to the clip. Views are placed by the exact
  sampling; where their spans overlap (a clip shorter than V spans) they may share
  frames, as exact samples that repeat the last frame do.

A sample whose cell does not hold it (cells narrower than a frame: fewer frames than
samples) keeps its exact index.
"""

from __future__ import annotations

import bisect
from typing import Mapping, Sequence

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



def sample_cells(num_frames_total: int, cfg: SamplingConfig, temporal_view: int = 0) -> list[tuple[int, int]]:
    """The segment ``[lo, hi)`` of each of :func:`sample_indices`' samples (see the module docstring).

    Segments are ordered and, within a view, do not overlap (except stride samples clamped to the last
    frame). A cell narrower than a frame may miss its exact index; :func:`snap_to_keyframes` then keeps it.
    """
    n, T, V, v = num_frames_total, cfg.num_frames, cfg.temporal_views, temporal_view
    exact = sample_indices(n, cfg, v)
    cells = []
    for i, s in enumerate(exact):
        if cfg.mode == "uniform":
            c = i * V + v
            lo, hi = (c * n) // (T * V), ((c + 1) * n) // (T * V)
        else:
            lo = max(0, s - cfg.stride // 2)
            hi = min(n, s - cfg.stride // 2 + cfg.stride)
        cells.append((lo, hi))
    return cells


def snap_to_keyframes(indices: Sequence[int], cells: Sequence[tuple[int, int]], keyframes: Sequence[int]) -> list[int]:
    """Each index moved to the cheapest frame of its cell: its nearest keyframe inside the cell, else the
    cell's first frame if a keyframe precedes it, else the index itself (also when the cell does not hold
    the index). ``keyframes``: sorted frame indices. Non-decreasing indices stay non-decreasing."""
    out = []
    for s, (lo, hi) in zip(indices, cells, strict=True):
        if not lo <= s < hi:
            out.append(s)
            continue
        a, b = bisect.bisect_left(keyframes, lo), bisect.bisect_left(keyframes, hi)
        if a < b:  # keyframes[a:b] lie in [lo, hi): the nearest to s, earlier on a tie
            k = bisect.bisect_left(keyframes, s, a, b)
            near = [keyframes[j] for j in (k - 1, k) if a <= j < b]
            out.append(min(near, key=lambda f: (abs(f - s), f)))
        elif a > 0:  # a keyframe before the cell: its first frame is the fewest frames away from it
            out.append(lo)
        else:
            out.append(s)
    return out


def keyframe_indices(num_frames_total: int, cfg: SamplingConfig, temporal_view: int, keyframes: Sequence[int]) -> list[int]:
    """:func:`sample_indices` of one view moved for the fast mode (see the module docstring)."""
    return snap_to_keyframes(sample_indices(num_frames_total, cfg, temporal_view),
                             sample_cells(num_frames_total, cfg, temporal_view), keyframes)


def view_indices(num_frames_total: int, cfg: SamplingConfig, keyframes: Sequence[int] | None = None) -> list[list[int]]:
    """Every temporal view's indices: exact, or moved to ``keyframes`` when ``cfg.seek == "keyframe"``."""
    views = range(cfg.temporal_views)
    if cfg.seek == "keyframe" and keyframes is not None:
        keys = sorted(k for k in keyframes if 0 <= k < num_frames_total)
        return [keyframe_indices(num_frames_total, cfg, v, keys) for v in views]
    return [sample_indices(num_frames_total, cfg, v) for v in views]


def presentation_ranks(pts: Sequence[int], marked: Sequence[int]) -> list[int]:
    """Frame indices of the ``marked`` pts values among all frames' ``pts`` (presentation order = pts
    order; each packet is one frame): sorted, no repeats. Pure, so a pts jump of 1e9 s costs nothing."""
    order = sorted(pts)
    return sorted({bisect.bisect_left(order, p) for p in marked})
