"""Server exceptions and the one function that turns any exception into a gRPC status."""

from __future__ import annotations

import logging

import grpc

from stadapter.bundle import BundleError
from stadapter.config import ConfigError
from stadapter.video import VideoError, VideoOutOfMemory

log = logging.getLogger("server")


class ServerError(Exception):
    code = grpc.StatusCode.INTERNAL


class BadRequest(ServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DecodeTimeout(BadRequest):
    """A clip's decode ran past the per-clip budget (``--decode-timeout-s``); its worker was killed."""


class DecoderCrashed(BadRequest):
    """The decoder worker died on this clip (segfault, abort); it was replaced."""


class TaskNotFound(ServerError):
    code = grpc.StatusCode.NOT_FOUND


class BrokenTask(ServerError):
    """A served task version whose bundle on disk turned out bad when its weights were first read.

    FAILED_PRECONDITION, not INVALID_ARGUMENT: the request is well formed and names a registered task; what is
    wrong is the server's stored copy, and the same request succeeds once an operator registers the task again
    (gRPC's rule: retry after the system's state is fixed). INVALID_ARGUMENT stays for what a client sent,
    a bad bundle on register included."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(ServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Draining(ServerError):
    code = grpc.StatusCode.UNAVAILABLE


class DecoderOutOfMemory(ServerError):
    """A decoder worker ran out of memory on a clip: the clip may be fine, the server was short."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(ServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StreamIdle(DeadlineExpired):
    """A client stream sent nothing for ``--stream-idle-timeout-s``. DEADLINE_EXCEEDED, not INVALID_ARGUMENT:
    nothing is wrong with what was sent, it did not arrive in time (the same call, sent promptly, works)."""


class Unauthenticated(ServerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServerError):
    code = grpc.StatusCode.PERMISSION_DENIED


_INVALID = (VideoError, BundleError, ConfigError)


# The server's deadline timer and ``time_remaining()`` (wall clock) disagree by a few milliseconds: a call grpc
# ended on its deadline can still report this much time left.
DEADLINE_SLACK_S = 0.05


def ended_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a client saw for a call that ended on the client's side (not by this server's answer): DEADLINE_EXCEEDED
    when the call's deadline is (all but) reached, else CANCELLED (a cancel, a closed channel or connection). The
    metrics and the access log both take it from here."""
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= DEADLINE_SLACK_S else grpc.StatusCode.CANCELLED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc`` (unexpected errors are logged, not leaked)."""
    if isinstance(exc, ServerError):
        return exc.code, str(exc)
    if isinstance(exc, VideoOutOfMemory):  # before VideoError: the clip may be fine, the server was short
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, _INVALID):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server is out of memory for this request"
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


# The HTTP status of each gRPC code this server answers with (the HTTP endpoints, server.frontends.http); the body is
# {"error": message}, as the Open Inference Protocol's REST form says.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # as Google's API design maps it; before INVALID_ARGUMENT, which a
    grpc.StatusCode.INVALID_ARGUMENT: 400,  # reverse look-up of 400 (the access log's fallback) then finds
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_for(exc: BaseException) -> tuple[int, grpc.StatusCode, str]:
    """The HTTP status, the gRPC code (the metrics' ``code`` label) and the message for ``exc``."""
    code, message = status_for(exc)
    return HTTP_STATUS.get(code, 500), code, message
