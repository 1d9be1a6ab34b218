"""A clip whose header gives no duration: whether it runs past the duration limit, told by one seek.

Such a clip's frames are counted (``Clip._count_packets``), and the count stops one frame past the limit, but
each packet is Python work: at a 1-hour limit and 25 fps that is 90,000 packets before a long clip is refused. A
seek to the limit's timestamp is the demuxer's own work. So once :data:`PROBE_PACKETS` are counted, a second
opening of the clip seeks there: a packet stamped at or just past the limit (within :data:`SLACK` of it, so the
timeline runs on there rather than jumping over it, as a clip whose pts jump by 1e9 s does) shows that the clip
runs past it. A seek that fails, lands elsewhere, or would read more bytes than counting to the limit would
(at the density seen so far, twice over: :class:`CappedReader`) shows nothing, and the count goes on.
"""

from __future__ import annotations

import io
import os
from typing import Optional

import av

from .limits import Source
from .screen import NO_DECODER

PROBE_PACKETS = 4096  # counted before a seek is tried (at most a quarter of the frames the limit allows)
SLACK = 0.1  # how far past the limit (a fraction of it) a landing may be and still show the timeline runs on
_READ_ALLOWANCE = 2  # the seek may read this many times the bytes counting to the limit would


class ReadCapReached(Exception):
    """A read past a :class:`CappedReader`'s cap."""


class CappedReader(io.RawIOBase):
    """The clip's bytes (a view, not a copy, or an open file), failing reads once ``cap`` bytes were read."""

    def __init__(self, source: Source, cap: int) -> None:
        super().__init__()
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._view: Optional[memoryview] = memoryview(source).cast("B")
            self._file = None
        else:
            self._view, self._file = None, open(os.fspath(source), "rb")  # noqa: SIM115 (closed by close())
        self._pos, self.cap, self.read_bytes = 0, cap, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.read_bytes >= self.cap:
            raise ReadCapReached
        if self._file is not None:
            n = self._file.readinto(b)
        else:
            assert self._view is not None
            chunk = self._view[self._pos:self._pos + len(b)]
            n = len(chunk)
            memoryview(b).cast("B")[:n] = chunk
            self._pos += n
        self.read_bytes += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self._file is not None:
            return self._file.seek(offset, whence)
        assert self._view is not None
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._file.tell() if self._file is not None else self._pos

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def landing_past_limit(source: Source, options: dict[str, str], stream_index: int, first_pts: int, limit_s: float,
                       bytes_counted: int, frames_counted: int, frames_allowed: int) -> Optional[float]:
    """Seconds after the first frame of the packet a seek to ``limit_s`` lands on, when that shows the clip runs
    past the limit (``limit_s`` <= t <= ``limit_s`` * (1 + SLACK)); else None. ``bytes_counted`` bytes held the
    first ``frames_counted`` of at most ``frames_allowed`` frames: they set the seek's read allowance. The clip is
    opened with the demuxer ``options`` and no decoder (nothing is decoded here)."""
    if bytes_counted <= 0 or frames_counted <= 0:
        return None
    cap = _READ_ALLOWANCE * bytes_counted * frames_allowed // frames_counted
    reader = CappedReader(source, cap)
    try:
        with av.open(reader, mode="r", container_options={**options, "codec_whitelist": NO_DECODER}) as container:
            stream = container.streams[stream_index]
            if not stream.time_base:
                return None
            tb = float(stream.time_base)
            container.seek(first_pts + int(limit_s / tb), backward=False, any_frame=False, stream=stream)
            packet = next((p for p in container.demux(stream) if p.size and p.pts is not None), None)
    except (ReadCapReached, av.FFmpegError, OSError, EOFError, ValueError, IndexError, StopIteration):
        return None
    finally:
        reader.close()
    if packet is None or packet.pts is None:
        return None
    t = (packet.pts - first_pts) * tb
    return t if limit_s <= t <= limit_s * (1 + SLACK) else None
