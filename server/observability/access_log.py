"""One access line per request, and request ids: a ``grpc.aio`` interceptor and an aiohttp middleware.

The request id is the client's ``x-request-id`` (gRPC metadata, or the HTTP header) when it is a
token of at most 128 printable ASCII characters (RFC 9110 ``tchar``); else the request message's own
id field (``ClassifyRequest.request_id``, the first ``ClassifyChunk``'s, OIP ``ModelInferRequest.id``)
when that is one; else a new uuid4 hex. Anything else a client sent is never written to the log or
to metadata. The id goes back as gRPC trailing metadata ``x-request-id`` (on success and on error)
or the HTTP response header ``X-Request-Id``, and is on the access line and on every log record made
while the request is served (:func:`server.observability.logs.current_request_id`).

The access line (logger ``server.access``, INFO; health checks, OIP ServerLive/ServerReady, the HTTP
health endpoints and reflection at DEBUG, so probes do not flood the log) holds the protocol, the
method, the task(s) named by the request (client text, made printable and cut), the final status (for
a gRPC call, the code ``stadapter_requests_total`` counted it with; for a call the client ended, the code
the client saw: CANCELLED or DEADLINE_EXCEEDED), the milliseconds until the handler returned, and the
bytes in and out: message sizes for gRPC (requests as received; the messages a handler sends with
``context.write`` are not counted), body bytes for HTTP.
Tokens and clip bytes are never logged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

import grpc
from aiohttp import web

from server.errors import HTTP_STATUS, ended_code
from server.observability.logs import RequestScope, request_scope
from stadapter_api.v1 import inference_pb2 as pb

log = logging.getLogger("server.access")

REQUEST_ID_KEY = "x-request-id"  # gRPC metadata keys are lower case; HTTP headers match case-insensitively
REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 128
MAX_LOGGED_TASKS = 16  # names on one access line (a several-task request names more: "+N")
MAX_TASK_CHARS = 64
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_UNPRINTABLE = re.compile(r"[^!-~]")

QUIET_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
QUIET_GRPC_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})
QUIET_HTTP_ROUTES = frozenset({"/v2/health/live", "/v2/health/ready"})

# The fields naming the task(s) of a request, by message type; BatchClassifyRequest: its items'.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    pb.ClassifyRequest.DESCRIPTOR.full_name: ("task", "tasks"),
    pb.ClassifyChunk.DESCRIPTOR.full_name: ("task", "tasks"),  # the first chunk
    pb.ClassifyWindowsRequest.DESCRIPTOR.full_name: ("task",),
    pb.ClassifyWindowsChunk.DESCRIPTOR.full_name: ("task",),  # the first chunk
    pb.LiveChunk.DESCRIPTOR.full_name: ("task", "tasks"),  # the first chunk
    pb.DescribeTaskRequest.DESCRIPTOR.full_name: ("task",),
    pb.UnregisterTaskRequest.DESCRIPTOR.full_name: ("task",),
    "inference.ModelInferRequest": ("model_name",),
    "inference.ModelMetadataRequest": ("name",),
    "inference.ModelReadyRequest": ("name",),
    "inference.ModelConfigRequest": ("name",),
    "inference.ModelStatisticsRequest": ("name",),
    "inference.RepositoryModelLoadRequest": ("model_name",),
    "inference.RepositoryModelUnloadRequest": ("model_name",),
}
# The field holding the client's own request id, by message type (used when no valid x-request-id came).
ID_FIELDS: dict[str, str] = {
    pb.ClassifyRequest.DESCRIPTOR.full_name: "request_id",
    pb.ClassifyChunk.DESCRIPTOR.full_name: "request_id",
    pb.ClassifyWindowsRequest.DESCRIPTOR.full_name: "request_id",
    pb.ClassifyWindowsChunk.DESCRIPTOR.full_name: "request_id",
    "inference.ModelInferRequest": "id",
}
_BATCH = pb.BatchClassifyRequest.DESCRIPTOR.full_name
_REGISTERED = pb.RegisterTaskResponse.DESCRIPTOR.full_name  # the task is known from the response
_HTTP_CODES = {status: code.name for code, status in HTTP_STATUS.items()}


def valid_request_id(value: object) -> Optional[str]:
    """``value`` when it is a request id this server repeats (a token of 1-128 printable ASCII chars), else None."""
    if isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_CHARS and _TOKEN.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


def safe_text(value: str, limit: int = MAX_TASK_CHARS) -> str:
    """Client text fit for a log line: at most ``limit`` chars, each printable ASCII (others become ``?``)."""
    text = _UNPRINTABLE.sub("?", value[:limit])
    return text if len(value) <= limit else f"{text}...({len(value)} chars)"


def adopt_request_id(value: str) -> str:
    """Offer the request being served its message's own id (e.g. a form field): taken when it is valid and the
    client sent no valid ``x-request-id``. Returns the id in force, "" outside a request. (gRPC calls do
    this themselves with the first request message; see ``ID_FIELDS``.)"""
    rec = request_scope.get()
    if not isinstance(rec, AccessRecord):
        return ""
    if not rec.client_id:
        rec.request_id = valid_request_id(value) or rec.request_id
    return rec.request_id


def note_code(code: str) -> None:
    """The status code the request being served was counted with in the metrics (the data plane's request scope,
    ``server.dataplane.scope``): its access line reports the same code. No-op outside a request."""
    rec = request_scope.get()
    if isinstance(rec, AccessRecord):
        rec.noted_code = code


class AccessRecord(RequestScope):
    """One request's access line, filled in while it is served."""

    __slots__ = ("protocol", "method", "level", "client_id", "tasks", "more_tasks", "code", "noted_code", "http_status",
                 "bytes_in", "bytes_out", "ms", "_t0")

    def __init__(self, protocol: str, method: str, level: int, client_id: Optional[str]):
        super().__init__(client_id or new_request_id())
        self.protocol = protocol
        self.method = method
        self.level = level
        self.client_id = client_id is not None  # the id came from x-request-id: the message's field does not win
        self.tasks: list[str] = []
        self.more_tasks = 0
        self.code = "OK"
        self.noted_code: Optional[str] = None  # the code the request's metrics counted (see note_code)
        self.http_status: Optional[int] = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.ms = 0.0
        self._t0 = time.perf_counter()

    def add_tasks(self, names) -> None:
        for name in names:
            if not name:
                continue
            text = safe_text(name)
            if text in self.tasks:
                continue
            if len(self.tasks) < MAX_LOGGED_TASKS:
                self.tasks.append(text)
            else:
                self.more_tasks += 1

    def task_list(self) -> list[str]:
        return self.tasks + [f"+{self.more_tasks}"] if self.more_tasks else self.tasks

    def fields(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "method": self.method, "tasks": self.task_list(), "code": self.code,
                "http_status": self.http_status, "ms": round(self.ms, 3), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out}

    def finish(self, code: str, http_status: Optional[int] = None) -> None:
        self.ms = (time.perf_counter() - self._t0) * 1e3
        self.code = code
        self.http_status = http_status
        if log.isEnabledFor(self.level):
            status = f" status={http_status}" if http_status is not None else ""
            args = (self.protocol, self.method, ",".join(self.task_list()) or "-", code, status, self.ms, self.bytes_in,
                    self.bytes_out)
            # makeRecord + handle: Logger.log without the caller lookup (a stack walk per line; no format prints it)
            log.handle(log.makeRecord(log.name, self.level, __file__, 0, _LINE, args, None,
                                      extra={"access": self, "request_id": self.request_id}))


