"""Live streams on the HTTP port: ``ClassifyLive`` as a WebSocket, the task list, and the page that streams a camera.

Routes (added to ``server.frontends.http``'s application):

- ``GET /v1/tasks/{task}:live`` (a WebSocket; ``{task}`` a name or names ``a,b``): the query string holds
  ``window_s``, ``stride_s`` and the optional ``top_k``, ``request_id`` and sampling overrides (the names
  ``:classify`` takes). Binary messages carry the container's bytes (each at most ``--max-live-chunk-bytes``, which
  is the socket's ``max_msg_size``); the text message ``{"end": true}`` ends the input, as gRPC's half-close does.
  Each window is answered, per task, as one JSON text message; the call ends with a close (1000), or an error as
  one JSON message ``{"error": {"code", "status", "message"}}`` then a close whose code fits it (:data:`CLOSE`).
  A client that closes its side first has cancelled: its decoder is killed.
- ``GET /v1/tasks``: the served tasks with their labels (classify token), for the page's task picker.
- ``GET /live``: the page (``static/live.html``; public: it holds no data, and its calls carry the token).

It is a codec over the data plane's one live operation (``server.dataplane.live``) inside its one request scope
(token, admission, request id, metrics under ``method="HTTP ClassifyLive"``, the error's code): the socket is
opened first, so every refusal, the token's included, reaches a browser as a message it can read (a browser sees
no status of a refused upgrade). Browsers cannot set headers on a WebSocket, so the token may come as the query
parameter ``access_token`` (RFC 6750's name) instead of the ``Authorization`` header.

Backpressure: results are sent with ``await`` (aiohttp waits for the transport to drain past its buffer), and the
data plane lets the decoder go on only after a window's answer is taken, so a client that does not read holds
the decoder, which stops reading the socket.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import grpc
from aiohttp import WSCloseCode, WSMsgType, web

from server.dataplane.scope import Call, Refused
from server.engine.live_flow import LiveAnswer, LiveRequest, chunk_too_big
from server.engine.pipeline import Classification
from server.errors import HTTP_STATUS, BadRequest
from server.frontends.http_common import HttpWire, classification_json, endpoint
from server.frontends.http_form import FORM_FIELDS, int_field, typed_field
from server.live_limits import LiveLimits
from server.observability.access_log import adopt_request_id
from stadapter.config import brief

PAGE = Path(__file__).resolve().parent / "static" / "live.html"
END = {"end": True}  # the text message that ends a stream's input
TOKEN_PARAM = "access_token"
WINDOW_PARAMS = ("window_s", "stride_s")
METHOD = "HTTP ClassifyLive"

# The close code after an error message, by its gRPC code; any other code closes with POLICY_VIOLATION (1008),
# and a binary message over --max-live-chunk-bytes with MESSAGE_TOO_BIG (1009).
CLOSE = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: WSCloseCode.TRY_AGAIN_LATER,  # 1013: the server is full; retry later
    grpc.StatusCode.UNAVAILABLE: WSCloseCode.GOING_AWAY,  # 1001: the server is draining; reconnect elsewhere
    grpc.StatusCode.INTERNAL: WSCloseCode.INTERNAL_ERROR,  # 1011
}


class LiveWire(HttpWire):
    """:class:`HttpWire` whose token may also come as the ``access_token`` query parameter (a browser's WebSocket
    cannot send headers); the ``Authorization`` header wins when both are given."""

    def __init__(self, request: web.Request):
        super().__init__(request)
        token = request.query.get(TOKEN_PARAM)
        if self.authorization is None and token is not None:
            self.authorization = f"Bearer {token}"


class LiveSocket(web.WebSocketResponse):
    """A WebSocket that answers a message over its ``max_msg_size`` with the error message before closing.

    aiohttp refuses such a message as soon as its frame header says its length (nothing of it is buffered) and
    closes the socket at once with 1009 and no reason. Here that close is deferred (``too_big`` is set; aiohttp's
    ``receive`` then returns the ``ERROR`` message) so the request scope maps the error as any other and the
    handler sends it before closing with 1009 itself.
    """

    def __init__(self, live: LiveLimits):
        super().__init__(max_msg_size=live.max_chunk_bytes, compress=False)  # video does not compress
        self.live = live
        self.too_big = False

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.too_big:
            self.too_big = True
            return False
        return await super().close(code=code, message=message, drain=drain)


def live_request(names: list[str], query: Mapping[str, str]) -> tuple[LiveRequest, str]:
    """The stream's request from the socket's query string (and the request id it names, "" if none)."""
    window: dict[str, float] = {}
    fields: dict[str, str] = {}
    for key, value in query.items():
        if key in window or key in fields:
            raise BadRequest(f"query parameter {brief(key)} is given twice")
        if key in WINDOW_PARAMS:
            try:
                window[key] = float(value)
            except ValueError:
                raise BadRequest(f"query parameter {key!r} must be a number of seconds, got {brief(value)}") from None
        elif key in FORM_FIELDS or key in ("top_k", "request_id", TOKEN_PARAM):
            fields[key] = value
        else:
            raise BadRequest(f"unknown query parameter {brief(key)}; a live stream takes window_s, stride_s, top_k, "
                             f"request_id, {TOKEN_PARAM} and the sampling overrides "
                             f"{sorted(k for k in FORM_FIELDS if k != 'top_k')}")
    missing = [k for k in WINDOW_PARAMS if k not in window]
    if missing:
        raise BadRequest(f"the live stream's URL names no {' and no '.join(missing)}: "
                         f"/v1/tasks/<task>:live?window_s=2&stride_s=1")
    fields.pop(TOKEN_PARAM, None)
    top_k = int_field(fields.pop("top_k", "0"), "top_k")
    request_id = fields.pop("request_id", "")
    overrides = {k: typed_field(k, v) for k, v in fields.items()}
    return LiveRequest(names, window["window_s"], window["stride_s"], top_k, overrides), request_id


def window_json(a: LiveAnswer, c: Classification, request_id: str) -> dict[str, Any]:
    """One window's answer for one task: the fields of gRPC's ``WindowResult``."""
    s = a.span
    return {"index": s.index, "start_s": s.start_s, "end_s": s.end_s, "start_frame": s.start_frame,
            "end_frame": s.end_frame, **classification_json(c, request_id),
            "last_frame_received_unix_ns": a.received_ns}


async def socket_chunks(ws: LiveSocket) -> AsyncIterator[bytes]:
    """The stream's bytes, one binary message at a time, until the end message; a socket the client closed first
    raises ``ConnectionResetError`` (the request scope counts it ``CANCELLED``)."""
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.BINARY:
            yield msg.data
        elif msg.type == WSMsgType.TEXT:
            if _is_end(msg.data):
                return
            raise BadRequest(f"a live socket's text message must be {{\"end\": true}} (the end of the stream; its "
                             f"bytes go in binary messages), got {brief(msg.data)}")
        elif msg.type == WSMsgType.ERROR and ws.too_big:
            raise chunk_too_big(ws.live)
        else:
            raise ConnectionResetError("the client closed the live socket before its end message")


def _is_end(text: str) -> bool:
    try:
        return json.loads(text) == END
    except ValueError:
        return False


class HttpLive:
    """Mixed into ``server.frontends.http.HttpService`` (which has the data plane and limits)."""

    plane: Any
    limits: Any

    def add_live_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/v1/tasks", self.task_list)
        r.add_get("/v1/tasks/{task:[^/:]+}:live", self.live_socket)
        r.add_get("/live", self.live_page)

    async def live_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})

    @endpoint("ListTasks", "classify")
    async def task_list(self, request: web.Request, call: Call) -> web.Response:
        return web.json_response({"tasks": [{"name": tv.name, "version": tv.version, "labels": list(tv.spec.labels)}
                                            for tv in self.plane.tasks()]})

    async def live_socket(self, request: web.Request) -> web.StreamResponse:
        ws = LiveSocket(self.limits.live)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text=f"{request.path} is a WebSocket: open it with ws:// (the page at /live "
                                          f"does), then send the stream's bytes in binary messages")
        await ws.prepare(request)
        names = request.match_info["task"].split(",")
        try:
            async with self.plane.request(LiveWire(request), METHOD, "classify", False,
                                          names[0] if len(names) == 1 else "") as call:
                req, request_id = live_request(names, request.query)
                request_id = call.request_id(request_id)
                adopt_request_id(request_id)  # the query's id is the logged one, unless a header gave one
                answers = self.plane.classify_live(call, req, socket_chunks(ws))
                async with contextlib.aclosing(answers):
                    async for a in answers:
                        for c in a.results:
                            await ws.send_json(window_json(a, c, request_id))
        except Refused as e:
            with contextlib.suppress(ConnectionResetError):
                await ws.send_json({"error": {"code": e.code.name, "status": HTTP_STATUS.get(e.code, 500),
                                              "message": e.message}})
            close = WSCloseCode.MESSAGE_TOO_BIG if ws.too_big else CLOSE.get(e.code, WSCloseCode.POLICY_VIOLATION)
            await ws.close(code=close, message=e.code.name.encode())
            return ws
        except ConnectionResetError:  # the client closed or went away: counted CANCELLED, nobody to answer
            return ws
        await ws.close()
        return ws
