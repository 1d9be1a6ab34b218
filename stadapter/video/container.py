"""Opening a clip: size and container checks, choosing the video stream, header facts and limits."""

from __future__ import annotations

import errno
import io
import itertools
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import av
import numpy as np

from .decode_plan import StreamScan, decoded_at_least, frames_to_decode, scan_packets
from .limits import Budget, Source, VideoError, VideoLimits, check_aspect, out_of_memory
from .nal_units import CHECKED_CODECS, NalScan
from .readers import NONREF_SKIPPABLE, IndexedReader, Irregular, ReadResult, SeekMissed, SequentialReader, demux_packets
from .screen import check_stream_count, open_screened
from .seek_length import PROBE_PACKETS, landing_past_limit
from .window_walk import Taken, Takes, WindowWalk, count_frames


@dataclass(frozen=True)
class ClipInfo:
    """What the container header says about the clip's video stream."""

    num_frames: int  # from stream.frames, else duration * fps (an estimate)
    fps: float
    duration_s: float
    width: int
    height: int
    codec: str
    container: str


class guard:
    """Turn whatever PyAV / FFmpeg / odd files raise into :class:`VideoError`."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, exc, tb) -> None:  # never swallows: re-raises as VideoError or lets it through
        if exc is None or isinstance(exc, VideoError) or not isinstance(exc, Exception):
            return None
        if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == errno.ENOMEM:
            raise out_of_memory(self.what, exc) from exc
        if isinstance(exc, (av.FFmpegError, OSError, EOFError, ValueError, IndexError, KeyError,
                            AssertionError, RuntimeError, OverflowError, MemoryError, UnicodeError)):
            raise VideoError(f"cannot {self.what} clip: {describe(exc)}") from exc
        return None


def describe(exc: BaseException) -> str:
    """What went wrong, in words for the client: FFmpeg's (or the system's) message; never a Python class name."""
    if isinstance(exc, av.FFmpegError) and exc.errno == errno.EAGAIN:
        return "the demuxer stopped on corrupt data"  # FFmpeg's "Resource temporarily unavailable" says nothing
    text = getattr(exc, "strerror", None)
    if text:
        return str(text)
    if isinstance(exc, (av.FFmpegError, OSError, EOFError)):
        return str(exc) or "read error"
    return f"the demuxer or decoder failed on its data ({exc})" if str(exc) else "the demuxer or decoder failed on its data"


def _source_size(source: Source) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    try:
        return os.stat(source).st_size
    except OSError as e:
        raise VideoError(f"cannot read clip {os.fspath(source)!r}: {e.strerror or e}") from e


# Leading bytes of containers FFmpeg reads but the whitelist leaves out, to name them in the refusal.
_SIGNATURES = (
    (0, b"\x06\x0e\x2b\x34\x02\x05\x01\x01\x0d\x01\x02", "MXF"),
    (0, b"#EXTM3U", "an HLS playlist"), (0, b"ffconcat", "an FFmpeg concat list"),
    (0, b"\x89PNG", "a PNG image"), (0, b"\xff\xd8\xff", "a JPEG image"), (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"), (0, b"fLaC", "FLAC audio"), (0, b"ID3", "MP3 audio"),
    (8, b"WAVE", "WAV audio"),
)


def _named_container(head: bytes) -> str | None:
    for offset, magic, name in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def _head(source: Source, n: int = 64) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(memoryview(source)[:n])
    try:
        with open(source, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def open_options(limits: VideoLimits) -> tuple[dict[str, str], dict[str, str]]:
    """(demuxer options, decoder options): FFmpeg's own limits, so it refuses before doing the work.

    ``max_streams`` stops the demuxer from creating streams past our limit (one more, so the count
    check below can name the refusal); ``max_pixels`` stops every decoder, including the one
    ``avformat_find_stream_info`` runs on the first frame, from allocating an oversized frame.
    """
    container = {"protocol_whitelist": "file", "max_streams": str(limits.max_streams + 1)}  # never a URL
    if limits.formats:
        container["format_whitelist"] = ",".join(limits.formats)
    return container, {"max_pixels": str(limits.decoder_max_pixels())}


def cap_decoder(stream: av.video.stream.VideoStream, limits: VideoLimits) -> None:
    """Give the stream's decoder FFmpeg's own frame size limit before its first packet (PyAV opens the decoder
    then): FFmpeg refuses a frame over it before allocating it, on every (re)initialisation, so a size that
    jumps mid-stream (a second parameter set) costs nothing. ``av.open``'s options reach only the decoders of
    ``avformat_find_stream_info``, not this one."""
    cc = stream.codec_context
    if cc is not None and not cc.is_open:
        cc.options = {**(cc.options or {}), "max_pixels": str(limits.decoder_max_pixels())}


def _target(source: Source) -> io.BytesIO | str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source) if not isinstance(source, bytes) else source)
    target = os.fspath(source)
    return target if isinstance(target, str) else os.fsdecode(target)


def _open_container(source: Source, limits: VideoLimits, screen: bool = False) -> av.container.InputContainer:
    """The clip opened; with ``screen``, after its frame sizes were checked with no decoder allowed
    (:mod:`.screen`: done once per clip, before FFmpeg first decodes it)."""
    options, codec_options = open_options(limits)
    try:
        if screen:
            return open_screened(_target(source), lambda: _target(source), options, codec_options, limits)
        return av.open(_target(source), mode="r", container_options=options, options=codec_options)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, EOFError, ValueError, IndexError, UnicodeError) as e:
        if isinstance(e, MemoryError) or getattr(e, "errno", None) == errno.ENOMEM:
            raise out_of_memory("open", e) from e
        named = _named_container(_head(source))
        if named and limits.formats:
            raise VideoError(f"the clip is {named}, which is not an allowed container (allowed: "
                             f"{', '.join(limits.formats)})") from e
        allowed = f", or not in one of the allowed containers: {', '.join(limits.formats)}" if limits.formats else ""
        raise VideoError(f"cannot open clip: not a readable video (corrupt, truncated{allowed}) [{describe(e)}]") from e


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The stream a player shows: the one marked default, else FFmpeg's best; never cover art."""
    flags = av.stream.Disposition
    videos = [s for s in container.streams.video if not s.disposition & flags.attached_pic]
    if videos:
        marked = [s for s in videos if s.disposition & flags.default]
        if marked:
            return marked[0]
        best = container.streams.best("video")
        return best if best in videos else videos[0]
    kinds = Counter(s.type for s in container.streams)
    listing = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    raise VideoError(f"clip has no video stream (streams: {listing})")


