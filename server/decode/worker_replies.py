"""The decoder workers' failure replies: one mapping from an exception to the message a worker sends back.

A decode (one clip, or a window job) that fails on the clip's content answers ``("error", VideoError)``;
out of memory answers ``("oom", message)`` (RESOURCE_EXHAUSTED in the parent); anything else that
breaks on the clip is the clip's fault too (INVALID_ARGUMENT), never INTERNAL.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from stadapter.video import VideoError

MAX_MESSAGE_CHARS = 500  # an exception's text, cut: it reaches the client


def failure_reply(e: Exception) -> tuple:
    if isinstance(e, MemoryError):
        return ("oom", str(e))
    if isinstance(e, VideoError):
        return ("error", e)
    return ("error", VideoError(f"the decoder failed on this clip ({type(e).__name__}: {e})"[:MAX_MESSAGE_CHARS]))


def send_reply(conn: Connection, reply: tuple) -> None:
    """Send ``reply``; an error that does not pickle is sent as its message. A closed pipe propagates."""
    try:
        conn.send(reply)
    except (EOFError, OSError):
        raise
    except Exception:  # noqa: BLE001 - an exception that does not pickle: keep its message
        conn.send(("error", VideoError(str(reply[1]))))
