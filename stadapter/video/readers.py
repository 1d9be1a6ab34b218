"""Readers that find sampled frames in a demuxed stream: indexed (by pts on the frame grid) and sequential."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator

import av
import numpy as np

from .limits import Budget

NONREF_SKIPPABLE = frozenset({"h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video"})
_FRAME_GRID_TOLERANCE = 0.25
_REORDER_DEPTH = 32  # frames a packet may come ahead of its display slot (B-pyramids are <= 16)


class Irregular(Exception):
    """The stream does not sit on a constant frame grid; index by counting instead."""


class SeekMissed(Irregular):
    """A seek landed after its target; read again without seeking."""


@dataclass
class ReadResult:
    decoded: int = 0  # frames the decoder output in this read
    last_index: int = -1  # highest frame index known to exist (output, or dropped as non-reference)
    last_output: int = -1  # highest frame index the decoder really output
    eof: bool = False  # the stream ended before every needed frame was out
    seeks: int = 0  # container seeks done
    sequential: bool = False  # read by counting frames (the stream is not on a constant frame grid)


def demux_packets(container: av.container.InputContainer, stream) -> Iterator[av.Packet]:
    """``container.demux(stream)``, ending where PyAV's own end-of-stream flush breaks: it indexes its stream list
    with streams that appeared while demuxing (an MPEG-TS whose program gains a stream), raising IndexError after
    the last packet; every packet of the streams known at open has been given by then."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except IndexError:  # raised nowhere else in PyAV's demux: its packets are guarded against unknown streams
            return
        yield packet


def decode_packet(codec, packet, budget: Budget) -> list[av.VideoFrame]:
    """Decode one packet (None drains); a packet the decoder rejects just yields no frame, unless it was refused
    for a frame size over the limit (the decoder's ``max_pixels``, see ``container.cap_decoder``: a size that
    changes mid-stream is refused by FFmpeg before it allocates the frame, and named here; a parameter set in the
    packet that announces a size over it is refused before the decoder reads it)."""
    budget.check_parameter_sets(codec, packet)
    try:
        frames = codec.decode(packet)
    except (av.FFmpegError, EOFError):
        budget.check_size(codec.coded_width or codec.width, codec.coded_height or codec.height)
        return []
    for f in frames:
        budget.frame(f)
    return frames


class SequentialReader:
    """Index = count of frames output so far: the naive definition, for irregular streams."""

    def __init__(self, container, stream, budget: Budget) -> None:
        self.container, self.stream, self.budget = container, stream, budget

    def run(self, needed: list[int], convert) -> tuple[dict[int, np.ndarray], ReadResult]:
        want, got, res = set(needed), {}, ReadResult(sequential=True)
        codec, last = self.stream.codec_context, needed[-1]

        def take(frames) -> bool:
            for f in frames:
                res.last_index += 1
                res.last_output = res.last_index
                res.decoded += 1
                if res.last_index in want:
                    got[res.last_index] = convert(f)
            return res.last_index >= last

        for packet in self.container.demux(self.stream):
            self.budget.packet()
            if packet.size == 0:
                continue
            if take(decode_packet(codec, packet, self.budget)):
                return got, res
        take(decode_packet(codec, None, self.budget))
        res.eof = len(got) < len(want)
        return got, res


