"""Errors on the HTTP port as JSON ``{"error": "<message>"}`` (what tritonclient.http decodes), with the status.

:func:`error_response` maps a server error (:func:`server.errors.http_status_for`, the gRPC code's status),
:func:`status_response` answers one the data plane's request scope mapped;
:func:`json_errors` rewrites aiohttp's own plain-text answers (no route: 404, wrong method: 405, and any
other :class:`aiohttp.web.HTTPException` of status 400 and up), keeping their status and headers (``Allow``).
"""

from __future__ import annotations

from typing import Awaitable, Callable

import grpc
from aiohttp import hdrs, web

from server.errors import HTTP_STATUS, http_status_for
from server.observability.access_log import safe_text

MAX_PATH_CHARS = 200  # of the client's path, quoted in a 404's message


def error_response(exc: BaseException) -> tuple[web.Response, grpc.StatusCode]:
    status, code, message = http_status_for(exc)
    return web.json_response({"error": message}, status=status), code


def status_response(code: grpc.StatusCode, message: str) -> web.Response:
    """The answer for an error already mapped to ``code`` (the request scope's ``Refused``)."""
    return web.json_response({"error": message}, status=HTTP_STATUS.get(code, 500))


def _message(request: web.Request, e: web.HTTPException) -> str:
    path = safe_text(request.path, MAX_PATH_CHARS)
    if isinstance(e, web.HTTPMethodNotAllowed):
        return f"{safe_text(e.method, 16)} is not allowed on {path}; allowed: {', '.join(sorted(e.allowed_methods))}"
    if isinstance(e, web.HTTPNotFound) and request.match_info.route.resource is None:  # the router's: no route
        routes = sorted({r.canonical for r in request.app.router.resources()})
        return f"no route for {safe_text(request.method, 16)} {path}; the routes are {', '.join(routes)}"
    return e.text if e.text and e.text != f"{e.status}: {e.reason}" else f"{e.reason} ({e.status})"


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:  # a redirect or the like: not an error
            raise
        headers = {k: v for k, v in e.headers.items() if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)}
        return web.json_response({"error": _message(request, e)}, status=e.status, headers=headers)