def _fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate.denominator and 0 < float(rate) < 10_000:
            return float(rate)
    return 0.0


def clip_info(container, stream) -> ClipInfo:
    fps = _fps(stream)
    duration = 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    frames = int(stream.frames or 0)
    if frames <= 0 and duration > 0 and fps > 0:
        frames = max(1, round(duration * fps))
    if duration <= 0 and frames > 0 and fps > 0:
        duration = frames / fps
    cc = stream.codec_context
    if cc is None:  # FFmpeg found the stream but no decoder parameters: a truncated or damaged header
        raise VideoError("the video stream has no codec parameters (truncated or damaged header)")
    return ClipInfo(num_frames=frames, fps=fps, duration_s=duration, width=int(cc.width or 0),
                    height=int(cc.height or 0), codec=cc.name or "unknown", container=container.format.name)


def _check(info: ClipInfo, limits: VideoLimits) -> None:
    if info.width <= 0 or info.height <= 0:
        raise VideoError(f"video stream has no frame size ({info.width}x{info.height}): the clip is corrupt, or "
                         f"its first frame is over the limit of {limits.max_pixels} pixels")
    if info.width * info.height > limits.max_pixels:
        raise VideoError(f"frame size {info.width}x{info.height} = {info.width * info.height} pixels is over "
                         f"the limit of {limits.max_pixels}")
    length = max(info.duration_s, info.num_frames / info.fps if info.fps > 0 else 0.0)
    check_aspect(info.width, info.height, limits)
    if not math.isfinite(length) or length > limits.max_duration_s:
        raise VideoError(f"clip is {length:.1f} s long, over the limit of {limits.max_duration_s:g} s")



