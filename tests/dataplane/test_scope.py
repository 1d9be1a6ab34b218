"""The data plane's request scope on its own (no server): each way out of a request is counted once, with the
code its frontend answers, after everything the ticket held is given back; an error leaves as ``Refused``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Optional

import grpc
import pytest
import torch

from server.config import ServerConfig
from server.dataplane.scope import Refused, request_scope
from server.engine.admission import Admission
from server.errors import BadRequest
from server.frontends.auth import Auth
from server.observability.metrics import Metrics
from server.registry.registry import TaskRegistry


class FakeWire:
    """A protocol whose client ends a call with ``CancelledError`` (as gRPC's), with no token to check but admin."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    def check(self, auth: Auth, access: str) -> None:
        self.checked.append(access)
        if access == "admin":
            auth.check_admin_header(None)

    def ended(self, exc: BaseException) -> Optional[grpc.StatusCode]:
        return grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else None


class CountSpy:
    """``stadapter_requests_total`` as the scope sees it, noting what the admission held at each count."""

    def __init__(self, counter, admission: Admission):
        self.counter = counter
        self.admission = admission
        self.held_at_count: list[tuple[int, int]] = []

    def labels(self, *values: str):
        self.held_at_count.append((self.admission.inflight, self.admission.held_bytes))
        return self.counter.labels(*values)


@pytest.fixture()
def plane(two_task_repo, tiny_trunk):
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    admission = Admission(reg, ServerConfig(model_repository=two_task_repo).limits)
    metrics = Metrics(torch.device("cpu"))
    spy = CountSpy(metrics.requests, admission)
    return SimpleNamespace(metrics=SimpleNamespace(registry=metrics.registry, requests=spy,
                                                   request_seconds=metrics.request_seconds),
                           auth=Auth(None), registry=reg, pipeline=SimpleNamespace(admission=admission),
                           task_label=lambda name: name)


def count(plane, method: str, task: str, code: str) -> float:
    return plane.metrics.registry.get_sample_value("stadapter_requests_total",
                                                   {"method": method, "task": task, "code": code}) or 0.0


def latencies(plane, method: str) -> float:
    return plane.metrics.registry.get_sample_value("stadapter_request_seconds_count", {"method": method}) or 0.0


def test_each_way_out_is_counted_once_with_its_code_after_the_ticket_is_given_back(plane, loop):
    admission = plane.pipeline.admission

    async def ok():
        async with request_scope(plane, FakeWire(), "M", "classify", True) as call:
            call.task = "alpha"
            call.ticket.hold(10)
            assert (admission.inflight, admission.held_bytes) == (1, 10)
        return call

    async def bad():
        async with request_scope(plane, FakeWire(), "M", "classify", True, task="beta") as call:
            call.ticket.hold(10)
            raise BadRequest("no such thing")

    async def ended():
        async with request_scope(plane, FakeWire(), "M", "classify", False, task="alpha") as call:
            call.ticket.hold(10)
            raise asyncio.CancelledError()

    assert loop.run_until_complete(ok()).request_id("given") == "given"
    assert count(plane, "M", "alpha", "OK") == 1 and latencies(plane, "M") == 1
    with pytest.raises(Refused) as e:
        loop.run_until_complete(bad())
    assert (e.value.code, e.value.message) == (grpc.StatusCode.INVALID_ARGUMENT, "no such thing")
    assert isinstance(e.value.__cause__, BadRequest)
    assert count(plane, "M", "beta", "INVALID_ARGUMENT") == 1 and latencies(plane, "M") == 2
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(ended())
    assert count(plane, "M", "alpha", "CANCELLED") == 1 and latencies(plane, "M") == 2  # not timed
    assert (admission.inflight, admission.held_bytes) == (0, 0)  # every exit gave everything back
    assert plane.metrics.requests.held_at_count == [(0, 0)] * 3  # ... before it was counted


def test_a_refused_token_is_counted_and_takes_no_ticket(plane, loop):
    wire = FakeWire()

    async def admin():
        async with request_scope(plane, wire, "Admin", "admin", False, task="alpha"):
            raise AssertionError("the body must not run without the admin token")

    with pytest.raises(Refused) as e:
        loop.run_until_complete(admin())
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED and "admin token" in e.value.message
    assert wire.checked == ["admin"] and count(plane, "Admin", "alpha", "PERMISSION_DENIED") == 1
    assert plane.pipeline.admission.inflight == 0
