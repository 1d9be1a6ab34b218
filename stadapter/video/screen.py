"""Frame sizes checked before FFmpeg decodes anything unbounded: a first open in which no decoder may run.

``av.open`` runs ``avformat_find_stream_info``, which decodes the first frames of every stream whose
header leaves something unknown. Our options (``max_pixels``) reach those decoders only for streams
the container declares in its header (MP4, Matroska...); a demuxer that declares its streams as their
packets come (FLV, MPEG-TS, MPEG-PS: ``LATE_STREAM_FORMATS``) has them decoded with no size limit,
whatever size the container or the first parameter set announced. So a clip is first opened with a
decoder whitelist that no decoder matches: the sizes the container and FFmpeg's parsers declare are
checked, and in those formats every video stream has the frames ``avformat_find_stream_info`` would
decode decoded here first, by a decoder that carries the limit.
"""

from __future__ import annotations

from typing import Any, Callable

import av

from .limits import Budget, VideoError, VideoLimits
from .readers import demux_packets

NO_DECODER = "stadapter-no-decoder"  # a decoder whitelist no decoder is on
LATE_STREAM_FORMATS = frozenset({"flv", "mpegts", "mpeg"})  # streams created by packets (AVFMTCTX_NOHEADER)
SCREEN_BYTES = 5_000_000  # packet bytes read for the first frames: FFmpeg's own probesize
# Frames avformat_find_stream_info may decode per stream: one gives the size and pixel format; for H.264 it decodes
# up to 20 to guess the reorder delay when the parameter sets do not state it.
FIRST_FRAMES = {"h264": 20}


def check_stream_count(container: av.container.InputContainer, limits: VideoLimits) -> None:
    if len(container.streams) > limits.max_streams:
        # the demuxer stops at max_streams + 1 (see container.open_options): the real count may be higher
        raise VideoError(f"clip has at least {len(container.streams)} streams, over the limit of {limits.max_streams}")


def open_screened(first: Any, then: Callable[[], Any], options: dict[str, str], codec_options: dict[str, str],
                  limits: VideoLimits) -> av.container.InputContainer:
    """``av.open`` of a clip whose stream count and frame sizes were checked first, in an opening of ``first``
    with no decoder allowed; ``then()`` gives what the real opening reads (the same bytes again). ``options``,
    ``codec_options``: the demuxer's and decoders' (FFmpeg's own limits). FFmpeg's errors pass through: each
    caller words them for its input."""
    with av.open(first, mode="r", container_options={**options, "codec_whitelist": NO_DECODER},
                 options=codec_options) as screened:
        check_stream_count(screened, limits)
        screen_frame_sizes(screened, limits)
    return av.open(then(), mode="r", container_options=options, options=codec_options)


def screen_frame_sizes(container: av.container.InputContainer, limits: VideoLimits) -> None:
    """Refuse a video stream whose declared (or first decoded) frame is over ``limits.max_pixels``.

    ``container`` was opened with ``codec_whitelist=NO_DECODER``, so nothing has been decoded yet.
    """
    late = container.format.name in LATE_STREAM_FORMATS
    wanted: dict[int, int] = {}  # stream index -> frames to decode here
    for stream in container.streams.video:
        cc = stream.codec_context
        if cc is None:
            continue
        if cc.width * cc.height > limits.max_pixels:
            raise VideoError(f"frame size {cc.width}x{cc.height} = {cc.width * cc.height} pixels is over "
                             f"the limit of {limits.max_pixels}")
        if late:
            cc.options = {"max_pixels": str(limits.decoder_max_pixels())}
            wanted[stream.index] = FIRST_FRAMES.get(cc.name, 1)
    if wanted:
        _first_frames(container, wanted, Budget(limits))


def _first_frames(container: av.container.InputContainer, wanted: dict[int, int], budget: Budget) -> None:
    """Decode each stream's first ``wanted`` frames under the limit (a frame over it is refused by FFmpeg before it
    is allocated, and named here); a stream whose first ``SCREEN_BYTES`` yield no frame is refused, as it may hide
    a frame only an unlimited decoder would decode."""
    streams = {s.index: s for s in container.streams.video if s.index in wanted}
    decoded = dict.fromkeys(streams, 0)
    read = 0
    for packet in demux_packets(container, list(streams.values())):
        budget.packet()
        index = packet.stream_index
        if decoded.get(index, -1) < 0 or decoded[index] >= wanted[index]:
            continue
        read += packet.size
        cc = streams[index].codec_context
        budget.check_parameter_sets(cc, packet)
        try:
            frames = cc.decode(packet if packet.size else None)
        except (av.FFmpegError, EOFError):
            budget.check_size(cc.coded_width or cc.width, cc.coded_height or cc.height)
            frames = []
        for f in frames:
            budget.check_size(f.width, f.height)
        decoded[index] += len(frames)
        if all(decoded[i] >= wanted[i] for i in decoded) or read > SCREEN_BYTES:
            break
    if any(n == 0 for n in decoded.values()):
        raise VideoError(f"video stream has no frame size: its first frames do not decode (the clip is corrupt, or "
                         f"its first frame is over the limit of {budget.limits.max_pixels} pixels)")
