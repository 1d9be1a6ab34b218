"""A request that did not complete is never acted on, and is logged and counted with the code the client saw.

Over a real server (``--log-format json``, one decoder process that hangs on ``HANG_CLIP`` through the test
hook): a RegisterTask or clip stream whose client sent every message and then cancelled, let its deadline
pass or closed its channel, without the half-close that ends a stream, is not registered or decoded; its
access line and ``stadapter_requests_total`` carry CANCELLED or DEADLINE_EXCEEDED; the next request is
served. A multipart form that ends without its closing boundary is refused, not decoded. Errors that quote
client text (a 1 MB sampling ``mode``, hostile ``task.json`` values) quote a short prefix.
"""

from __future__ import annotations

import json
import threading
from typing import Iterable, Iterator

import grpc
import media
import pytest
import torch
from factories import make_bundle
from http_calls import HANG_CLIP, access_lines, gauges, http_call, multipart
from serverproc import ServerProcess, make_repository, metric, scrape, wait_for

from clients.core import register_chunks
from server.decode.pool import TEST_HOOK_ENV
from stadapter import load_trunk
from stadapter.config import QUOTE_LIMIT, AdapterConfig, ConfigError, SamplingConfig, TaskSpec
from stadapter.weights import WeightsError, check_tensors
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

WANT = {"cancel": grpc.StatusCode.CANCELLED, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
        "close": grpc.StatusCode.CANCELLED}
DEADLINE_S = 2.0
DECODE_TIMEOUT_S = 8  # a submitted HANG_CLIP would hold the one decoder this long
SHORT = 300  # characters: a message that quotes a prefix of the client's text, not all of it
HUGE = "x" * 1_000_000

integration = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("incomplete") / "repo")
    with ServerProcess(repo, "--log-format", "json", "--allow-insecure-admin", "--decode-workers", "1",
                       "--decode-timeout-s", str(DECODE_TIMEOUT_S), "--poll-interval-s", "0", "--no-warmup",
                       env={TEST_HOOK_ENV: "hang-on-magic"}) as srv:
        srv.repo = repo
        yield srv


@pytest.fixture(scope="module")
def clip() -> bytes:
    return media.make_clip(None, 8)


def _held_open(messages: Iterable, sent: threading.Event, gate: threading.Event) -> Iterator:
    """Every message, then no half-close: the stream stays open until ``gate`` opens."""
    yield from messages
    sent.set()
    gate.wait(60)


def _end(call, channel: grpc.Channel, how: str, responses: bool = False) -> grpc.StatusCode:
    """End ``call`` (a future; ``responses``: a response stream) as ``how`` says; the code its client saw."""
    if how == "cancel":
        assert call.cancel()
    elif how == "close":
        channel.close()
    try:
        list(call) if responses else call.result(timeout=30)
    except grpc.FutureCancelledError:
        return grpc.StatusCode.CANCELLED
    except grpc.RpcError as e:
        return e.code()
    raise AssertionError(f"the call ended by {how} succeeded")


def _assert_ended_and_logged(server, code: grpc.StatusCode, how: str, rid: str) -> None:
    """The client saw what ``how`` gives, and the call's one access line has that same code."""
    assert code == WANT[how]
    assert [d["code"] for d in access_lines(server, rid)] == [code.name]


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


# --- streams ended after their last message ------------------------------------------------------------


