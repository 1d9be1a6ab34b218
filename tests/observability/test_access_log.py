"""Access lines, request ids and the log format: units for the formatter and the id rules, and the real server
(gRPC: stadapter.v1 and OIP; HTTP: multipart upload and OIP infer) with ``--log-format json``."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import urllib.request
from pathlib import Path
from typing import Optional

import grpc
import media
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from http_calls import access_lines, http_call, multipart
from serverproc import ServerProcess, make_repository

from clients.core import register_chunks
from server.config import ServerConfig, parse_args
from server.observability import access_log
from server.observability.access_log import AccessRecord, http_code, safe_text, valid_request_id
from server.observability.logs import JsonFormatter, RequestIdFilter, TextFormatter, configure_logging, request_scope
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

HEX_ID = re.compile(r"[0-9a-f]{32}")
BASE_KEYS = {"ts", "level", "logger", "message", "request_id"}
ACCESS_KEYS = BASE_KEYS | {"protocol", "method", "tasks", "code", "http_status", "ms", "bytes_in", "bytes_out"}


# --- units ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,ok", [
    ("abc-1", True), ("A.b_c~9!#$%&'*+^`|", True), ("x" * 128, True),
    ("", False), ("x" * 129, False), ("a b", False), ("a\nb", False), ("h\u00e9llo", False), ('a"b', False),
    ("a=b", False), ("a\tb", False), (None, False), (b"abc", False),
])
def test_request_id_rules(value, ok):
    assert valid_request_id(value) == (value if ok else None)


def test_safe_text_cuts_and_replaces():
    assert safe_text("alpha") == "alpha"
    assert safe_text("a b\nc\u00e9") == "a?b?c?"
    long = safe_text("x" * 10_000)
    assert long == "x" * access_log.MAX_TASK_CHARS + "...(10000 chars)"


def test_http_codes_share_the_grpc_vocabulary():
    assert [http_code(s) for s in (200, 204, 400, 404, 429, 499, 503, 504, 405)] == [
        "OK", "OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED", "UNAVAILABLE",
        "DEADLINE_EXCEEDED", "UNKNOWN"]


def test_the_field_tables_name_real_fields():
    from google.protobuf import descriptor_pool
    from tritonclient.grpc import service_pb2  # noqa: F401 - loads the inference.* descriptors

    pool = descriptor_pool.Default()
    for name, fields in access_log.TASK_FIELDS.items():
        desc = pool.FindMessageTypeByName(name)
        assert all(f in desc.fields_by_name for f in fields), name
    for name, field in access_log.ID_FIELDS.items():
        assert field in pool.FindMessageTypeByName(name).fields_by_name, name


def test_request_bytes_are_the_wire_bytes_counted_as_they_are_read():
    raw = pb.ClassifyChunk(task="alpha", data=b"\0" * 5000).SerializeToString()
    rec = AccessRecord("grpc", "m", logging.INFO, None)
    token = request_scope.set(rec)
    try:
        deserialize = access_log._counted(pb.ClassifyChunk.FromString)
        msgs = [deserialize(raw), deserialize(raw)]
    finally:
        request_scope.reset(token)
    assert rec.bytes_in == 2 * len(raw) and msgs[0].task == "alpha"
    assert access_log._counted(None)(b"abc") == b"abc"  # no deserializer: the bytes themselves


def _record(msg: str, *args, exc=None, **extra) -> logging.LogRecord:
    rec = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, msg, args, exc, extra=extra or None)
    RequestIdFilter().filter(rec)
    return rec


def test_json_lines_are_one_ascii_object_with_stable_keys():
    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
    line = JsonFormatter().format(_record("two\nlines \u00e9 %s", "arg", exc=exc))
    assert "\n" not in line and line.isascii()
    doc = json.loads(line)
    assert set(doc) == BASE_KEYS | {"exc"} and doc["message"] == "two\nlines \u00e9 arg" and doc["request_id"] is None
    assert "ValueError: boom" in doc["exc"] and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])


def test_access_record_fields_and_both_formats():
    rec = AccessRecord("grpc", "stadapter.v1.VideoClassifier/Classify", logging.INFO, "rid-1")
    rec.add_tasks(["alpha", "", "alpha", "x" * 500, *[f"t{i}" for i in range(30)]])
    rec.bytes_in, rec.bytes_out = 10, 20
    rec.finish("NOT_FOUND")
    record = _record("line", access=rec, request_id=rec.request_id)
    doc = json.loads(JsonFormatter().format(record))
    assert set(doc) == ACCESS_KEYS and doc["request_id"] == "rid-1" and doc["code"] == "NOT_FOUND"
    assert doc["tasks"][:2] == ["alpha", "x" * 64 + "...(500 chars)"] and len(doc["tasks"]) == 17
    assert doc["tasks"][-1] == "+16" and doc["ms"] >= 0 and (doc["bytes_in"], doc["bytes_out"]) == (10, 20)
    assert TextFormatter().format(record).endswith(" ERROR t [rid-1]: line")


def test_a_message_id_is_adopted_only_without_a_client_header():
    assert access_log.adopt_request_id("form-1") == ""  # outside a request
    for header, offered, expected in ((None, "form-1", "form-1"), (None, "bad id", None), ("hdr-1", "form-1", "hdr-1")):
        rec = AccessRecord("http", "POST /x", logging.INFO, header)
        token = request_scope.set(rec)
        try:
            got = access_log.adopt_request_id(offered)
        finally:
            request_scope.reset(token)
        assert got == rec.request_id and (HEX_ID.fullmatch(got) if expected is None else got == expected)


def test_records_made_inside_a_request_carry_its_id():
    token = request_scope.set(AccessRecord("http", "GET /x", logging.INFO, None))
    try:
        inside = json.loads(JsonFormatter().format(_record("failed")))
    finally:
        request_scope.reset(token)
    assert HEX_ID.fullmatch(inside["request_id"])
    assert json.loads(JsonFormatter().format(_record("outside")))["request_id"] is None
    assert ": outside" in TextFormatter().format(_record("outside")) and "[" not in TextFormatter().format(_record("o"))


def test_malformed_requests_are_one_warning_line():
    from aiohttp.http_exceptions import LineTooLong

    from server.observability.logs import MalformedRequestFilter

    try:
        raise LineTooLong("w" * 100, "8190")
    except LineTooLong:
        rec = logging.getLogger("aiohttp.server").makeRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                                             "Error handling request from %s", ("1.2.3.4",), sys.exc_info())
    assert MalformedRequestFilter().filter(rec) and rec.levelno == logging.WARNING and rec.exc_info is None
    line = TextFormatter().format(rec)
    assert "\n" not in line and line.count("WARNING") == 1 and "Error handling request from 1.2.3.4: 400" in line


def test_configure_logging_sets_level_and_format():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    out = io.StringIO()
    try:
        configure_logging("warning", "json", out)
        logging.getLogger("server.access").info("hidden")
        logging.getLogger("server").warning("shown")
        assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["shown"]
        with pytest.raises(ValueError, match="debug|info"):
            configure_logging("verbose", "json", out)
        with pytest.raises(ValueError, match="text|json"):
            configure_logging("info", "xml", out)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved[2:]


def test_log_flags():
    cfg = parse_args(["--model-repository", "r", "--log-level", "debug", "--log-format", "json"])
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")
    assert (parse_args(["--model-repository", "r"]).log_level, ServerConfig(Path(".")).log_format) == ("info", "text")
    with pytest.raises(ValueError, match="log_level"):
        ServerConfig(Path("."), log_level="loud")
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", "r", "--log-format", "xml"])


# --- the real server -----------------------------------------------------------------------------------


integration = pytest.mark.integration


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repository(tmp_path_factory.mktemp("access-repo"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return media.make_clip(tmp_path_factory.mktemp("access-clip") / "c.mp4", num_frames=8).read_bytes()


FAST = ("--decode-backend", "thread", "--decode-workers", "1", "--poll-interval-s", "0")


@pytest.fixture(scope="module")
def server(repo):
    with ServerProcess(repo, "--log-format", "json", "--allow-insecure-admin", *FAST) as srv:
        yield srv


def trailing_id(call_or_error) -> Optional[str]:
    return dict(call_or_error.trailing_metadata() or ()).get("x-request-id")


@integration
def test_grpc_classify_line_carries_the_client_id(server, clip):
    stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(server.address))
    resp, call = stub.Classify.with_call(pb.ClassifyRequest(task="alpha", clip=clip, top_k=2),
                                         metadata=(("x-request-id", "client-id-1"),), timeout=60)
    assert trailing_id(call) == "client-id-1" and resp.task == "alpha"
    [line] = access_lines(server, "client-id-1")
    assert set(line) == ACCESS_KEYS and line["level"] == "INFO"
    assert (line["protocol"], line["method"], line["tasks"], line["code"]) == (
        "grpc", "stadapter.v1.VideoClassifier/Classify", ["alpha"], "OK")
    assert line["ms"] > 0 and line["bytes_in"] > len(clip) and line["bytes_out"] == resp.ByteSize()
    assert line["http_status"] is None


@integration
def test_unknown_task_is_not_found_in_the_line_and_the_id_comes_back(server, clip):
    stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(server.address))
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(pb.ClassifyRequest(task="nope", clip=clip), metadata=(("x-request-id", "missing-1"),), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and trailing_id(e.value) == "missing-1"
    [line] = access_lines(server, "missing-1")
    assert line["code"] == "NOT_FOUND" and line["tasks"] == ["nope"] and line["bytes_out"] == 0


@integration
def test_the_message_id_is_used_without_metadata_and_streams_are_counted(server, clip):
    stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(server.address))
    half = len(clip) // 2
    chunks = [pb.ClassifyChunk(task="beta", request_id="stream-1", data=clip[:half]), pb.ClassifyChunk(data=clip[half:])]
    resp, call = stub.ClassifyStream.with_call(iter(chunks), timeout=60)
    assert resp.request_id == "stream-1" and trailing_id(call) == "stream-1"
    [line] = access_lines(server, "stream-1")
    assert line["method"] == "stadapter.v1.VideoClassifier/ClassifyStream" and line["tasks"] == ["beta"]
    assert line["bytes_in"] == sum(c.ByteSize() for c in chunks) and line["code"] == "OK"
    batch = pb.BatchClassifyRequest(requests=[pb.ClassifyRequest(task="alpha", clip=clip),
                                              pb.ClassifyRequest(tasks=["beta", "alpha"], clip=clip)])
    _, call = stub.BatchClassify.with_call(batch, timeout=60)
    [line] = access_lines(server, trailing_id(call))
    assert line["tasks"] == ["alpha", "beta"] and HEX_ID.fullmatch(line["request_id"])


@integration
def test_oip_grpc_infer_line(server, clip):
    from tritonclient.grpc import service_pb2 as oip
    from tritonclient.grpc import service_pb2_grpc as oip_grpc

    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
    req = oip.ModelInferRequest(model_name="beta", id="oip-1", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="CLIP", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[clip]))])
    _, call = stub.ModelInfer.with_call(req, timeout=60)
    assert trailing_id(call) == "oip-1"
    [line] = access_lines(server, "oip-1")
    assert (line["method"], line["tasks"], line["code"]) == ("inference.GRPCInferenceService/ModelInfer", ["beta"], "OK")


HOSTILE_METADATA = ("y" * 7000, "two words", 'quote"d', "k=v")


@integration
def test_hostile_request_ids_are_replaced_and_never_logged(server, clip):
    stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(server.address))
    body_id = "x" * 10_000 + "\nINFO forged line \u00e9"
    ids = []
    for value in HOSTILE_METADATA:
        _, call = stub.Classify.with_call(pb.ClassifyRequest(task="alpha", clip=clip), metadata=(("x-request-id", value),),
                                          timeout=60)
        ids.append(trailing_id(call))
    resp, call = stub.Classify.with_call(pb.ClassifyRequest(task="alpha", clip=clip, request_id=body_id), timeout=60)
    ids.append(trailing_id(call))
    assert resp.request_id == body_id  # the client's own field comes back to it, not into the log
    try:  # 10,000 chars of metadata: between grpc's soft (8 KiB) and hard limits it refuses some calls itself
        _, call = stub.Classify.with_call(pb.ClassifyRequest(task="alpha", clip=clip),
                                          metadata=(("x-request-id", "z" * 10_000),), timeout=60)
        ids.append(trailing_id(call))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for rid in ids:
        assert HEX_ID.fullmatch(rid) and [d["code"] for d in access_lines(server, rid)] == ["OK"]
    log = server.log()
    for text in ("y" * 200, "x" * 200, "z" * 200, "two words", 'quote"d', 'quote\\"d', "k=v", "forged", "\\u00e9"):
        assert text not in log, text
    assert stub.Classify(pb.ClassifyRequest(task="alpha", clip=clip), timeout=60).task == "alpha"  # still serving


@integration
def test_an_admin_call_names_its_task_and_its_log_lines_carry_the_id(server, repo, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from factories import make_bundle

    from stadapter import load_trunk

    bundle = make_bundle(load_trunk(repo / "trunk"), tmp_path / "gamma", name="gamma", seed=7)
    files = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    admin = pb_grpc.TaskAdminStub(grpc.insecure_channel(server.address))
    resp, call = admin.RegisterTask.with_call(register_chunks(files, 1 << 12), metadata=(("x-request-id", "reg-1"),),
                                              timeout=60)
    assert resp.task.name == "gamma" and trailing_id(call) == "reg-1"
    [line] = access_lines(server, "reg-1")
    assert line["method"] == "stadapter.v1.TaskAdmin/RegisterTask" and line["tasks"] == ["gamma"]
    lines = [json.loads(x) for x in server.log().splitlines() if x.startswith('{"ts"')]
    assert any(d["request_id"] == "reg-1" and "registered task gamma" in d["message"] for d in lines)


@integration
def test_http_upload_and_oip_infer_lines(server, clip):
    from server.frontends.oip_tensors import join_bytes_elements

    body, ctype = multipart(clip)
    status, headers, out = http_call(server, "POST", "/v1/tasks/alpha:classify", body,
                                {"Content-Type": ctype, "X-Request-Id": "curl-1"})
    assert status == 200 and headers["X-Request-Id"] == "curl-1" and json.loads(out)["task"] == "alpha"
    [line] = access_lines(server, "curl-1")
    assert (line["protocol"], line["method"], line["tasks"], line["code"], line["http_status"]) == (
        "http", "POST /v1/tasks/{task}:classify", ["alpha"], "OK", 200)
    assert line["bytes_in"] == len(body) and line["bytes_out"] == len(out) and line["ms"] > 0

    raw = join_bytes_elements([clip])
    doc = json.dumps({"inputs": [{"name": "CLIP", "datatype": "BYTES", "shape": [1],
                                  "parameters": {"binary_data_size": len(raw)}}]}).encode()
    status, headers, out = http_call(server, "POST", "/v2/models/beta/infer", doc + raw,
                                {"Inference-Header-Content-Length": str(len(doc)), "x-request-id": "oip-http-1"})
    assert status == 200 and headers["X-Request-Id"] == "oip-http-1"
    [line] = access_lines(server, "oip-http-1")
    assert (line["method"], line["tasks"], line["code"]) == ("POST /v2/models/{task}/infer", ["beta"], "OK")

    status, headers, _ = http_call(server, "POST", "/v2/models/nope/infer", doc + raw,
                              {"Inference-Header-Content-Length": str(len(doc)), "X-Request-Id": "oip-http-2"})
    assert status == 404 and headers["X-Request-Id"] == "oip-http-2"
    assert [(d["code"], d["http_status"]) for d in access_lines(server, "oip-http-2")] == [("NOT_FOUND", 404)]
    status, headers, _ = http_call(server, "GET", "/no/such/path", headers={"X-Request-Id": "no-route-1"})
    assert status == 404 and headers["X-Request-Id"] == "no-route-1"
    assert [d["method"] for d in access_lines(server, "no-route-1")] == ["GET (no route)"]


@integration
def test_hostile_http_request_ids(server):
    sent = []
    for value in (b"h\xc3\xa9llo-utf8", b"two words", b"tab\there", b"q" * 5000):
        status, headers, _ = http_call(server, "GET", "/v2", headers={"X-Request-Id": value})
        assert status == 200 and HEX_ID.fullmatch(headers["X-Request-Id"])
        sent.append(headers["X-Request-Id"])
    status, _, _ = http_call(server, "GET", "/v2", headers={"X-Request-Id": b"w" * 10_000})  # aiohttp's own header limit
    assert status == 400
    for rid in sent:
        assert [d["method"] for d in access_lines(server, rid)] == ["GET /v2"]
    log = server.log()
    for text in ("llo-utf8", "two words", "tab", "q" * 100, "w" * 101):  # aiohttp quotes 100 bytes of a bad header
        assert text not in log, text
    [bad] = [d for d in map(json.loads, [x for x in log.splitlines() if x.startswith('{"ts"')]) if d["logger"] == "aiohttp.server"]
    assert bad["level"] == "WARNING" and "exc" not in bad and "8190 bytes" in bad["message"]
    assert http_call(server, "GET", "/v2")[0] == 200


@integration
def test_health_probes_stay_out_of_the_info_log(server):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    _, call = health.Check.with_call(health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "probe-1"),), timeout=10)
    assert trailing_id(call) == "probe-1"
    for path in ("/v2/health/live", "/v2/health/ready"):
        status, headers, _ = http_call(server, "GET", path, headers={"X-Request-Id": "probe-2"})
        assert status == 200 and headers["X-Request-Id"] == "probe-2"
    status, headers, _ = http_call(server, "GET", "/v2", headers={"X-Request-Id": "after-probes"})
    assert access_lines(server, "after-probes")  # logged lines are in by now
    assert not access_lines(server, "probe-1", timeout=0) and not access_lines(server, "probe-2", timeout=0)


@integration
def test_debug_logs_probes_as_text_and_warning_logs_no_access_lines(repo, clip):
    with ServerProcess(repo, "--log-level", "debug", *FAST) as srv:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.address))
        health.Check(health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "probe-3"),), timeout=10)
        urllib.request.urlopen(urllib.request.Request(srv.http_url + "/v2/health/ready", headers={"X-Request-Id": "probe-4"}),
                               timeout=10).read()
        pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address)).Classify(
            pb.ClassifyRequest(task="alpha", clip=clip), metadata=(("x-request-id", "text-1"),), timeout=60)
        assert srv.stop() == 0  # the exit flushes every line: what the log lacks now, it never had
        log = srv.log()
    assert re.search(r"DEBUG server\.access \[probe-3\]: grpc grpc\.health\.v1\.Health/Check tasks=- code=OK ", log)
    assert re.search(r"DEBUG server\.access \[probe-4\]: http GET /v2/health/ready tasks=- code=OK status=200 ", log)
    assert re.search(r"INFO server\.access \[text-1\]: grpc stadapter\.v1\.VideoClassifier/Classify tasks=alpha "
                     r"code=OK ms=\d+\.\d in=\d+ out=\d+\n", log)

    with ServerProcess(repo, "--log-level", "warning", "--log-format", "json", *FAST) as srv:
        stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
        _, call = stub.Classify.with_call(pb.ClassifyRequest(task="alpha", clip=clip),
                                          metadata=(("x-request-id", "quiet-1"),), timeout=60)
        assert trailing_id(call) == "quiet-1"  # still echoed
        with pytest.raises(grpc.RpcError):
            stub.Classify(pb.ClassifyRequest(task="nope", clip=clip), timeout=60)
        status, headers, _ = http_call(srv, "GET", "/v2", headers={"X-Request-Id": "quiet-2"})
        assert status == 200 and headers["X-Request-Id"] == "quiet-2"
        assert srv.stop() == 0  # the exit flushes every line: what the log lacks now, it never had
        assert not access_lines(srv) and "quiet-1" not in srv.log()


@integration
def test_without_a_client_id_body_trailer_and_line_agree_and_windows_lines_name_their_task(server, clip):
    stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(server.address))
    resp, call = stub.Classify.with_call(pb.ClassifyRequest(task="alpha", clip=clip), timeout=60)
    assert HEX_ID.fullmatch(resp.request_id) and trailing_id(call) == resp.request_id
    assert access_lines(server, resp.request_id)[0]["tasks"] == ["alpha"]
    call = stub.ClassifyWindows(pb.ClassifyWindowsRequest(task="beta", clip=clip, window_s=0.2, stride_s=0.1), timeout=60)
    assert {r.request_id for r in call} == {trailing_id(call)}
    [line] = access_lines(server, trailing_id(call))
    assert (line["method"], line["tasks"], line["code"]) == ("stadapter.v1.VideoClassifier/ClassifyWindows", ["beta"], "OK")
