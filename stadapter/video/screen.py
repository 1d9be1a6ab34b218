"""Frame sizes checked before FFmpeg decodes anything: a first open in which no decoder may run.

``av.open`` runs ``avformat_find_stream_info``, which decodes the first frame of every stream whose
header leaves something unknown. Our options (``max_pixels``) reach those decoders only for streams
the container declares before that (MP4, Matroska); a stream that appears with its first packet
(FLV, MPEG-TS, MPEG-PS) is decoded with no size limit, and an H.264 decoder allocates its
per-macroblock tables for whatever size its parameter set says before any limit is checked. So a
clip is first opened with a decoder whitelist that no decoder matches: the sizes the container and
FFmpeg's parsers declare are checked, and a video stream whose size only its decoder knows has its
first frame decoded here by a decoder that carries the limit, before the real open decodes it.
"""

from __future__ import annotations

import av

from .limits import Budget, VideoError, VideoLimits
from .readers import demux_packets

NO_DECODER = "stadapter-no-decoder"  # a decoder whitelist no decoder is on
SCREEN_BYTES = 5_000_000  # packet bytes read for the first frames: FFmpeg's own probesize


def screen_frame_sizes(container: av.container.InputContainer, limits: VideoLimits) -> None:
    """Refuse a video stream whose declared (or first decoded) frame is over ``limits.max_pixels``.

    ``container`` was opened with ``codec_whitelist=NO_DECODER``, so nothing has been decoded yet.
    """
    budget = Budget(limits)
    unknown = []
    for stream in container.streams.video:
        cc = stream.codec_context
        if cc is None:
            continue
        if cc.width > 0 and cc.height > 0:
            if cc.width * cc.height > limits.max_pixels:
                raise VideoError(f"frame size {cc.width}x{cc.height} = {cc.width * cc.height} pixels is over "
                                 f"the limit of {limits.max_pixels}")
        else:
            cc.options = {"max_pixels": str(limits.decoder_max_pixels())}
            unknown.append(stream)
    if unknown:
        _first_frames(container, unknown, budget)


def _first_frames(container: av.container.InputContainer, streams: list, budget: Budget) -> None:
    """Decode until each stream has output a frame (its size checked) or it refused a frame over the limit; a
    stream whose first ``SCREEN_BYTES`` yield no frame is refused, as the real open would leave it without a size."""
    waiting = {s.index: s for s in streams}
    read = 0
    for packet in demux_packets(container, list(waiting.values())):
        budget.packet()
        stream = waiting.get(packet.stream_index)
        if stream is None:
            continue
        read += packet.size
        cc = stream.codec_context
        try:
            frames = cc.decode(packet if packet.size else None)
        except (av.FFmpegError, EOFError):
            budget.check_size(cc.coded_width or cc.width, cc.coded_height or cc.height)
            frames = []
        for f in frames:
            budget.check_size(f.width, f.height)
        if frames:
            del waiting[stream.index]
            if not waiting:
                return
        if read > SCREEN_BYTES:
            break
    raise VideoError(f"video stream has no frame size: its first frames do not decode (the clip is corrupt, or "
                     f"its first frame is over the limit of {budget.limits.max_pixels} pixels)")
