"""The server's log output: one handler on stderr, ``--log-level``, ``--log-format text|json``, request ids.

Every record passes :class:`RequestIdFilter`, which stamps it with the id of the request being served
in the current context (:data:`request_scope`, set by :mod:`server.observability.access_log` for each gRPC call and
HTTP request), so an error logged while serving a request carries that request's id.

``json``: one JSON object per line (ASCII, no embedded newline), for log shippers. Keys on every line:
``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``, ``request_id`` (null outside
a request); access lines (logger ``server.access``) add ``protocol``, ``method``, ``tasks``, ``code``,
``http_status``, ``ms``, ``bytes_in`` and ``bytes_out``; a record with a traceback adds ``exc``.
``text``: ``<time> <LEVEL> <logger> [<request id>]: <message>``, for people.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any, Optional, TextIO

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
LOG_FORMATS = ("text", "json")


class RequestScope:
    """What the log needs to know about the request being served; :mod:`server.observability.access_log` extends it.
    Mutable: a streamed call may learn its id from its first message."""

    __slots__ = ("request_id",)

    def __init__(self, request_id: str):
        self.request_id = request_id

    def fields(self) -> dict[str, Any]:
        """Extra keys of this request's access line (none here)."""
        return {}


request_scope: contextvars.ContextVar[Optional[RequestScope]] = contextvars.ContextVar("request_scope", default=None)


def current_request_id() -> str:
    """The id of the request served in this context, "" outside one."""
    scope = request_scope.get()
    return scope.request_id if scope is not None else ""


class RequestIdFilter(logging.Filter):
    """Stamps ``record.request_id`` (None outside a request); passes every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or None
        return True


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a header past its size limit, a bad request line: the client's
    fault) as an ERROR with a traceback. Made a one-line WARNING here, so clients cannot fill the error log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            detail = _SPACE.sub(" ", str(exc))[:MAX_DETAIL_CHARS]  # aiohttp quotes at most 100 bytes of the input
            record.msg, record.args = "%s: %s", (record.getMessage(), detail)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


_SPACE = re.compile(r"\s+")
MAX_DETAIL_CHARS = 300


_second: tuple[int, str] = (-1, "")  # the last second formatted (one tuple: a thread reads a consistent pair)


def _timestamp(created: float) -> str:
    global _second
    sec = int(created)
    if _second[0] != sec:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_second[1]}.{int(created * 1000) % 1000:03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        head = f"{_timestamp(record.created)} {record.levelname} {record.name}"
        line = f"{head} [{rid}]: {record.getMessage()}" if rid else f"{head}: {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str)  # made once, not per line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _timestamp(record.created), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage(), "request_id": getattr(record, "request_id", None)}
        access = getattr(record, "access", None)
        if isinstance(access, RequestScope):
            doc["request_id"] = access.request_id
            doc.update(access.fields())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return _ENCODER.encode(doc)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {'|'.join(LOG_FORMATS)}, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure_logging(level: str, fmt: str, stream: Optional[TextIO] = None) -> logging.Handler:
    """Replace the root logger's handlers by one on ``stream`` (stderr) with ``fmt``; set ``level``."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {'|'.join(LOG_LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(LOG_LEVELS[level])
    # Neither format prints thread or process names: not looked up for every record (the logging HOWTO's advice).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    aiohttp_server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in aiohttp_server.filters):
        aiohttp_server.addFilter(MalformedRequestFilter())
    return handler