_LINE = "%s %s tasks=%s code=%s%s ms=%.1f in=%d out=%d"


# --- gRPC ------------------------------------------------------------------------------------------------


def _message_tasks(msg: Any) -> list[str]:
    name = msg.DESCRIPTOR.full_name
    if name == _BATCH:
        return [t for item in msg.requests for t in _message_tasks(item)]
    if name == _REGISTERED:
        return [msg.task.name]
    out: list[str] = []
    for field in TASK_FIELDS.get(name, ()):
        value = getattr(msg, field)
        out.extend([value] if isinstance(value, str) else value)
    return out


def _metadata_id(metadata: Optional[Sequence[tuple[str, Any]]]) -> Optional[str]:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return valid_request_id(value)
    return None


class _GrpcCall:
    """What the interceptor does with one call's context and the messages it sees."""

    __slots__ = ("rec", "context", "seen_request")

    def __init__(self, context: grpc.aio.ServicerContext, method: str, level: int):
        rec = request_scope.get()
        if not isinstance(rec, AccessRecord):  # not begun by intercept_service (grpc.aio shares its context)
            rec = AccessRecord("grpc", method, level, _metadata_id(context.invocation_metadata()))
            request_scope.set(rec)
        self.rec = rec
        self.context = context
        self.seen_request = False
        context.set_trailing_metadata(((REQUEST_ID_KEY, rec.request_id),))  # abort() keeps it too

    def request(self, msg: Any) -> None:
        """The first request message: its task(s), and its own id field when no valid x-request-id came."""
        if self.seen_request:
            return
        self.seen_request = True
        self.rec.add_tasks(_message_tasks(msg))
        field = ID_FIELDS.get(msg.DESCRIPTOR.full_name)
        if field is not None and not self.rec.client_id:
            body_id = valid_request_id(getattr(msg, field))
            if body_id is not None:
                self.rec.request_id = body_id
                self.context.set_trailing_metadata(((REQUEST_ID_KEY, body_id),))

    def response(self, msg: Any) -> None:
        if msg is None:
            return
        self.rec.bytes_out += msg.ByteSize()  # responses are small (predictions, task info); requests: see _counted
        if not self.rec.tasks and msg.DESCRIPTOR.full_name == _REGISTERED:
            self.rec.add_tasks(_message_tasks(msg))

    def finish(self, exc: Optional[BaseException]) -> None:
        """The line's code: the one the call's metrics counted when its handler noted one (:func:`note_code`); else
        the status sent, or for a call the client ended, what the client saw (:func:`server.errors.ended_code`)."""
        if self.rec.noted_code is not None:
            name = self.rec.noted_code
        elif exc is None or isinstance(exc, grpc.aio.AbortError):
            code = self.context.code()
            name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit, grpc.aio.InternalError)):
            name = ended_code(self.context).name  # InternalError: an operation on the call failed, it was over
        else:
            name = "UNKNOWN"  # what grpc answers for an exception the handler let through
        self.rec.finish(name)


