"""A live source the client opens itself (RTSP, RTMP, SRT, HLS, UDP, TCP, a capture device): its video packets
remuxed, never decoded, into MPEG-TS bytes for ClassifyLive.

The server takes bytes only and never opens a URL (its demuxer's protocol whitelist is ``file`` on a file object
it is handed, and its container whitelist has no playlist format), so a camera's URL is opened here, on the
client's side, with PyAV. Only the first video stream is carried; audio and data streams are left out.

MPEG-TS is the container written: it is made for streams (no index, no header to go back to) and carries the
codecs live sources use (H.264, HEVC, MPEG-2, MPEG-4); the muxer writes each packet whole as it is muxed and
flushes (``flush_packets``), so each chunk yielded is that packet, sent as soon as the source gave it: a live
source paces the stream itself. A codec MPEG-TS cannot carry (VP8, VP9, AV1 ...) goes in Matroska, whose
clusters are cut at every packet (its default holds up to a second). (The server's demuxer hands an MPEG-TS video
packet on only once the next two have begun, as FFmpeg's muxer leaves the packet length out; Matroska's muxer
writes a packet's cluster when the next packet comes, and its demuxer then hands it on at once: one packet
sooner in all.) A source silent for ``read_timeout_s`` after its first packet (UDP has no end of its own) has
ended: the stream is half-closed and its last windows answered. ``realtime`` paces a source that is not live (an
HLS VOD playlist, a file) by its packets' presentation times, as it would play.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import grpc

from .core import ClientError

URL_SCHEME = re.compile(r"^(rtsps?|rtmp[est]?|srt|https?|udp|tcp|rtp|hls\+https?):\/\/", re.IGNORECASE)
TS_CODECS = frozenset({"h264", "hevc", "mpeg2video", "mpeg1video", "mpeg4"})  # MPEG-TS carries these (video)


@dataclass(frozen=True)
class LiveURL:
    """A source opened with PyAV on the client's side (see the module docstring).

    Args:
        url: anything FFmpeg opens: ``rtsp://...``, ``srt://...``, ``https://.../index.m3u8``, a device path.
        input_format: FFmpeg's input format when it cannot be guessed (``v4l2`` for ``/dev/video0``).
        options: demuxer and protocol options (``{"rtsp_transport": "tcp"}``).
        open_timeout_s: the longest wait to open it; read_timeout_s: the longest wait for its next packet.
    """

    url: str
    input_format: Optional[str] = None
    options: Mapping[str, str] = field(default_factory=dict)
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0


def is_url(source: Any) -> bool:
    """A ``str`` source with a network scheme (a ``Path`` is always a file)."""
    return isinstance(source, str) and URL_SCHEME.match(source) is not None


def remuxed_chunks(source: LiveURL, realtime: bool = False) -> Iterator[bytes]:
    """The source's video stream as MPEG-TS (or Matroska) bytes, one chunk per packet as the source gives it."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - the SDK's extra
        raise ClientError(grpc.StatusCode.FAILED_PRECONDITION, "a URL source needs PyAV (pip install av)",
                          local=True) from e
    try:
        inp = av.open(source.url, format=source.input_format, options=dict(source.options),
                      timeout=(source.open_timeout_s, source.read_timeout_s))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot open the live source {source.url}: {e}",
                          local=True) from e
    try:
        if not inp.streams.video:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"the live source {source.url} has no video stream",
                              local=True)
        yield from _remux(av, inp, inp.streams.video[0], source.url, realtime)
    finally:
        inp.close()


class _Collected:
    """The muxer's output: what it wrote since the last :meth:`take`."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _remux(av: Any, inp: Any, video: Any, url: str, realtime: bool) -> Iterator[bytes]:
    sink = _Collected()
    ts = video.codec_context.name in TS_CODECS
    options = {"flush_packets": "1"} if ts else {"flush_packets": "1", "cluster_time_limit": "0", "live": "1"}
    out = av.open(sink, "w", format="mpegts" if ts else "matroska", options=options)
    try:
        carried = out.add_stream_from_template(video)
        start, first, sent = time.monotonic(), None, 0
        try:
            for packet in inp.demux(video):
                if packet.size == 0 or (packet.pts is None and packet.dts is None):
                    continue  # the demuxer's flush packet, or one with no time to place it by
                if realtime and packet.pts is not None and video.time_base:
                    at = float(packet.pts * video.time_base)
                    first = at if first is None else first
                    wait = start + (at - first) - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                packet.stream = carried
                out.mux(packet)
                sent += 1
                data = sink.take()
                if data:
                    yield data
        except av.ExitError as e:  # no packet for read_timeout_s: a source with no end of its own (UDP) ended
            if sent == 0:
                raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"the live source {url} sent no video packet "
                                  f"in its read timeout: {e}", local=True) from e
        except av.FFmpegError as e:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"the live source {url} failed: {e}",
                              local=True) from e
    finally:
        out.close()
    tail = sink.take()
    if tail:
        yield tail