class IndexedReader:
    """Places packets and frames on the frame grid by pts; decodes only GOPs holding needed frames.

    ``run`` walks the packets once. ``target`` is the first needed frame whose packet
    has not reached the decoder. A keyframe at or before ``target`` starts a new
    held-back ``buffer`` (what came before cannot be needed); a packet at or past
    ``target`` (or a keyframe past it) sends the buffer and itself to the decoder.
    Once the last needed packet is in, the decoder is drained instead of being fed
    more packets to push the reordered frames out.
    """

    def __init__(self, container, stream, fps: float, budget: Budget, seek_gap: int | None) -> None:
        self.container, self.stream, self.budget = container, stream, budget
        self.codec = stream.codec_context
        self.frames_per_tick = float(stream.time_base) * fps
        self.ticks_per_frame = 1.0 / self.frames_per_tick
        self.seek_gap = seek_gap
        self.anchor: int | None = None  # pts of frame 0
        self.want: set[int] = set()
        self.got: dict[int, np.ndarray] = {}
        self.early_pts: list[tuple[int, bool]] = []  # (pts, keyframe) of packets before the anchor was known
        self.seen: set[int] = set()  # grid slots of demuxed packets
        self.frontier = 0  # lowest slot not seen yet
        self.skipped: list[tuple[int, int]] = []  # slot ranges [a, b) jumped over by seeks
        self.last_key = -1  # slot of the latest keyframe demuxed
        self.run_start = 0  # keyframe slot where the current decode run began
        self.expect = 0  # slot the current run outputs next
        # Non-reference frames that are not needed are dropped by the decoder, for codecs
        # whose decoders define "non-reference" exactly (nothing else can depend on them).
        self.skip_nonref = self.codec.name in NONREF_SKIPPABLE
        self.skipping = False
        self.maybe_dropped: set[int] = set()  # slots fed while dropping non-reference frames
        self.fed: set[int] = set()  # needed slots whose packet went to the decoder
        self.pending: set[int] = set()  # of those, the slots not output yet (still in the decoder)
        self.must_output: list[int] = []  # sorted slots fed with every frame kept: the decoder must output each
        self.res = ReadResult()

    # --- grid

    def slot(self, pts: int | None, what: str) -> int:
        if pts is None:
            raise Irregular(f"a {what} has no pts")
        assert self.anchor is not None  # slots are asked for only once frame 0 fixed the grid
        x = (pts - self.anchor) * self.frames_per_tick
        i = round(x)
        if abs(x - i) > _FRAME_GRID_TOLERANCE:
            raise Irregular(f"{what} pts {pts} is off the frame grid")
        return i

    # --- decoding

    def feed(self, packets, convert) -> None:
        for p in packets:
            if self.anchor is not None:
                slot = self.slot(p.pts, "packet")
                needed = slot in self.want and slot not in self.got
                if needed:
                    self.fed.add(slot)
                    self.pending.add(slot)
                if self.skip_nonref and not needed:
                    self.maybe_dropped.add(slot)
                    self.res.last_index = max(self.res.last_index, slot)
                else:
                    k = bisect.bisect_left(self.must_output, slot)
                    if k == len(self.must_output) or self.must_output[k] != slot:
                        self.must_output.insert(k, slot)
                if self.skip_nonref:
                    if needed == self.skipping:  # the decoder reads the setting for each packet
                        self.codec.skip_frame = "DEFAULT" if needed else "NONREF"
                        self.skipping = not needed
            for f in decode_packet(self.codec, p, self.budget):
                self.output(f, convert)

    def hold_or_feed(self, packet: av.Packet, slot: int, target: float, held: list, fresh: bool,
                     convert) -> tuple[list, bool, bool]:
        """A placed packet, with ``target`` the first needed slot whose packet is not in the decoder: a keyframe
        at or before it starts the held-back packets anew (those before cannot be needed; ``fresh``: the decoder
        restarts there); a packet at or past it (or a keyframe past it) sends the held packets and itself to the
        decoder; another is held back. Returns (held, fresh, whether the decoder was fed)."""
        if packet.is_keyframe and slot <= target:
            if self.pending:
                self.drain(convert)  # needed frames still in the decoder's reorder queue
            return [packet], True, False
        if slot >= target or packet.is_keyframe:
            self.feed_held(held + [packet], fresh, convert)
            return [], False, True
        held.append(packet)
        return held, fresh, False

    def feed_held(self, held: list, fresh: bool, convert) -> None:
        """Send held-back packets to the decoder, restarting it at their first (a keyframe) when ``fresh``."""
        if fresh:
            self.restart_at(self.slot(held[0].pts, "packet"))
        self.feed(held, convert)

    def feed_early(self, packet: av.Packet, convert) -> None:
        """A packet before frame 0 fixed the grid: decoded from the start, placed once the grid is known."""
        if packet.pts is None:
            raise Irregular("a packet has no pts")
        self.early_pts.append((packet.pts, packet.is_keyframe))
        self.feed([packet], convert)

    def drain(self, convert) -> None:
        """Get out the frames the decoder holds back for reordering (it must be flushed after)."""
        for f in decode_packet(self.codec, None, self.budget):
            self.output(f, convert)

    def output(self, frame: av.VideoFrame, convert) -> None:
        self.res.decoded += 1
        if self.anchor is None:
            if frame.pts is None:
                raise Irregular("a frame has no pts")
            self.anchor = frame.pts
            for pts, key in self.early_pts:
                slot = self.slot(pts, "packet")
                self.see(slot, key)
                if slot in self.want:
                    self.fed.add(slot)
                    self.pending.add(slot)
        i = self.slot(frame.pts, "frame")
        if i < self.run_start:  # a leading picture of an open GOP we started at: not needed, maybe broken
            return
        # a gap is fine where the decoder may drop a frame, or where the packet was never fed
        # (later in decode order); a missing packet shows in verify()
        if i < self.expect or self.gap_before(i):
            raise Irregular(f"frame {i} follows frame {self.expect - 1}")
        self.expect = i + 1
        self.res.last_index = max(self.res.last_index, i)
        self.res.last_output = max(self.res.last_output, i)
        if i in self.want and i not in self.got:
            self.got[i] = convert(frame)
            self.pending.discard(i)

    def gap_before(self, i: int) -> bool:
        """Whether a frame the decoder must output lies in [expect, i): a search over fed slots, never a walk over
        the slot range (a pts jump of 1e9 s is 2.5e10 slots)."""
        k = bisect.bisect_left(self.must_output, self.expect)
        while k < len(self.must_output) and self.must_output[k] < i:
            if self.must_output[k] not in self.maybe_dropped:
                return True
            k += 1
        return False

    def restart_at(self, key_slot: int) -> None:
        self.codec.flush_buffers()
        self.run_start = self.expect = key_slot

    # --- the packet loop

    def run(self, needed: list[int], convert) -> tuple[dict[int, np.ndarray], ReadResult]:
        self.want, self.got = set(needed), {}
        todo = iter(needed)
        target: int = next(todo)
        buffer: list = []  # demuxed, not yet decoded packets (continuing the decoder, or from a keyframe)
        fresh = False  # buffer starts at a keyframe: flush the decoder before feeding it
        seeked_for: int | None = None
        landing: tuple[int, int, int] | None = None  # (frontier, last keyframe, target) of a seek in flight
        packets = self.container.demux(self.stream)
        while True:
            packet = next(packets, None)
            if packet is None:
                break
            self.budget.packet()
            if packet.size == 0:  # demuxer flush packet at the end, or an empty (skip) packet
                continue
            if self.anchor is None:
                self.feed_early(packet, convert)
            else:
                slot = self.slot(packet.pts, "packet")
                if landing is not None:  # just seeked: wait for the keyframe it landed on
                    if not packet.is_keyframe:
                        continue
                    self.landed(slot, *landing)
                    landing = None
                self.see(slot, packet.is_keyframe)
                buffer, fresh, _ = self.hold_or_feed(packet, slot, target, buffer, fresh, convert)
                if buffer and self.seek_gap is not None and target - slot > self.seek_gap and seeked_for != target:
                    if self.pending:
                        self.drain(convert)
                        self.codec.flush_buffers()
                    seeked_for, landing = target, (self.frontier, self.last_key, target)
                    self.seek(target)
                    packets, buffer, fresh = self.container.demux(self.stream), [], False
            while target in self.got or target in self.fed:  # its packet is in: look further
                following = next(todo, None)
                if following is None:
                    if self.pending:
                        self.drain(convert)  # rather than feeding more packets to push them out
                    return self.finish(needed, packets)
                target = following
        if landing is not None:
            raise SeekMissed(f"seek for frame {landing[-1]} found no keyframe before the end")
        # end of stream: decode what is held back, then drain the decoder
        if buffer:
            self.feed_held(buffer, fresh, convert)
        self.drain(convert)
        self.res.eof = len(self.got) < len(self.want)
        if self.res.eof:
            self.check_no_holes()
        return self.finish(needed, iter(()))

    def check_no_holes(self) -> None:
        """A stream that ends before a needed frame is truly short only if every slot up to its last packet
        had one: a hole means timestamps that skip (variable frame rate), where a slot is not a frame count.
        The bound is checked first, so a pts jump of 1e9 s allocates nothing."""
        if not self.seen:
            return
        highest = max(self.seen)
        if highest + 1 > len(self.seen) + sum(b - a for a, b in self.skipped):
            raise Irregular(f"the stream ends at slot {highest} with fewer packets: its timestamps skip")
        self.verify(highest)

    def finish(self, needed: list[int], packets) -> tuple[dict[int, np.ndarray], ReadResult]:
        if len(self.got) == len(self.want):
            last = needed[-1]
            # B-frames before the last needed frame may follow it in decode order: demux them to check
            for packet in packets:
                if self.frontier > last:
                    break
                self.budget.packet()
                if packet.size:
                    slot = self.slot(packet.pts, "packet")
                    self.see(slot, packet.is_keyframe)
                    if slot > last + _REORDER_DEPTH:
                        break
            self.verify(last)
        return self.got, self.res

    def see(self, slot: int, key: bool) -> None:
        self.seen.add(slot)
        while self.frontier in self.seen:
            self.frontier += 1
        if key:
            self.last_key = max(self.last_key, slot)

    def landed(self, slot: int, frontier: int, last_key: int, goal: int) -> None:
        """Check where a seek landed: past its goal is an error; not past the last keyframe ends seeking."""
        if slot > goal:
            raise SeekMissed(f"seek for frame {goal} landed on frame {slot}")
        if slot > frontier:
            self.skipped.append((frontier, slot))
        if slot <= last_key:  # keyframes are sparser than the gap: seeking only re-decodes
            self.seek_gap = None

    def seek(self, target: int) -> None:
        assert self.anchor is not None  # seeks happen only once frame 0 fixed the grid
        pts = self.anchor + int(round((target + _FRAME_GRID_TOLERANCE) * self.ticks_per_frame))
        self.container.seek(pts, backward=True, any_frame=False, stream=self.stream)
        self.res.seeks += 1

    def verify(self, last: int) -> None:
        """Every slot up to the last needed frame had its packet, so counting frames gives the slot."""
        covered = np.zeros(last + 1, bool)
        covered[[i for i in self.seen if 0 <= i <= last]] = True
        for a, b in self.skipped:
            covered[a:b] = True
        if not covered.all():
            raise Irregular(f"no packet for frame slot {int(np.argmin(covered))}")

