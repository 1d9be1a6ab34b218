"""What the HTTP handlers (``server.frontends.http``, ``server.frontends.http_live``) share: the data plane's request
scope on the HTTP port (:class:`HttpWire`: the token in the ``Authorization`` header, a client that hung up;
:func:`endpoint`, the decorator every handler but health and the live socket is served through) and the JSON of one
task's answer (:func:`classification_json`)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable, Optional

import grpc
from aiohttp import hdrs, web

from server.dataplane.scope import Access, Call, Refused
from server.engine.pipeline import Classification
from server.errors import HTTP_STATUS
from server.frontends.auth import Auth
from server.frontends.http_errors import status_response

Handler = Callable[[Any, web.Request, Call], Awaitable[web.StreamResponse]]


class HttpWire:
    """The request scope's view of an HTTP request: the token in its ``Authorization`` header; a client that hung
    up mid-body shows as ``ConnectionResetError``, a server stopping under the handler as ``CancelledError``."""

    __slots__ = ("authorization",)

    def __init__(self, request: web.Request):
        self.authorization = request.headers.get(hdrs.AUTHORIZATION)

    def check(self, auth: Auth, access: Access) -> None:
        if access == "admin":
            auth.check_admin_header(self.authorization)
        elif access == "classify":
            auth.check_classify_header(self.authorization)

    def ended(self, exc: BaseException) -> Optional[grpc.StatusCode]:
        return grpc.StatusCode.CANCELLED if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)) else None


Endpoint = Callable[[Any, web.Request], Awaitable[web.StreamResponse]]


def endpoint(method: str, access: Access, timed: bool = False) -> Callable[[Handler], Endpoint]:
    """Serve a handler ``fn(self, request, call)`` in the data plane's request scope, as gRPC methods are
    (``server.frontends.grpc_helpers.rpc``): metrics under ``method="HTTP <method>"`` (latency too when ``timed``),
    errors as ``{"error": ...}`` with the status of the gRPC code."""
    label = f"HTTP {method}"

    def deco(fn: Handler):
        @functools.wraps(fn)
        async def wrapper(self: Any, request: web.Request) -> web.StreamResponse:
            task = request.match_info.get("task", "")
            task = "" if "," in task else task  # a several-task upload counts its tasks per item
            try:
                async with self.plane.request(HttpWire(request), label, access, timed, task) as call:
                    return await fn(self, request, call)
            except ConnectionResetError:  # the client hung up mid-body: nobody to answer, nothing to log
                return web.Response(status=HTTP_STATUS[grpc.StatusCode.CANCELLED])
            except Refused as e:
                return status_response(e.code, e.message)

        return wrapper

    return deco


def classification_json(c: Classification, request_id: Optional[str]) -> dict[str, Any]:
    """One task's answer (``request_id`` None: an item of a several-task answer, which has none of its own)."""
    labels = c.tv.spec.labels
    return {
        "task": c.tv.name, "task_version": c.tv.version, **({"request_id": request_id} if request_id is not None else {}),
        "predictions": [{"label": labels[i], "score": p, "index": i} for i, p in c.top],
        "timings": {"decode_ms": c.decode_s * 1e3, "queue_ms": c.queue_s * 1e3, "compute_ms": c.compute_s * 1e3,
                    "total_ms": c.total_s * 1e3, "batch_size": c.batch_clips, "cached": c.cached},
    }