@integration
@pytest.mark.parametrize("how", list(WANT))
def test_an_upload_ended_after_its_last_chunk_is_not_registered(server, tmp_path, how):
    name, rid = f"late-{how}", f"upload-{how}"
    bundle = make_bundle(load_trunk(server.repo / "trunk"), tmp_path / name, name=name, seed=5)
    files = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    before = scrape(server.metrics_url)
    channel = grpc.insecure_channel(server.address)
    sent, gate = threading.Event(), threading.Event()
    try:
        fut = pb_grpc.TaskAdminStub(channel).RegisterTask.future(
            _held_open(register_chunks(files, 1 << 20), sent, gate), metadata=(("x-request-id", rid),),
            timeout=DEADLINE_S if how == "deadline" else 60)
        # one chunk per file: both files open in the upload folder means every chunk arrived
        wait_for(lambda: sent.is_set() and all(any(server.repo.glob(f"tasks/.upload-*/{f}")) for f in files),
                 "every chunk to reach the server")
        code = _end(fut, channel, how)
    finally:
        gate.set()
        channel.close()
    _assert_ended_and_logged(server, code, how, rid)
    after = scrape(server.metrics_url)
    assert _delta(before, after, "stadapter_requests_total", method="RegisterTask", task="", code=code.name) == 1
    assert _delta(before, after, "stadapter_registrations_total", result=code.name.lower()) == 1
    assert _delta(before, after, "stadapter_registrations_total", result="ok") == 0
    wait_for(lambda: not list(server.repo.glob("tasks/.upload-*")), "the upload folder to be removed")
    with grpc.insecure_channel(server.address) as ch:
        listed = pb_grpc.VideoClassifierStub(ch).ListTasks(pb.ListTasksRequest(), timeout=10)
        assert name not in {t.name for t in listed.tasks} and not (server.repo / "tasks" / name).exists()
        done = pb_grpc.TaskAdminStub(ch).RegisterTask(register_chunks(files, 1 << 20), timeout=60)  # half-closed
        assert (done.task.name, done.task.version) == (name, 1)


@integration
@pytest.mark.parametrize("how", list(WANT))
@pytest.mark.parametrize("method", ["ClassifyStream", "ClassifyWindowsStream"])
def test_a_clip_stream_ended_after_its_last_chunk_is_not_decoded(server, clip, method, how):
    rid = f"{method}-{how}"
    chunk = (pb.ClassifyChunk(task="alpha", data=HANG_CLIP) if method == "ClassifyStream" else
             pb.ClassifyWindowsChunk(task="alpha", data=HANG_CLIP, window_s=0.2, stride_s=0.1))
    before = scrape(server.metrics_url)
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.VideoClassifierStub(channel)
    sent, gate = threading.Event(), threading.Event()
    try:
        start = stub.ClassifyStream.future if method == "ClassifyStream" else stub.ClassifyWindowsStream
        call = start(_held_open([chunk], sent, gate), metadata=(("x-request-id", rid),),
                     timeout=DEADLINE_S if how == "deadline" else 60)
        wait_for(lambda: sent.is_set() and gauges(server.metrics_url)["stadapter_clip_in_flight_bytes"] >= len(HANG_CLIP),
                 "the whole clip to reach the server")
        code = _end(call, channel, how, responses=method == "ClassifyWindowsStream")
    finally:
        gate.set()
        channel.close()
    _assert_ended_and_logged(server, code, how, rid)
    after = scrape(server.metrics_url)
    assert _delta(before, after, "stadapter_requests_total", method=method, task="alpha", code=code.name) == 1
    assert _delta(before, after, "stadapter_requests_total", method=method, task="alpha", code="OK") == 0
    assert _delta(before, after, "stadapter_decode_seconds_count") == 0
    assert _delta(before, after, "stadapter_clips_total", task="alpha") == 0
    # The one decoder is free: had the hanging clip been handed to it, it would hold it for DECODE_TIMEOUT_S.
    with grpc.insecure_channel(server.address) as ch:
        r = pb_grpc.VideoClassifierStub(ch).ClassifyStream(iter([pb.ClassifyChunk(task="alpha", data=clip)]),
                                                           timeout=DECODE_TIMEOUT_S / 2)
        assert r.task == "alpha" and r.predictions


