"""A client stream the server refuses before reading it (a wrong token, no admin token configured, a draining
server) leaves no ``RuntimeWarning: coroutine '_MessageReceiver._async_message_receiver' was never awaited`` in the
server's log (issue 23).

grpc.aio hands a client-streaming handler a ``_MessageReceiver`` that makes its async generator only when it is
iterated: made and never started, the (Cython) generator warns when it is collected, so a handler that is refused
before it reads would warn. The access log's interceptor wraps that receiver (``access_log._FirstMessage``); it
must ask for the receiver's iterator only when the first message is read. The warning is printed when the generator
is collected (at some later garbage collection, at the latest when the server exits), so the server is stopped
before its log is read.
"""

from __future__ import annotations

import json
import signal

import grpc
import media
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from http_calls import access_lines
from serverproc import ServerProcess, make_repository, metric, scrape, wait_for

from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

NEVER_AWAITED = "was never awaited"
FAST = ("--decode-backend", "thread", "--decode-workers", "1", "--poll-interval-s", "0")
HELD = ("--max-queue-delay-ms", "3000", "--max-batch-size", "64")  # a lone clip waits 3 s in the batcher for company


def _refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_refused_client_streams_leave_no_never_awaited_warning(tmp_path, sig):
    repo = make_repository(tmp_path / "repo")
    clip = media.make_clip(tmp_path / "c.mp4", num_frames=8).read_bytes()
    token = tmp_path / "classify.token"
    token.write_text("right-token\n")
    # every warning printed (not once per place): the server's stderr is its log
    with ServerProcess(repo, "--log-format", "json", "--classify-token-file", str(token), *FAST, *HELD,
                       env={"PYTHONWARNINGS": "always"}) as srv:
        channel = grpc.insecure_channel(srv.address)
        classifier, admin = pb_grpc.VideoClassifierStub(channel), pb_grpc.TaskAdminStub(channel)
        wrong, right = ("authorization", "Bearer wrong-token"), ("authorization", "Bearer right-token")

        e = _refused(lambda: classifier.ClassifyStream(iter([pb.ClassifyChunk(task="alpha", data=clip)]), timeout=60,
                                                       metadata=(wrong, ("x-request-id", "unread-1"))))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token is not valid" in e.details()
        windows = iter([pb.ClassifyWindowsChunk(task="alpha", data=clip, window_s=0.2, stride_s=0.2)])
        e = _refused(lambda: list(classifier.ClassifyWindowsStream(windows, timeout=60,
                                                                   metadata=(wrong, ("x-request-id", "unread-2")))))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token is not valid" in e.details()
        e = _refused(lambda: admin.RegisterTask(iter([pb.RegisterTaskChunk()]), timeout=60,
                                                metadata=(("x-request-id", "unread-3"),)))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "no admin token is configured" in e.details()

        # still serving: the right token's stream is read and answered (it waits in the batcher with the next one,
        # not 3 s alone before it)
        served = classifier.ClassifyStream.future(iter([pb.ClassifyChunk(task="alpha", data=clip)]), timeout=60,
                                                  metadata=(right,))

        # Ctrl-C / SIGTERM with a request in flight: while it drains, a new stream is refused unread
        inflight = classifier.Classify.future(pb.ClassifyRequest(task="beta", clip=clip), metadata=(right,), timeout=60)
        wait_for(lambda: metric(scrape(srv.metrics_url), "stadapter_queue_depth") >= 2,
                 "the two requests to wait in the batcher")
        srv.proc.send_signal(sig)
        health = health_pb2_grpc.HealthStub(channel)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING, "the server to drain")
        e = _refused(lambda: classifier.ClassifyStream(iter([pb.ClassifyChunk(task="alpha", data=clip)]), timeout=10,
                                                       metadata=(right, ("x-request-id", "unread-4"))))
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.details()
        resp = served.result()
        assert resp.task == "alpha" and resp.predictions
        assert inflight.result().task == "beta"  # in-flight work finishes
        for rid, code in (("unread-1", "UNAUTHENTICATED"), ("unread-2", "UNAUTHENTICATED"),
                          ("unread-3", "PERMISSION_DENIED"), ("unread-4", "UNAVAILABLE")):
            [line] = access_lines(srv, rid)
            assert line["code"] == code
        assert srv.proc.wait(30) == 0
        log = srv.log()
    messages = [json.loads(line)["message"] for line in log.splitlines() if line.startswith('{"ts"')]
    assert "stopped" in messages  # it drained and exited: what it left uncollected was collected and reported
    assert NEVER_AWAITED not in log, log
