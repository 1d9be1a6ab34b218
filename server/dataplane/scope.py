"""One request's scope, the same for every frontend: its token checked, its admission ticket, its request id, its
count and latency in the metrics, its error mapped to a status once, and the code of a call the client ended.

A frontend enters :func:`request_scope` (``DataPlane.request``) around its handler, with a :class:`Wire` that says
how its protocol carries the token and how a call its client ended shows. Inside, the handler gets a
:class:`Call` (the ticket; ``call.task`` names the task the metrics count the request under). Leaving:

- normally: counted ``OK``;
- by an exception the wire calls the client's end (a cancel, a deadline, a closed connection): counted with the
  code the wire gives, and re-raised;
- by any other error: mapped with :func:`server.errors.status_for` (the one place that maps errors), counted, and
  raised as :class:`Refused` (code and message), which the frontend encodes in its protocol.

Everything the ticket holds is given back before the outcome is counted, and the count is made before the
frontend sends the status (a client may read the metrics as soon as it has its answer).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator, Literal, Optional, Protocol

import grpc

from server.engine.admission import Ticket
from server.errors import status_for
from server.frontends.auth import Auth
from server.observability.access_log import note_code
from server.observability.logs import current_request_id

if TYPE_CHECKING:
    from server.dataplane.plane import DataPlane

Access = Literal["admin", "classify", "public"]  # which token a request needs: the admin one, the classify one, none


class Wire(Protocol):
    """What the request scope needs to know of the protocol a request came in by."""

    def check(self, auth: Auth, access: Access) -> None:
        """Raise ``Unauthenticated``/``PermissionDenied`` unless the request carries the token ``access`` needs."""

    def ended(self, exc: BaseException) -> Optional[grpc.StatusCode]:
        """The code of a call its client ended, when ``exc`` is how that shows on this protocol; else None."""


class Refused(Exception):
    """A request's error, mapped and counted by the scope: the frontend answers ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Call:
    """A request inside its scope: its wire, its ticket, and the task its metrics count it under (set by the
    handler)."""

    __slots__ = ("wire", "ticket", "task")

    def __init__(self, wire: Wire, task: str = ""):
        self.wire = wire
        self.ticket: Ticket = None  # type: ignore[assignment]  # set once the request is admitted
        self.task = task

    @staticmethod
    def request_id(given: str = "") -> str:
        """The id a request is logged and answered under: its own field's, else the access log's, else a new one."""
        return given or current_request_id() or uuid.uuid4().hex


@contextlib.asynccontextmanager
async def request_scope(plane: "DataPlane", wire: Wire, method: str, access: Access, timed: bool,
                        task: str = "") -> AsyncIterator[Call]:
    """Serve one request (see the module doc). ``method``: the metrics' ``method`` label; ``timed``: the request's
    latency goes into ``stadapter_request_seconds{method}`` too; ``task``: the task label known from the start."""
    t0 = time.monotonic()
    call = Call(wire, task)

    def record(code: grpc.StatusCode) -> None:
        note_code(code.name)  # the access line's code: the one counted here
        plane.metrics.requests.labels(method, plane.task_label(call.task), code.name).inc()
        if timed:
            plane.metrics.request_seconds.labels(method).observe(time.monotonic() - t0)

    try:
        wire.check(plane.auth, access)
        async with plane.pipeline.admission.request() as ticket:
            call.ticket = ticket
            yield call
    except BaseException as e:  # CancelledError, GeneratorExit (a closed stream) too: the wire says what they are
        ended = wire.ended(e)
        if ended is not None:
            record(ended)
            raise
        if not isinstance(e, Exception):
            raise
        code, message = status_for(e)
        record(code)
        raise Refused(code, message) from e
    record(grpc.StatusCode.OK)
