"""A live stream's chunks for ClassifyLive: from bytes, an iterable of chunks, a file path, a binary file object or a
URL (:class:`~.live_remux.LiveURL`, or a ``str`` with a network scheme: opened here with PyAV and remuxed, see
:mod:`.live_remux`).

The first message names the tasks and the windows (it carries no bytes); the others carry the stream's bytes
as they come. ``realtime`` paces a file as it would play: each chunk ends where a video packet starts (its
byte position, read with PyAV on this side, nothing decoded) and is sent at that packet's presentation time,
so a recorded file behaves like a camera. Without it a file goes as fast as the server takes it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Optional, Union, cast

import grpc

from stadapter_api.v1 import inference_pb2 as pb

from .core import ClientError, Tasks, sampling_overrides, task_fields
from .live_remux import LiveURL, is_url, remuxed_chunks

LiveSource = Union[bytes, bytearray, memoryview, str, os.PathLike, IO[bytes], Iterable[bytes], LiveURL]
LIVE_CHUNK_BYTES = 64 * 1024  # a file or a byte string is sent in chunks this large (within the server's limit)


def live_messages(task: Tasks, source: LiveSource, window_s: float, stride_s: float, top_k: int = 0,
                  sampling: Optional[Mapping[str, Any]] = None, request_id: str = "", realtime: bool = False,
                  chunk_bytes: int = LIVE_CHUNK_BYTES) -> Iterator[pb.LiveChunk]:
    """The messages of one ClassifyLive call (see the module docstring)."""
    if not (window_s > 0 and stride_s > 0):
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"window_s and stride_s must be > 0 seconds, got {window_s!r} and {stride_s!r}", local=True)
    fields = task_fields(task)
    yield pb.LiveChunk(window_s=window_s, stride_s=stride_s, top_k=top_k, sampling=sampling_overrides(sampling),
                       request_id=request_id, **fields)
    for data in live_chunks(source, realtime, chunk_bytes):
        if data:
            yield pb.LiveChunk(data=data)


class LiveMessages:
    """The messages of one call, taken by gRPC (its own thread, or the event loop): a failure of the source (a file
    that cannot be read, a URL that cannot be opened or fails mid-way) ends the messages (the server answers
    what it had) and is kept in :attr:`error` for the caller to raise; raised into gRPC it would become an
    ``UNKNOWN: Exception iterating requests!`` and a logged traceback."""

    def __init__(self, messages: Iterator[pb.LiveChunk]) -> None:
        self.messages = messages
        self.error: Optional[ClientError] = None

    def __iter__(self) -> "LiveMessages":
        return self

    def raise_failure(self) -> None:
        """Raise the source's failure, if it failed (in place of the server's error, which that failure caused)."""
        if self.error is not None:
            raise self.error from None

    def __next__(self) -> pb.LiveChunk:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self.messages)
        except StopIteration:
            raise
        except ClientError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - the source's own failure, told to the caller
            self.error = ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"the live source failed: {e}", local=True)
        raise StopIteration


def live_chunks(source: LiveSource, realtime: bool = False, chunk_bytes: int = LIVE_CHUNK_BYTES) -> Iterator[bytes]:
    """The stream's bytes in chunks, paced at real time with ``realtime`` (a file path or a URL only)."""
    if isinstance(source, LiveURL) or is_url(source):
        yield from remuxed_chunks(source if isinstance(source, LiveURL) else LiveURL(str(source)), realtime)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if realtime:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "realtime pacing needs a file path or a URL", local=True)
        view = memoryview(source)
        for i in range(0, len(view), chunk_bytes):
            yield bytes(view[i:i + chunk_bytes])
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if realtime:
            yield from _paced(path)
            return
        try:
            with path.open("rb") as f:
                yield from _read_all(f, chunk_bytes)
        except OSError as e:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read {path}: {e.strerror or e}",
                              local=True) from e
    elif hasattr(source, "read"):
        if realtime:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "realtime pacing needs a file path or a URL", local=True)
        yield from _read_all(cast(IO[bytes], source), chunk_bytes)
    else:
        for chunk in source:
            yield bytes(chunk)


def _read_all(f: IO[bytes], chunk_bytes: int) -> Iterator[bytes]:
    """A file object's bytes as they come: ``read1`` gives what a pipe holds now instead of waiting for a full
    chunk (stdin fed by an encoder)."""
    read = getattr(f, "read1", f.read)
    while True:
        data = read(chunk_bytes)
        if not data:
            return
        yield data


def _paced(path: Path) -> Iterator[bytes]:
    """The file in chunks that end where a video packet starts, each sent at that packet's presentation time."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - the SDK's extra
        raise ClientError(grpc.StatusCode.FAILED_PRECONDITION, "--realtime needs PyAV (pip install av)",
                          local=True) from e
    marks: list[tuple[int, float]] = []  # (byte position, seconds from the first packet)
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            first = None
            for packet in c.demux(stream):
                if packet.pos is None or packet.pos < 0 or packet.pts is None:
                    continue
                t = float(packet.pts * (stream.time_base or 0))
                first = t if first is None else first
                marks.append((packet.pos, max(0.0, t - first)))
    except (av.FFmpegError, IndexError, OSError) as e:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read {path} for realtime pacing: {e}",
                          local=True) from e
    data = path.read_bytes()
    start, sent = time.monotonic(), 0
    for pos, at in sorted(marks, key=lambda m: m[1]):
        if pos <= sent:
            continue
        wait = start + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        yield data[sent:pos]
        sent = pos
    if sent < len(data):
        yield data[sent:]
