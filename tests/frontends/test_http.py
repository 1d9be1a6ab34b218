"""HTTP on ``--http-port`` against the real server: OIP v2 REST (tritonclient.http, binary and JSON data), the
multipart upload (curl and a hand-built form), health probes during a drain, tokens and TLS, errors with the
right status and a message, metrics by ``method``; the server serves the next request after each failure.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import media
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from http_calls import classify, counter, decodes, form, request
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, make_repository, self_signed_cert, wait_for
from tritonclient.utils import InferenceServerException

from clients import Client
from server.config import parse_args
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
MAX_CLIP = 300_000
IDLE_S = 2


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("http-clips")
    return [media.make_clip(d / f"c{i}.mp4", num_frames=10 + 6 * i).read_bytes() for i in range(2)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("http") / "repo")
    with ServerProcess(repo, "--poll-interval-s", "0", "--max-clip-bytes", str(MAX_CLIP), "--stream-idle-timeout-s",
                       str(IDLE_S), env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        yield srv


def test_ready_file_reports_the_http_port_and_health_answers(server):
    assert isinstance(server.info["http_port"], int) and server.info["http_port"] > 0
    assert server.info["http_port"] not in (server.grpc_port, server.metrics_port)
    for path, key in (("/v2/health/live", "live"), ("/v2/health/ready", "ready")):
        status, _, body = request(server.http_url + path)
        assert status == 200 and json.loads(body) == {key: True}
    status, _, body = request(server.http_url + "/v2/models/alpha/ready")
    assert status == 200 and json.loads(body)["ready"] is True
    assert request(server.http_url + "/v2/models/alpha/versions/7/ready")[0] == 404


def test_tritonclient_http_binary_equals_the_grpc_answer(server, clips):
    h = thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    g = tgrpc.InferenceServerClient(server.address)
    try:
        assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("beta")
        meta = h.get_model_metadata("beta")
        assert meta["versions"] == ["1"] and meta["inputs"] == [{"name": "CLIP", "datatype": "BYTES", "shape": [-1]}]
        assert json.loads(h.get_model_config("beta")["parameters"]["labels"]["string_value"]) == \
            [f"beta-{i}" for i in range(4)]
        x = thttp.InferInput("CLIP", [2], "BYTES")
        x.set_data_from_numpy(np.array(clips, dtype=np.object_), binary_data=True)
        res = h.infer("beta", [x], parameters={"top_k": 2})
        xg = tgrpc.InferInput("CLIP", [2], "BYTES")
        xg.set_data_from_numpy(np.array(clips, dtype=np.object_))
        ref = g.infer("beta", [xg], parameters={"top_k": 2})
        assert res.as_numpy("LABELS").shape == (2, 2) and res.as_numpy("SCORES").dtype == np.float32
        assert (res.as_numpy("LABELS") == ref.as_numpy("LABELS")).all()
        assert np.allclose(res.as_numpy("SCORES"), ref.as_numpy("SCORES"), atol=1e-6)
        assert res.get_response()["model_version"] == "1"
        # outputs as JSON data (no binary output), one of them only
        js = h.infer("beta", [x], parameters={"top_k": 2}, outputs=[thttp.InferRequestedOutput("SCORES", binary_data=False)])
        out = js.get_response()["outputs"]
        assert [o["name"] for o in out] == ["SCORES"] and "data" in out[0] and out[0]["shape"] == [2, 2]
        assert np.allclose(js.as_numpy("SCORES"), ref.as_numpy("SCORES"), atol=1e-6)
    finally:
        h.close()
        g.close()


def test_plain_json_infer_request(server, clips):
    """A JSON body with no binary part at all (text BYTES data) is parsed, and its (non-video) clip refused."""
    doc = {"id": "r1", "inputs": [{"name": "CLIP", "datatype": "BYTES", "shape": [1], "data": ["not a video"]}]}
    status, _, body = request(server.http_url + "/v2/models/alpha/infer", json.dumps(doc).encode(),
                              {"Content-Type": "application/json"})
    assert status == 400 and "not a readable video" in json.loads(body)["error"]


def test_multipart_upload_answers_as_grpc(server, clips):
    before = counter(server, "HTTP Classify", "alpha", "OK")
    status, got = classify(server, "alpha", clips[1], top_k=2, num_frames=4, request_id="mine")
    assert status == 200, got
    assert got["task"] == "alpha" and got["task_version"] == 1 and got["request_id"] == "mine"
    assert len(got["predictions"]) == 2 and set(got["timings"]) >= {"decode_ms", "queue_ms", "compute_ms", "total_ms"}
    with Client(server.address) as native:
        ref = native.classify(clips[1], "alpha", top_k=2)
    assert [p["label"] for p in got["predictions"]] == [p.label for p in ref.predictions]
    assert np.allclose([p["score"] for p in got["predictions"]], [p.score for p in ref.predictions], atol=1e-6)
    assert counter(server, "HTTP Classify", "alpha", "OK") == before + 1


def test_several_tasks_in_one_upload(server, clips):
    before = {k: counter(server, "HTTP Classify.task", *k) for k in (("alpha", "OK"), ("_other", "NOT_FOUND"))}
    status, got = classify(server, "alpha,beta,nope", clips[1], top_k=2)
    assert status == 200, got
    assert [r["task"] for r in got["results"]] == ["alpha", "beta", "nope"]
    assert got["results"][2]["error"]["status"] == 404 and "nope" in got["results"][2]["error"]["message"]
    assert got["timings"]["decodes"] == 1  # alpha and beta share their sampling, hence one decode
    for r in got["results"][:2]:
        one = classify(server, r["task"], clips[1], top_k=2)[1]
        assert [p["label"] for p in r["predictions"]] == [p["label"] for p in one["predictions"]]
        assert np.allclose([p["score"] for p in r["predictions"]], [p["score"] for p in one["predictions"]], atol=1e-6)
    assert counter(server, "HTTP Classify.task", "alpha", "OK") == before[("alpha", "OK")] + 1
    assert counter(server, "HTTP Classify.task", "_other", "NOT_FOUND") == before[("_other", "NOT_FOUND")] + 1
    status, got = classify(server, "alpha,alpha", clips[1])
    assert status == 400 and "alpha" in got["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_command(server, clips, tmp_path):
    f = tmp_path / "video.mp4"
    f.write_bytes(clips[0])
    out = subprocess.run(["curl", "-sS", "-F", f"clip=@{f}", "-F", "top_k=1",
                          f"http://127.0.0.1:{server.http_port}/v1/tasks/beta:classify"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    got = json.loads(out)
    assert got["task"] == "beta" and len(got["predictions"]) == 1 and got["predictions"][0]["label"].startswith("beta-")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_a_clip_under_another_field_name_is_told_the_right_one(server, clips, tmp_path):
    """The usual first try, ``curl -F file=@video.mp4``: 400 naming the expected field, not a size complaint."""
    f = tmp_path / "video.mp4"
    f.write_bytes(clips[0])
    before = counter(server, "HTTP Classify", "alpha", "INVALID_ARGUMENT")
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-F", f"file=@{f}",
                          f"http://127.0.0.1:{server.http_port}/v1/tasks/alpha:classify"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "400" and "file part named 'clip'" in json.loads(body)["error"] and "'file'" in body, out
    assert counter(server, "HTTP Classify", "alpha", "INVALID_ARGUMENT") == before + 1
    assert classify(server, "alpha", clips[0])[0] == 200  # the next request is served


@pytest.mark.parametrize("case,status,code,text", [
    ("no clip part", 400, "INVALID_ARGUMENT", "no 'clip' part"),
    ("not a video", 400, "INVALID_ARGUMENT", "not a readable video"),
    ("unknown task", 404, "NOT_FOUND", "nope"),
    ("too large", 400, "INVALID_ARGUMENT", "--max-clip-bytes"),
    ("unknown field", 400, "INVALID_ARGUMENT", "unknown form field 'colour'"),
    ("bad override", 400, "INVALID_ARGUMENT", "seek"),
    ("not multipart", 400, "INVALID_ARGUMENT", "multipart/form-data"),
])
def test_bad_uploads_get_a_status_and_a_message_and_the_server_goes_on(server, clips, case, status, code, text):
    task = "nope" if case == "unknown task" else "alpha"
    label = "_other" if case == "unknown task" else "alpha"
    before = counter(server, "HTTP Classify", label, code)
    if case == "not multipart":
        got_status, _, raw = request(f"{server.http_url}/v1/tasks/alpha:classify", clips[0], {"Content-Type": "video/mp4"})
        got = json.loads(raw)
    else:
        clip = {"no clip part": None, "not a video": media.garbage(2048), "too large": b"\0" * (MAX_CLIP + 1)}.get(
            case, clips[0])
        fields = {"colour": "red"} if case == "unknown field" else {"seek": "sideways"} if case == "bad override" else {}
        got_status, got = classify(server, task, clip, **fields)
    assert got_status == status and text in got["error"], got
    assert counter(server, "HTTP Classify", label, code) == before + 1
    ok_status, ok = classify(server, "alpha", clips[0])  # the next request is served
    assert ok_status == 200 and ok["task"] == "alpha"


@pytest.mark.parametrize("case,status,text", [
    ("unknown model", 404, "nope"),
    ("bad json", 400, "does not parse"),
    ("cut binary", 400, "element 1"),
    ("header past the body", 400, "Inference-Header-Content-Length"),
    ("unknown parameter", 400, "unknown request parameter 'colour'"),
])
def test_bad_infer_requests(server, clips, case, status, text):
    from server.frontends.oip_tensors import join_bytes_elements

    raw = join_bytes_elements(clips)
    model = "nope" if case == "unknown model" else "alpha"
    params = {"colour": "red"} if case == "unknown parameter" else {}
    size = len(raw) - 10 if case == "cut binary" else len(raw)
    doc = json.dumps({"inputs": [{"name": "CLIP", "datatype": "BYTES", "shape": [2],
                                  "parameters": {"binary_data_size": size}}], "parameters": params}).encode()
    if case == "bad json":
        doc = b"{" + doc
    body = doc + (raw[:-10] if case == "cut binary" else raw)
    length = len(body) + 5 if case == "header past the body" else len(doc)
    got, _, out = request(f"{server.http_url}/v2/models/{model}/infer", body,
                          {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"})
    assert got == status and text in json.loads(out)["error"]
    x = thttp.InferInput("CLIP", [1], "BYTES")
    x.set_data_from_numpy(np.array(clips[:1], dtype=np.object_))
    with thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}") as h:  # the next request is served
        assert h.infer("alpha", [x]).as_numpy("SCORES").shape == (1, 3)
    with pytest.raises(InferenceServerException) as e, thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}") as h:
        h.infer("nope", [x])
    assert e.value.status() == "404"


def test_an_empty_clip_element_over_rest_is_refused_as_over_the_native_api(server, clips):
    """An empty CLIP element of a REST infer is 400 with stadapter.v1's message for an empty clip, refused up front
    (no clip of the request decoded); the server serves the next request."""
    from server.frontends.oip_tensors import join_bytes_elements

    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError) as e:
        pb_grpc.VideoClassifierStub(ch).Classify(pb.ClassifyRequest(task="alpha", clip=b""), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    native = e.value.details()
    raw = join_bytes_elements([clips[0], b""])
    doc = json.dumps({"inputs": [{"name": "CLIP", "datatype": "BYTES", "shape": [2],
                                  "parameters": {"binary_data_size": len(raw)}}]}).encode()
    before = decodes(server.metrics_url)
    got, _, out = request(f"{server.http_url}/v2/models/alpha/infer", doc + raw,
                          {"Inference-Header-Content-Length": str(len(doc)), "Content-Type": "application/octet-stream"})
    assert got == 400 and native in json.loads(out)["error"], out
    assert decodes(server.metrics_url) == before, "the request's other clip was decoded before the refusal"
    x = thttp.InferInput("CLIP", [1], "BYTES")
    x.set_data_from_numpy(np.array(clips[:1], dtype=np.object_))
    with thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}") as h:  # the next request is served
        assert h.infer("alpha", [x]).as_numpy("SCORES").shape == (1, 3)


@pytest.mark.parametrize("how", ["hang up", "stall"])
def test_a_body_that_stops_frees_what_it_held(server, clips, how):
    """A client that hangs up mid-body is counted CANCELLED; one that stops sending gets 504 after
    --stream-idle-timeout-s; either way its bytes and its in-flight slot are given back."""
    code = "CANCELLED" if how == "hang up" else "DEADLINE_EXCEEDED"
    before = counter(server, "HTTP ModelInfer", "alpha", code)
    sent = b"x" * 50_000
    s = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    try:
        s.sendall(b"POST /v2/models/alpha/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n"
                  b"Inference-Header-Content-Length: 100\r\n\r\n" + sent)
        wait_for(lambda: counter_gauge(server, "stadapter_clip_in_flight_bytes") == len(sent), "the bytes held")
        if how == "stall":
            t0 = time.monotonic()
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 504") and b"--stream-idle-timeout-s" in reply
            assert time.monotonic() - t0 < IDLE_S + 5
    finally:
        s.close()
    wait_for(lambda: counter(server, "HTTP ModelInfer", "alpha", code) == before + 1, f"a {code} count")
    wait_for(lambda: counter_gauge(server, "stadapter_clip_in_flight_bytes") == 0, "the bytes freed")
    assert counter_gauge(server, "stadapter_requests_in_flight") == 0
    assert classify(server, "alpha", clips[0])[0] == 200


def test_http_port_flag():
    assert parse_args(["--model-repository", "r"]).http_port == 8000
    assert parse_args(["--model-repository", "r", "--http-port", "-1"]).http_port == -1
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", "r", "--http-port", "-2"])


def test_tokens_and_tls_on_http(tmp_path, clips):
    cert, key = self_signed_cert(tmp_path)
    (tmp_path / "classify.txt").write_text("classify-token\n")
    repo = make_repository(tmp_path / "repo")
    ctx = ssl.create_default_context(cafile=str(cert))
    with ServerProcess(repo, "--tls-cert", str(cert), "--tls-key", str(key), "--classify-token-file",
                       str(tmp_path / "classify.txt"), "--poll-interval-s", "0", "--no-warmup",
                       env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        base = f"https://127.0.0.1:{srv.http_port}"
        assert request(base + "/v2/health/ready", context=ctx)[0] == 200  # probes need no token
        for headers, want in (({}, "need 'authorization: Bearer <token>' header"),
                              ({"Authorization": "Bearer wrong"}, "not valid")):
            body, h = form({}, clips[0])
            status, _, out = request(base + "/v1/tasks/alpha:classify", body, {**h, **headers}, context=ctx)
            assert status == 401 and want in json.loads(out)["error"]
        body, h = form({}, clips[0])
        status, _, out = request(base + "/v1/tasks/alpha:classify", body,
                                 {**h, "Authorization": "Bearer classify-token"}, context=ctx)
        assert status == 200 and json.loads(out)["task"] == "alpha"
        assert request(base + "/v2/models/alpha", context=ctx)[0] == 401
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/v2/health/live", timeout=10).read()
        assert counter(srv, "HTTP Classify", "alpha", "UNAUTHENTICATED") == 2


def test_ready_turns_false_while_draining_and_in_flight_http_finishes(tmp_path, clips):
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--max-queue-delay-ms", "3000", "--max-batch-size", "64", "--poll-interval-s", "0",
                       env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(zip(("status", "body"), classify(srv, "beta", clips[1]), strict=True)))
        t.start()
        # admitted and waiting in the batcher (3 s)
        wait_for(lambda: counter_gauge(srv, "stadapter_queue_depth") >= 1, "the request to reach the queue")
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: request(srv.http_url + "/v2/health/ready")[0] == 503, "ready to turn 503", 5)
        status, _, body = request(srv.http_url + "/v2/health/ready")
        assert status == 503 and json.loads(body) == {"ready": False}
        assert request(srv.http_url + "/v2/health/live")[0] == 200
        refused, got = classify(srv, "alpha", clips[0])
        assert refused == 503 and "draining" in got["error"]
        t.join(30)
        assert result.get("status") == 200 and result["body"]["task"] == "beta", result
        assert srv.proc.wait(20) == 0


def counter_gauge(srv, name: str) -> float:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return next((s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name), 0.0)

