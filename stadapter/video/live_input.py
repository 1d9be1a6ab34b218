"""A live stream's bytes as PyAV reads them: a blocking, forward-only file object fed chunk by chunk.

A live stream cannot be opened twice as a clip is (the frame-size screen opens it with no decoder first,
:mod:`.screen`), nor rewound. :class:`ChunkReader` hands PyAV the chunks as they come (``next_chunk`` blocks
until one does; ``b""`` is the end). :class:`HeadTape` records what the screening open read (bounded by
``max_bytes``) so the second open replays it and then goes on with the live bytes: both opens see the same
stream, and only its head is ever held twice.

A non-fragmented MP4 whose index (``moov``) comes after its media (``mdat``) cannot be read as it grows:
:func:`check_growable` refuses it from its first box headers, before FFmpeg reads on to the end.
"""

from __future__ import annotations

import struct
import time
from typing import Callable

from .limits import VideoError

MP4_BOXES = frozenset({b"ftyp", b"styp", b"free", b"skip", b"wide", b"pdin", b"uuid", b"sidx", b"prft"})


class ChunkReader:
    """``read(n)``: up to ``n`` bytes of what has come (a short read rather than a wait, once anything is here);
    blocks on ``next_chunk`` only when nothing is. ``chunks``: the chunks taken so far (the caller maps the count
    to when the last one arrived); ``waited_s``: the time spent waiting for bytes (not decoding)."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self.next_chunk = next_chunk
        self.buf = memoryview(b"")
        self.chunks = 0
        self.bytes = 0
        self.waited_s = 0.0
        self.ended = False

    def read(self, n: int = -1) -> bytes:
        while not self.buf and not self.ended:
            t0 = time.monotonic()
            chunk = self.next_chunk()
            self.waited_s += time.monotonic() - t0
            if not chunk:
                self.ended = True
                break
            self.chunks += 1
            self.bytes += len(chunk)
            self.buf = memoryview(chunk)
        n = len(self.buf) if n is None or n < 0 else n
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out


class HeadTape:
    """The stream's head, recorded while ``recording`` (up to ``max_bytes``), then replayed once by
    :meth:`replay` before the live bytes."""

    def __init__(self, reader: ChunkReader, max_bytes: int) -> None:
        self.reader, self.max_bytes = reader, max_bytes
        self.tape = bytearray()
        self.pos = 0  # the next byte a read gives, counted from the stream's start
        self.recording = True

    def read(self, n: int = -1) -> bytes:
        if self.pos < len(self.tape):
            end = len(self.tape) if n is None or n < 0 else min(len(self.tape), self.pos + n)
            out = bytes(self.tape[self.pos:end])
        else:
            out = self.reader.read(n)
            if self.recording:
                if len(self.tape) + len(out) > self.max_bytes:
                    raise VideoError(f"the stream's first frames were not found in its first {self.max_bytes} bytes: "
                                     "it is corrupt, or not a video stream")
                self.tape += out
        self.pos += len(out)
        return out

    def peek(self, n: int) -> bytes:
        """The stream's first ``n`` bytes (fewer if it ends first), recorded; the position stays."""
        while len(self.tape) < n and not self.reader.ended:
            more = self.reader.read(n - len(self.tape))
            if len(self.tape) + len(more) > self.max_bytes:
                raise VideoError(f"the stream's head is over {self.max_bytes} bytes before its first frames")
            self.tape += more
        return bytes(self.tape[:n])

    def replay(self) -> "HeadTape":
        """From the start again; what was recorded is given once more, then recording stops (and the tape is
        dropped once read past)."""
        self.pos, self.recording = 0, False
        return self

    def release(self) -> None:
        """Drop the tape once the reads are past it (the live bytes need no copy)."""
        if not self.recording and self.pos >= len(self.tape):
            self.tape = bytearray()
            self.pos = 0


def check_growable(tape: HeadTape, most_boxes: int = 16) -> None:
    """Refuse an ISO MP4 (``ftyp`` first) whose top-level ``mdat`` comes before its ``moov``: its index is at the
    end, so no frame can be placed until the whole file has come. A fragmented MP4 (``moov`` first, then
    ``moof``/``mdat`` fragments) and any other container pass."""
    head = tape.peek(8)
    if len(head) < 8 or head[4:8] != b"ftyp":
        return
    offset = 0
    for _ in range(most_boxes):
        header = tape.peek(offset + 16)[offset:]
        if len(header) < 8:
            return  # the stream ends within its head: the demuxer says what is wrong
        size, kind = struct.unpack(">I4s", header[:8])
        if kind == b"moov":
            return
        if kind == b"mdat" or kind == b"moof":
            if kind == b"mdat":
                raise VideoError("the stream is an MP4 whose index (moov) comes at its end, after the media: it "
                                 "cannot be read as it arrives. Send it as a whole clip (ClassifyWindows or "
                                 "ClassifyWindowsStream), or remux it fragmented (ffmpeg -movflags "
                                 "frag_keyframe+empty_moov)")
            return
        if kind not in MP4_BOXES:
            return
        if size == 1:
            if len(header) < 16:
                return
            size = struct.unpack(">Q", header[8:16])[0]
        if size < 8:
            return
        offset += size
        if offset > tape.max_bytes:
            return


def chunk_source(chunks: list[bytes]) -> Callable[[], bytes]:
    """``next_chunk`` over a list (tests, the thread path): each chunk in turn, then ``b""``."""
    it = iter(chunks)

    def next_chunk() -> bytes:
        return next(it, b"")

    return next_chunk


__all__ = ["ChunkReader", "HeadTape", "check_growable", "chunk_source"]