class Clip:
    """One opened clip: header checked, the video stream chosen; reads frame sets."""

    def __init__(self, source: Source, limits: VideoLimits) -> None:
        size = _source_size(source)
        if size == 0:
            raise VideoError("clip is empty (0 bytes)")
        if size > limits.max_bytes:
            raise VideoError(f"clip is {size} bytes, over the limit of {limits.max_bytes}")
        self.source, self.limits = source, limits
        self._lead: av.Packet | None = None  # the packet a checked rewind demuxed: the next read starts with it
        self._scan: StreamScan | None = None  # keyframes() and reference flags: one demux pass, once
        self._scanned_references = False  # whether that pass read the reference flags (or tried to)
        self.budget = Budget(limits)
        self.container = _open_container(source, limits, screen=True)
        self._closed = False
        try:
            check_stream_count(self.container, limits)
            stream = video_stream(self.container)
            cap_decoder(stream, limits)
            self.stream_index = stream.index
            self.info = clip_info(self.container, stream)
            _check(self.info, limits)
            if self.info.num_frames <= 0:
                self.info = _with_counted_frames(self.info, self._count_packets())
                _check(self.info, limits)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Clip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.container.close()

    def _reopen(self) -> av.video.stream.VideoStream:
        self._lead = None
        self.close()
        self.container = _open_container(self.source, self.limits)
        self._closed = False
        stream = self.container.streams[self.stream_index]
        assert isinstance(stream, av.video.stream.VideoStream)  # the index was chosen among video streams
        cap_decoder(stream, self.limits)
        return stream

    def _count_packets(self) -> int:
        """Frame count for a header without frames or duration: count packets, then rewind. The count stops as
        soon as it makes the clip longer than ``max_duration_s`` (a 10-hour clip costs what the limit's length
        costs, not its own); past a few thousand packets, a seek to the limit may show sooner that the clip runs
        past it (:mod:`.seek_length`)."""
        stream = self.container.streams[self.stream_index]
        fps = self.info.fps
        most = math.floor(self.limits.max_duration_s * fps) if fps > 0 else None
        probe_at = min(PROBE_PACKETS, most // 4) if most is not None and most >= 4 else None
        n, first_pts = 0, None
        for packet in demux_packets(self.container, stream):
            self.budget.packet()
            n += packet.size > 0
            first_pts = packet.pts if first_pts is None else first_pts
            if most is not None and n == probe_at and first_pts is not None and packet.pos is not None and packet.pos >= 0:
                self._check_length_by_seek(first_pts, packet.pos + packet.size, n, most)
            if most is not None and n > most:
                raise VideoError(f"clip has more than {most} frames at {fps:g} fps (its header gives no duration), "
                                 f"over the limit of {self.limits.max_duration_s:g} s")
        self._reopen()
        if n == 0:
            raise VideoError("no decodable video frames: the video stream holds no packets")
        return n

    def _check_length_by_seek(self, first_pts: int, bytes_counted: int, counted: int, most: int) -> None:
        limit = self.limits.max_duration_s
        t = landing_past_limit(self.source, open_options(self.limits)[0], self.stream_index, first_pts, limit,
                               bytes_counted, counted, most)
        if t is not None:
            raise VideoError(f"clip runs past the limit of {limit:g} s: a seek to it found a frame at {t:.1f} s "
                             "(its header gives no duration)")

    def keyframes(self) -> list[int] | None:
        """Frame indices of the keyframes, from the demuxer's packet flags and timestamps: no decoding.

        One demux pass over the clip (counted against ``max_packets`` and the time budget; see
        :func:`.decode_plan.scan_packets`); None when a packet has no pts: then keyframes cannot be placed. The
        clip is rewound for the next :meth:`read`.
        """
        return self._scanned(references=False).keyframes

    def _scanned(self, references: bool) -> StreamScan:
        """The demux pass, once; with ``references``, each packet's reference flag too (an H.264/HEVC stream:
        a second pass if the first did not read them)."""
        if self._scan is None or (references and not self._scanned_references and self._scan.keyframes):
            stream = self.container.streams[self.stream_index]
            cc = stream.codec_context
            nal = NalScan(cc.name, cc.extradata) if references and cc.name in CHECKED_CODECS else None
            first, self._scan = scan_packets(demux_packets(self.container, stream), self.budget, nal)
            self._scanned_references = references
            self._rewind(first)
        return self._scan

    def _rewind(self, first) -> None:
        """Back to the start after a scan: a seek to the first packet, checked by demuxing one packet
        (handed to the next read first), so the next read sees the packets a fresh open gives. Where
        the seek fails or lands elsewhere (formats without an index), the clip is reopened instead."""
        stream = self.container.streams[self.stream_index]
        target = None if first is None else (first.dts if first.dts is not None else first.pts)
        if target is not None:
            try:
                self.container.seek(target, backward=True, any_frame=False, stream=stream)
                lead = next(demux_packets(self.container, stream), None)
            except (av.FFmpegError, OSError, EOFError, ValueError):
                lead = None
            if lead is not None and first is not None and all(
                    getattr(lead, a) == getattr(first, a) for a in ("pts", "dts", "pos", "size", "is_keyframe", "is_discard")
            ) and bytes(lead) == bytes(first):
                self._lead = lead
                return
        self._reopen()

    def read(self, needed: list[int], convert: Callable[[av.VideoFrame], np.ndarray],
             restart: bool = False, seek_gap: int | None = None) -> tuple[dict[int, np.ndarray], "ReadResult"]:
        """Frames at the sorted, unique ``needed`` indices, converted; plus how the read ended.

        Tries the indexed reader (with seeks, then without), then sequential
        decoding; ``restart`` reopens the clip first (for a second call).
        """
        if restart:
            self._reopen()
        self._check_cost(needed)
        stream = self.container.streams[self.stream_index]
        fps = self.info.fps
        gap = seek_gap if seek_gap is not None else default_seek_gap(fps)
        if fps > 0 and stream.time_base:
            try:
                return IndexedReader(self._demuxer(), stream, fps, self.budget, gap).run(needed, convert)
            except SeekMissed:
                stream = self._reopen()
                try:
                    return IndexedReader(self._demuxer(), stream, fps, self.budget, None).run(needed, convert)
                except Irregular:
                    stream = self._reopen()
            except Irregular:
                stream = self._reopen()
        return SequentialReader(self._demuxer(), stream, self.budget).run(needed, convert)

    def _check_cost(self, needed: list[int]) -> None:
        """Refuse a read whose decoding is predictably over the budget, before paying for it: where decoding every
        frame up to the last needed one could pass it, one demux pass (:mod:`.decode_plan`) tells how many frames
        the reader will decode: from the keyframes, or, for a decoder that drops the non-reference frames it does
        not need (B-frames), at least the reference frames on the way. Not for such a decoder whose references
        the packets do not tell (MPEG-2/MPEG-4 Part 2)."""
        if not needed:
            return
        w, h = self.info.width, self.info.height
        worst = needed[-1] + 1
        if self.budget.frames + worst <= self.limits.max_frames_decoded and \
                self.budget.pixels + worst * w * h <= self.limits.max_decoded_pixels:
            return
        cc = self.container.streams[self.stream_index].codec_context
        assert isinstance(cc, av.video.codeccontext.VideoCodecContext)  # the index was chosen among video streams
        skips_nonref = cc.name in NONREF_SKIPPABLE and cc.has_b_frames
        if skips_nonref and cc.name not in CHECKED_CODECS:
            return  # its packets do not tell which frames are references
        scan = self._scanned(references=skips_nonref)
        if not scan.keyframes:
            return
        frames = decoded_at_least(needed, scan) if skips_nonref else frames_to_decode(needed, scan.keyframes)
        if frames is not None:
            self.budget.check_predicted(frames, w, h)

    def frames(self, takes: Takes, convert: Callable[[av.VideoFrame], np.ndarray],
               start: int = 0) -> Iterator[Taken]:
        """The window mode: the video stream front to back, each packet once; the frames ``takes`` takes,
        converted, with how far they are settled (see :meth:`WindowWalk.walk`). Non-reference frames it does not take
        are not decoded; an irregular stream is read again from the start, counting frames (the readers' definition
        of an index either way). ``start``: no frame before it is taken, so one seek may skip there (a later part of
        the video); a seek that misses is read again without it. Packets and frames are counted against the budget."""
        stream = self.container.streams[self.stream_index]
        if self.info.fps > 0 and stream.time_base:
            gap = default_seek_gap(self.info.fps)
            for seek_to in ((start, 0) if start else (0,)):  # with the seek, then (if it missed) without
                try:
                    yield from WindowWalk(self._demuxer(), stream, self.info.fps, self.budget, takes, seek_to,
                                          gap).walk(convert)
                    return
                except SeekMissed:
                    stream = self._reopen()
                except Irregular:
                    stream = self._reopen()
                    break
        yield from count_frames(self._demuxer(), stream, self.budget, takes, convert)

    def _demuxer(self) -> "_Demuxer":
        """The container as the readers demux it (:func:`demux_packets`); after a checked rewind, it first yields
        the packet the check read."""
        lead, self._lead = self._lead, None
        return _Demuxer(self.container, lead)


def default_seek_gap(fps: float) -> int:
    """Frames ahead past which a reader seeks instead of decoding on: nearer, decoding on costs no more."""
    return max(64, int(5 * fps))


def _with_counted_frames(info: ClipInfo, n: int) -> ClipInfo:
    fps = info.fps
    return ClipInfo(n, fps, info.duration_s or (n / fps if fps > 0 else 0.0), info.width, info.height,
                    info.codec, info.container)


class _Demuxer:
    """The container as the readers demux it (:func:`demux_packets`); after a checked rewind its first ``demux``
    yields the packet the check read (``lead``)."""

    def __init__(self, container: av.container.InputContainer, lead: av.Packet | None) -> None:
        self.container = container
        self.lead = lead

    def demux(self, stream):
        lead, self.lead = self.lead, None
        return itertools.chain([] if lead is None else [lead], demux_packets(self.container, stream))

    def seek(self, *args, **kwargs) -> None:
        self.lead = None
        self.container.seek(*args, **kwargs)