class _FirstMessage:
    """A client stream, passed on message by message; the first is read for task(s) and id.

    The stream's own iterator is asked for only when the first message is read: grpc.aio's request iterator makes
    an async generator on ``__aiter__``, and one made but never started (a call refused before its handler reads,
    e.g. a wrong token or a draining server) warns "coroutine '_MessageReceiver._async_message_receiver' was never
    awaited" when it is collected."""

    def __init__(self, call: _GrpcCall, iterator: AsyncIterator[Any]):
        self._call = call
        self._stream = iterator
        self._it: Optional[AsyncIterator[Any]] = None

    def __aiter__(self) -> "_FirstMessage":
        return self

    async def __anext__(self) -> Any:
        if self._it is None:
            self._it = self._stream.__aiter__()
        msg = await self._it.__anext__()  # started at once: never left made and unstarted
        self._call.request(msg)
        return msg


Behaviour = Callable[..., Any]


def _wrap_behaviour(behaviour: Behaviour, method: str, level: int, request_streaming: bool,
                    response_streaming: bool) -> Optional[Behaviour]:
    """``behaviour`` logged and given a request id; None for a synchronous one (left as it is)."""

    def begin(request: Any, context: grpc.aio.ServicerContext) -> tuple[_GrpcCall, Any]:
        call = _GrpcCall(context, method, level)
        if request_streaming:
            return call, _FirstMessage(call, request)
        call.request(request)
        return call, request

    if response_streaming and inspect.isasyncgenfunction(behaviour):
        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, request = begin(request, context)
            try:
                async for msg in behaviour(request, context):
                    call.response(msg)
                    yield msg
            except BaseException as e:
                call.finish(e)
                raise
            call.finish(None)

        return stream_out
    if not inspect.iscoroutinefunction(behaviour):
        return None

    async def once(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call, request = begin(request, context)
        try:
            response = await behaviour(request, context)
        except BaseException as e:
            call.finish(e)
            raise
        call.response(response)
        call.finish(None)
        return response

    return once


def _counted(deserializer: Optional[Callable[[bytes], Any]]) -> Callable[[bytes], Any]:
    """``deserializer`` adding the wire size of each request message to the call's record. The bytes are
    counted here, from the wire, because a protobuf message's ByteSize() serializes it again: a cost that grows
    with the clip."""

    def deserialize(raw: bytes) -> Any:
        rec = request_scope.get()
        if isinstance(rec, AccessRecord):
            rec.bytes_in += len(raw)
        return deserializer(raw) if deserializer is not None else raw

    return deserialize


_FACTORIES = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
              (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
_BEHAVIOURS = {(False, False): "unary_unary", (True, False): "stream_unary", (False, True): "unary_stream",
               (True, True): "stream_stream"}


def method_level(method: str) -> int:
    """DEBUG for health checks, OIP liveness/readiness and reflection (probes come every few seconds); else INFO."""
    quiet = method.startswith(QUIET_GRPC_PREFIXES) or method in QUIET_GRPC_METHODS
    return logging.DEBUG if quiet else logging.INFO


def wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    kind = (bool(handler.request_streaming), bool(handler.response_streaming))
    wrapped = _wrap_behaviour(getattr(handler, _BEHAVIOURS[kind]), method.lstrip("/"), method_level(method), *kind)
    if wrapped is None:
        return handler
    return _FACTORIES[kind](wrapped, request_deserializer=_counted(handler.request_deserializer),
                            response_serializer=handler.response_serializer)


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Logs every call of the server's registered methods and echoes its request id (see the module doc)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler, int]] = {}  # registered methods

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, wrap_handler(handler, method), method_level(method))
            self._wrapped[method] = cached
        # Begun here, before the request is read: grpc.aio runs this call's deserializer and handler in this context.
        request_scope.set(AccessRecord("grpc", method.lstrip("/"), cached[2],
                                       _metadata_id(handler_call_details.invocation_metadata)))
        return cached[1]


# --- HTTP ------------------------------------------------------------------------------------------------


def http_code(status: int) -> str:
    """The gRPC code name of an HTTP status (the one vocabulary of the access log's ``code``)."""
    if 200 <= status < 300:
        return "OK"
    return _HTTP_CODES.get(status, "UNKNOWN")


@web.middleware
async def access_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "(no route)"
    level = logging.DEBUG if route in QUIET_HTTP_ROUTES else logging.INFO
    rec = AccessRecord("http", f"{safe_text(request.method, 16)} {route}", level,
                       valid_request_id(request.headers.get(REQUEST_ID_HEADER)))
    rec.add_tasks(request.match_info.get("task", "").split(","))
    token = request_scope.set(rec)
    try:
        try:
            response = await handler(request)
        except web.HTTPException as e:  # aiohttp's own answers (no route, wrong method)
            _finish_http(rec, request, e)
            raise
        except asyncio.CancelledError:  # the server stops under the handler, or the client went away
            rec.bytes_in = request.content.total_bytes
            rec.finish("CANCELLED", HTTP_STATUS[grpc.StatusCode.CANCELLED])
            raise
        except Exception:  # noqa: BLE001 - the endpoints map their own errors; this is a bug, answered 500
            logging.getLogger("server.frontends.http").exception("unhandled error in %s", rec.method)
            response = web.json_response({"error": "internal error; see the server log"}, status=500)
        _finish_http(rec, request, response)
        return response
    finally:
        request_scope.reset(token)


def _finish_http(rec: AccessRecord, request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REQUEST_ID_HEADER] = rec.request_id
    rec.bytes_in = request.content.total_bytes
    rec.bytes_out = response.body_length if response.prepared else (response.content_length or 0)
    code = rec.noted_code if response.status == 101 and rec.noted_code else http_code(response.status)
    rec.finish(code, response.status)  # a WebSocket's (101): the code its request scope counted
