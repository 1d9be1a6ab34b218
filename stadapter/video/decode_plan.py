"""What reaching the sampled frames will cost, told by one demux pass before anything is decoded.

:func:`scan_packets` reads the stream's packets once (no decoding): the keyframes' frame indices and, for an
H.264/HEVC stream with B-frames, each packet's frame index and whether it is a reference frame (its first slice's
header, :mod:`.nal_units`). :func:`decoded_at_least` turns that into the frames a read must decode, so a read
predictably over ``max_decoded_pixels`` is refused before it is paid for.

A frame's index is the rank of its packet's pts (a decoder outputs frames in pts order). The readers decode from
the keyframe at or before a needed frame to it, in decode order; a decoder that drops unneeded non-reference
frames (``skip_frame=NONREF``) still decodes every reference frame on the way, so those plus the needed frames are
a lower bound of its work, whatever the B-frame structure.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import av

from .limits import Budget
from .nal_units import NalScan
from .sampling import presentation_ranks


@dataclass(frozen=True)
class StreamScan:
    """One demux pass's findings. ``keyframes``: sorted frame indices of the keyframes, None when a packet has no
    pts; ``order`` and ``references`` (decode order, one entry per frame): each packet's frame index and whether it
    is a reference frame, or None when not asked for or not known for every packet."""

    keyframes: Optional[list[int]]
    order: Optional[list[int]] = None
    references: Optional[list[bool]] = None


def scan_packets(packets: Iterable[av.Packet], budget: Budget,
                 nal: Optional[NalScan] = None) -> tuple[Optional[av.Packet], StreamScan]:
    """Read ``packets`` (one stream, decode order) without decoding; ``nal``: read each one's reference flag too.
    Returns the first packet with data (the caller rewinds to it) and the scan."""
    pts: list[int] = []
    keys: list[int] = []
    refs: Optional[list[bool]] = [] if nal is not None else None
    first = None
    for packet in packets:
        budget.packet()
        if packet.size == 0:
            continue
        if first is None:
            first = packet  # discarded or not: the rewind must give the reader every packet from the start
        if packet.is_discard:
            continue
        if packet.pts is None:
            return first, StreamScan(None)
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
        if refs is not None and nal is not None:
            ref = nal.is_reference(packet)
            if ref is None:
                refs = None  # a packet without a slice: frames and packets may not pair up
            else:
                refs.append(ref)
    if not pts:
        return first, StreamScan(None)
    ranked = sorted(pts)
    order = [bisect.bisect_left(ranked, p) for p in pts] if refs is not None else None
    return first, StreamScan(presentation_ranks(pts, keys), order, refs)


def frames_to_decode(needed: Sequence[int], keyframes: Sequence[int]) -> int:
    """Frames a reader decodes to output the sorted ``needed`` frames when it decodes every frame of a run: from the
    keyframe at or before each needed frame, or on from the previous needed frame where no keyframe lies between
    (``keyframes``: sorted frame indices)."""
    total, prev = 0, -1
    for i in needed:
        k = bisect.bisect_right(keyframes, i) - 1
        start = keyframes[k] if k >= 0 else 0
        total += i - max(prev + 1, start) + 1
        prev = i
    return total


def decoded_at_least(needed: Sequence[int], scan: StreamScan) -> Optional[int]:
    """Frames a decoder that drops unneeded non-reference frames outputs, at least, for the sorted ``needed``: in
    decode order, from the keyframe at or before each needed frame to that frame, the reference frames and the needed
    ones that are shown no later than it (output is in presentation order, so those come out before it; a
    reference shown after it may still sit in the decoder when the read ends). None when the scan lacks what it takes
    (no reference flags, or a needed frame it did not see)."""
    if scan.keyframes is None or scan.order is None or scan.references is None:
        return None
    order, refs = scan.order, scan.references
    position = {frame: p for p, frame in enumerate(order)}
    spans = []
    for i in needed:
        if i not in position:
            return None
        k = bisect.bisect_right(scan.keyframes, i) - 1
        start = position.get(scan.keyframes[k], 0) if k >= 0 else 0
        spans.append((min(start, position[i]), position[i], i))
    wanted = set(needed)
    spans.sort()
    active: list[tuple[int, int]] = []  # a heap of (-shown by, ends at) of the spans covering p
    total, next_span = 0, 0
    p = spans[0][0]
    while next_span < len(spans) or active:
        if not active:
            p = max(p, spans[next_span][0])
        while next_span < len(spans) and spans[next_span][0] <= p:
            start, end, i = spans[next_span]
            heapq.heappush(active, (-i, end))
            next_span += 1
        while active and active[0][1] < p:
            heapq.heappop(active)
        if active:
            total += (refs[p] or order[p] in wanted) and order[p] <= -active[0][0]
            p += 1
    return total
