"""A request that ends early (client cancel, deadline, closed channel) gives back everything it held.

Over a real server: each of Classify, ClassifyStream, BatchClassify and RegisterTask
is made to hang (a clip that hangs the decoder through the test hook, or a stream
that stops sending), checked to hold its resources, then ended by the client. The
server's own /metrics must then read zero in-flight requests, an empty queue and
no clip bytes held, no upload folder may be left, and the server answers the next
request.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

import grpc
import media
import pytest
from http_calls import HANG_CLIP, gauges
from serverproc import ServerProcess, make_repository, wait_for

from server.decode.pool import TEST_HOOK_ENV
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("cancel") / "repo")
    with ServerProcess(repo, "--allow-insecure-admin", "--decode-workers", "2", "--decode-timeout-s", "3",
                       "--stream-idle-timeout-s", "20", "--poll-interval-s", "0", "--no-warmup",
                       env={TEST_HOOK_ENV: "hang-on-magic"}) as srv:
        srv.repo = repo
        yield srv


@pytest.fixture(scope="module")
def clip() -> bytes:
    return media.make_clip(num_frames=12)


def _stalled_stream(first: list, gate: threading.Event) -> Iterator:
    yield from first
    gate.wait(60)  # the client stops sending; the test opens the gate at the end


Start = Callable[[pb_grpc.VideoClassifierStub, pb_grpc.TaskAdminStub, float], grpc.Future]


def _calls(repo: Path, gate: threading.Event) -> dict[str, Start]:
    bundle = repo / "tasks" / "alpha" / "1"
    task_json = (bundle / "task.json").read_bytes()
    half = (bundle / "adapter.safetensors").read_bytes()[:1000]
    return {
        "Classify": lambda clf, adm, t: clf.Classify.future(pb.ClassifyRequest(task="alpha", clip=HANG_CLIP),
                                                            timeout=t),
        "ClassifyStream": lambda clf, adm, t: clf.ClassifyStream.future(
            _stalled_stream([pb.ClassifyChunk(task="alpha", data=b"\0" * 5000)], gate), timeout=t),
        "BatchClassify": lambda clf, adm, t: clf.BatchClassify.future(
            pb.BatchClassifyRequest(requests=[pb.ClassifyRequest(task="alpha", clip=HANG_CLIP),
                                              pb.ClassifyRequest(task="beta", clip=HANG_CLIP)]), timeout=t),
        "RegisterTask": lambda clf, adm, t: adm.RegisterTask.future(
            _stalled_stream([pb.RegisterTaskChunk(filename="task.json", data=task_json, upload_id="cancel-test"),
                             pb.RegisterTaskChunk(filename="adapter.safetensors", data=half)], gate), timeout=t),
    }


def _holding(srv, method: str) -> bool:
    g = gauges(srv.metrics_url)
    if g["stadapter_requests_in_flight"] < 1:
        return False
    if method == "RegisterTask":
        return any(srv.repo.glob("tasks/.upload-*/adapter.safetensors"))
    if method == "ClassifyStream":
        return g["stadapter_clip_in_flight_bytes"] >= 5000
    return g["stadapter_queue_depth"] >= 1 and g["stadapter_clip_in_flight_bytes"] >= len(HANG_CLIP)


@pytest.mark.parametrize("how", ["cancel", "deadline", "close"])
@pytest.mark.parametrize("method", ["Classify", "ClassifyStream", "BatchClassify", "RegisterTask"])
def test_an_ended_request_gives_everything_back(server, clip, method, how):
    gate = threading.Event()
    channel = grpc.insecure_channel(server.address)
    clf, adm = pb_grpc.VideoClassifierStub(channel), pb_grpc.TaskAdminStub(channel)
    try:
        fut = _calls(server.repo, gate)[method](clf, adm, 2.0 if how == "deadline" else 60)
        wait_for(lambda: _holding(server, method) or fut.done(), f"{method} to hold its resources")
        assert not fut.done(), f"{method} ended before it could be cancelled: {fut.exception()}"
        if how == "cancel":
            assert fut.cancel()
        elif how == "close":
            channel.close()
        with pytest.raises(grpc.FutureCancelledError if how == "cancel" else grpc.RpcError) as e:
            fut.result(timeout=30)
        if how != "cancel":
            want = grpc.StatusCode.DEADLINE_EXCEEDED if how == "deadline" else grpc.StatusCode.CANCELLED
            assert e.value.code() == want, e.value
        wait_for(lambda: all(v == 0 for v in gauges(server.metrics_url).values()),
                 f"every counter back at zero after {method} was ended by {how}: {gauges(server.metrics_url)}")
        wait_for(lambda: not list(server.repo.glob("tasks/.upload-*")), "the upload folder to be removed")
    finally:
        gate.set()
        channel.close()
    with grpc.insecure_channel(server.address) as ch:  # the server still serves
        r = pb_grpc.VideoClassifierStub(ch).Classify(pb.ClassifyRequest(task="alpha", clip=clip), timeout=60)
        assert r.task == "alpha" and r.predictions
    assert sorted(p.name for p in (server.repo / "tasks" / "alpha").iterdir()) == ["1"]  # nothing was published