def test_an_upload_cancelled_during_validation_publishes_nothing(two_task_repo, tiny_trunk, tmp_path):
    """The claim comes right before the publishing rename: a request cancelled meanwhile (the claim refused)
    leaves no version, no new task folder and no upload folder; the same upload, claimed, is published."""
    from factories import upload_copy

    from server.errors import BadRequest
    from server.registry.registry import TaskRegistry

    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    source = make_bundle(tiny_trunk, tmp_path / "gamma", name="gamma", seed=3)
    asked: list[bool] = []
    with pytest.raises(BadRequest, match="cancelled"):
        reg.register_upload(upload_copy(reg, source), claim=lambda: asked.append(False) or False)
    assert asked and "gamma" not in reg.tasks
    assert sorted(p.name for p in (two_task_repo / "tasks").iterdir() if not p.name.startswith(".")) == ["alpha", "beta"]
    assert not list((two_task_repo / "tasks").glob(".upload-*"))
    assert reg.register_upload(upload_copy(reg, source), claim=lambda: True).version == 1


# --- HTTP: a form cut short ----------------------------------------------------------------------------


@integration
def test_a_form_without_its_closing_boundary_is_refused_not_decoded(server, clip):
    body, ctype = multipart(clip)
    cut = body[:body.rindex(b"\r\n--")]  # the clip part whole, the closing boundary line missing
    before = scrape(server.metrics_url)
    status, _, out = http_call(server, "POST", "/v1/tasks/alpha:classify", cut,
                               {"Content-Type": ctype, "X-Request-Id": "form-cut"})
    assert status == 400 and "closing boundary" in json.loads(out)["error"], out
    assert [(d["code"], d["http_status"]) for d in access_lines(server, "form-cut")] == [("INVALID_ARGUMENT", 400)]
    after = scrape(server.metrics_url)
    assert _delta(before, after, "stadapter_requests_total", method="HTTP Classify", task="alpha",
                  code="INVALID_ARGUMENT") == 1
    assert _delta(before, after, "stadapter_decode_seconds_count") == 0
    status, _, out = http_call(server, "POST", "/v1/tasks/alpha:classify", body, {"Content-Type": ctype})
    assert status == 200 and json.loads(out)["predictions"]


# --- client text quoted briefly ------------------------------------------------------------------------


@integration
def test_a_huge_sampling_mode_is_invalid_argument_with_a_short_message(server, clip):
    with grpc.insecure_channel(server.address) as ch:  # a default client: default receive and metadata limits
        stub = pb_grpc.VideoClassifierStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Classify(pb.ClassifyRequest(task="alpha", clip=clip, sampling=pb.SamplingOverrides(mode=HUGE)),
                          timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()[:200]
        assert "mode" in e.value.details() and len(e.value.details()) < SHORT
        assert stub.Classify(pb.ClassifyRequest(task="alpha", clip=clip), timeout=60).predictions
    body, ctype = multipart(clip)
    for field, value in (("mode", "y" * 6000), ("num_frames", "9" * 4000)):
        status, _, out = http_call(server, "POST", f"/v1/tasks/alpha:classify?{field}={value}", body,
                                   {"Content-Type": ctype})
        assert status == 400 and field in json.loads(out)["error"] and len(out) < SHORT, out[:200]


def test_config_errors_quote_client_text_briefly(tiny_trunk, tmp_path):
    spec = json.loads((make_bundle(tiny_trunk, tmp_path / "b", name="gamma") / "task.json").read_text())
    bad = [lambda: SamplingConfig(mode=HUGE), lambda: SamplingConfig(num_frames=HUGE),
           lambda: SamplingConfig(mean=(0.5,) * 100_000), lambda: AdapterConfig(activation=HUGE),
           lambda: AdapterConfig(kernel=(3,) * 100_000)]
    bad += [lambda k=k, v=v: TaskSpec.from_dict({**spec, k: v}) for k, v in (
        ("version", HUGE), ("trunk_fingerprint", HUGE), ("labels", [HUGE] * 3), ("labels", [HUGE[:200]] * 1000),
        ("format_version", HUGE))]
    for make in bad:
        with pytest.raises(ConfigError) as e:
            make()
        assert len(str(e.value)) < SHORT and HUGE[:2 * QUOTE_LIMIT] not in str(e.value)
    with pytest.raises(WeightsError) as w:
        check_tensors({HUGE: torch.tensor([float("nan")])})
    assert len(str(w.value)) < SHORT
