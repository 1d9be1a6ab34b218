"""The window mode's readers: a long video's packets once, front to back, the frames its windows take.

:class:`WindowWalk` places packets on the frame grid as :class:`~.readers.IndexedReader` does and,
like it, decodes only what a taken frame needs: packets after the last taken frame so far are
held back, and dropped undecoded when a keyframe comes before the next taken frame (the tail of a
GOP that no window samples); inside a decoded run the decoder drops the non-reference frames that
are not taken. :func:`count_frames` is the fallback for streams off the grid (every frame decoded,
the index counted).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Container, Iterator, Optional, Protocol

import numpy as np

from .limits import Budget
from .readers import _REORDER_DEPTH, IndexedReader, Irregular, SeekMissed, decode_packet

Taken = tuple[dict[int, np.ndarray], int]  # (frames converted so far, by index; settled: see WindowWalk.walk)


class Takes(Protocol):
    """Which frames the windows take: ``i in takes``, and the first taken frame at or after ``i`` (None: no more).
    Both may open windows as they are asked (``stadapter.video.windows``' plan), so ask in increasing order."""

    def __contains__(self, i: object) -> bool: ...

    def first_from(self, i: int) -> Optional[int]: ...


class WindowWalk(IndexedReader):
    """The window mode's indexed reader: every packet once, front to back, no restart.

    Packets and frames are placed on the frame grid as :class:`IndexedReader` places them; the
    packets after the last taken frame are held back until the next taken frame's packet comes
    (then decoded) or a keyframe before it does (then dropped undecoded: the decoder restarts at
    the keyframe); a non-reference frame that ``takes`` does not take is dropped by the decoder
    (``feed``). So a frame's index is its slot, as for :func:`decode_views`. A stream off the
    grid, or with a slot that never gets a packet (a hole: packets come at most ``_REORDER_DEPTH``
    ahead of their slot), raises :class:`Irregular`; the caller counts frames instead.

    ``start`` > 0 (a later part of the video, read by another decoder): once frame 0 has fixed the
    grid, one seek to the keyframe at or before frame ``start`` (when it lies more than
    ``seek_gap`` frames ahead), then front to back from there; frames before ``start`` are not
    taken. A seek that lands after ``start`` raises :class:`SeekMissed` (read again without it).
    """

    def __init__(self, container, stream, fps: float, budget: Budget, takes: Takes, start: int = 0,
                 seek_gap: int = 64) -> None:
        super().__init__(container, stream, fps, budget, None)
        self.want = takes  # type: ignore[assignment]  # the walk reads it only with `in` and first_from
        self.takes = takes
        self.start, self.seek_gap_frames = start, seek_gap  # start: the one seek still to make (0: none)
        self.seek_target = start  # where that seek must land at or before (land)

    def walk(self, convert) -> Iterator[Taken]:
        """After each packet that moves it: (the taken frames, ``settled``): every frame below ``settled`` that
        ``takes`` takes is in the dict (the caller may delete entries it is done with). The last item follows the
        drain."""
        packets = iter(self.container.demux(self.stream))
        landing, n, last = False, 0, -1
        held: list = []  # packets after the last one fed: none is taken, but a first keyframe at the target itself
        fresh = False  # held starts at a keyframe: the decoder restarts there
        target: float = math.inf  # first taken slot whose packet is not in the decoder (once the grid is fixed)
        while (packet := next(packets, None)) is not None:
            self.budget.packet()
            if packet.size == 0:
                continue
            if self.anchor is None:
                self.feed_early(packet, convert)
                if self.anchor is not None:
                    target = self.next_target(0)
            else:
                slot = self.slot(packet.pts, "packet")
                if landing:  # just sought: wait for the keyframe it landed on
                    if not packet.is_keyframe:
                        continue
                    self.land(slot)
                    landing = False
                self.see(slot, packet.is_keyframe)
                if slot > self.frontier + _REORDER_DEPTH:
                    raise Irregular(f"no packet for frame slot {self.frontier}")
                held, fresh, fed = self.hold_or_feed(packet, slot, target, held, fresh, convert)
                if fed:
                    target = self.next_target(int(target))  # finite: a packet at or past it came
            if self.anchor is not None and self.start - self.frontier > self.seek_gap_frames:
                self.seek(self.start)  # the decoder is flushed where it lands (land)
                self.start, landing = 0, True  # one seek
                packets, held, fresh = iter(self.container.demux(self.stream)), [], False
                continue
            n += 1
            if n % 64 == 0:
                self.forget()
            settled = min(self.frontier, self.expect)
            if not self.pending:  # every taken frame before the target is out of the decoder
                settled = max(settled, int(min(target, self.frontier)))
            if settled != last:
                last = settled
                yield self.got, settled
        if landing:
            raise SeekMissed("the seek for a later part of the video found no keyframe before the end")
        if fresh and self.slot(held[0].pts, "packet") >= target:  # the keyframe held is itself taken
            self.feed_held(held, fresh, convert)
        self.drain(convert)  # the other packets held hold no taken frame
        if any(i > self.frontier for i in self.seen):
            raise Irregular(f"the stream ends with no packet for frame slot {self.frontier}: its timestamps skip")
        yield self.got, self.frontier

    def next_target(self, i: int) -> float:
        """The first taken slot at or after ``i`` whose packet has not gone to the decoder (inf: none)."""
        t = self.takes.first_from(i)
        while t is not None and (t in self.fed or t in self.got):
            t = self.takes.first_from(t + 1)
        return math.inf if t is None else t

    def land(self, slot: int) -> None:
        """Where the seek landed (a keyframe): decoding restarts there; the slots before it count as seen."""
        if slot > self.seek_target:
            raise SeekMissed(f"the seek for frame {self.seek_target} landed on frame {slot}")
        self.restart_at(slot)
        self.seen = {i for i in self.seen if i >= slot}
        self.frontier = max(self.frontier, slot)
        self.got.clear()  # frames before the part are taken by no window of it
        self.pending.clear()

    def forget(self) -> None:
        """Drop the bookkeeping of slots behind the decoder's output (it is never read again), so a long video's
        walk holds as much as a short one's."""
        self.seen = {i for i in self.seen if i > self.frontier}
        self.maybe_dropped = {i for i in self.maybe_dropped if i >= self.expect}
        self.fed = {i for i in self.fed if i >= self.expect}
        del self.must_output[:bisect_left(self.must_output, self.expect)]


def count_frames(container, stream, budget: Budget, takes: Container[int], convert) -> Iterator[Taken]:
    """The window mode's sequential reader (for irregular streams): index = count of frames output so far; yields
    as :meth:`WindowWalk.walk` does (every frame decoded)."""
    got: dict[int, np.ndarray] = {}
    codec, n = stream.codec_context, 0
    packets = iter(container.demux(stream))
    while True:
        packet = next(packets, None)
        if packet is not None:
            budget.packet()
            if packet.size == 0:
                continue
        for f in decode_packet(codec, packet, budget):
            if n in takes:
                got[n] = convert(f)
            n += 1
        yield got, n
        if packet is None:
            return

