"""The Open Inference Protocol (KServe v2) over gRPC, with tritonclient.grpc against the real server.

Every task is a model: metadata, config, readiness, ModelInfer on BYTES clips (raw
and typed contents), parameters, the repository extension behind the admin token,
and errors with the protocol's codes, the server serving the next request after each.
"""

from __future__ import annotations

import json
import urllib.request

import grpc
import media
import numpy as np
import pytest
import tritonclient.grpc as tc
from http_calls import decodes
from serverproc import ServerProcess, make_repository
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from clients import Client
from server.frontends.oip_tensors import join_bytes_elements, split_bytes_elements
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
TOKEN = "oip-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("oip") / "repo", tasks=(("alpha", 3), ("beta", 4), ("gamma", 2)))
    with ServerProcess(repo, "--poll-interval-s", "0", env={"STADAPTER_ADMIN_TOKEN": TOKEN}) as srv:
        yield srv


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("oip-clips")
    return [media.make_clip(d / f"c{i}.mp4", num_frames=10 + 6 * i).read_bytes() for i in range(2)]


@pytest.fixture()
def triton(server):
    c = tc.InferenceServerClient(server.address)
    yield c
    c.close()


def _infer(client, model, clips, params=None, outputs=None, version=""):
    x = tc.InferInput("CLIP", [len(clips)], "BYTES")
    x.set_data_from_numpy(np.array(clips, dtype=np.object_))
    wanted = [tc.InferRequestedOutput(n) for n in outputs] if outputs else None
    return client.infer(model, [x], model_version=version, outputs=wanted, parameters=params)


def _code(e: InferenceServerException) -> str:
    return (e.status() or "").rsplit(".", 1)[-1]


def test_health_metadata_and_config(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("alpha") and triton.is_model_ready("alpha", "1")
    assert not triton.is_model_ready("alpha", "7") and not triton.is_model_ready("nope")
    meta = triton.get_server_metadata()
    assert meta.name == "stadapter" and "model_repository" in meta.extensions
    m = triton.get_model_metadata("beta")
    assert m.versions == ["1"] and [(i.name, i.datatype, list(i.shape)) for i in m.inputs] == [("CLIP", "BYTES", [-1])]
    assert [(o.name, o.datatype) for o in m.outputs] == [("LABELS", "BYTES"), ("SCORES", "FP32")]
    cfg = triton.get_model_config("beta").config
    assert cfg.name == "beta" and json.loads(cfg.parameters["labels"].string_value) == [f"beta-{i}" for i in range(4)]


def test_model_infer_answers_as_the_native_api(server, triton, clips):
    res = _infer(triton, "beta", clips, params={"top_k": 2})
    labels, scores = res.as_numpy("LABELS"), res.as_numpy("SCORES")
    assert labels.shape == (2, 2) and scores.shape == (2, 2) and scores.dtype == np.float32
    assert res.get_response().model_version == "1"
    with Client(server.address) as native:
        for i, clip in enumerate(clips):
            r = native.classify(clip, "beta", top_k=2)
            assert [p.label for p in r.predictions] == [b.decode() for b in labels[i]]
            assert np.allclose([p.score for p in r.predictions], scores[i], atol=1e-6)
    only = _infer(triton, "alpha", clips[:1], outputs=["SCORES"])
    assert only.as_numpy("LABELS") is None and only.as_numpy("SCORES").shape == (1, 3)  # default top_k 5, 3 classes
    changed = _infer(triton, "alpha", clips[:1], params={"num_frames": 2, "spatial_views": 3, "seek": "keyframe",
                                                         "triton_enable_empty_final_response": True})  # as perf_analyzer
    assert changed.as_numpy("SCORES").shape == (1, 3)


def test_typed_contents_and_raw_framing(server, clips):
    with grpc.insecure_channel(server.address) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        req = oip.ModelInferRequest(model_name="alpha")
        req.inputs.add(name="CLIP", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(clips)
        resp = stub.ModelInfer(req, timeout=60)
        assert [list(o.shape) for o in resp.outputs] == [[2, 3], [2, 3]]
        assert len(split_bytes_elements(resp.raw_output_contents[0], 6)) == 6
        bad = oip.ModelInferRequest(model_name="alpha")
        bad.inputs.add(name="CLIP", datatype="BYTES", shape=[2])
        bad.raw_input_contents.append(join_bytes_elements(clips)[:-10])  # cut inside the second clip
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(bad, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "element 1" in e.value.details()


@pytest.mark.parametrize("case,code,text", [
    ("unknown model", "NOT_FOUND", "nope"),
    ("unknown version", "NOT_FOUND", "served at version 1"),
    ("wrong datatype", "INVALID_ARGUMENT", "must be BYTES"),
    ("wrong input", "INVALID_ARGUMENT", "takes one input, 'CLIP'"),
    ("unknown parameter", "INVALID_ARGUMENT", "unknown request parameter 'colour'"),
    ("parameter type", "INVALID_ARGUMENT", "top_k' must be a int64"),
    ("bad override", "INVALID_ARGUMENT", "seek"),
    ("not a video", "INVALID_ARGUMENT", "not a readable video"),
    ("unknown output", "INVALID_ARGUMENT", "unknown output"),
])
def test_bad_requests_get_the_protocol_codes_and_the_server_goes_on(triton, clips, case, code, text):
    def call():
        if case == "unknown model":
            return _infer(triton, "nope", clips[:1])
        if case == "unknown version":
            return _infer(triton, "alpha", clips[:1], version="7")
        if case in ("wrong datatype", "wrong input"):
            x = tc.InferInput("CLIP" if case == "wrong datatype" else "FRAMES", [1], "FP32" if case == "wrong datatype"
                              else "BYTES")
            x.set_data_from_numpy(np.zeros(1, np.float32) if case == "wrong datatype" else np.array(clips[:1], object))
            return triton.infer("alpha", [x])
        if case == "unknown parameter":
            return _infer(triton, "alpha", clips[:1], params={"colour": "red"})
        if case == "parameter type":
            return _infer(triton, "alpha", clips[:1], params={"top_k": "three"})
        if case == "bad override":
            return _infer(triton, "alpha", clips[:1], params={"seek": "sideways"})
        if case == "not a video":
            return _infer(triton, "alpha", [media.garbage(2048)])
        return _infer(triton, "alpha", clips[:1], outputs=["LOGITS"])

    with pytest.raises(InferenceServerException) as e:
        call()
    assert _code(e.value) == code and text in e.value.message(), e.value.message()
    assert _infer(triton, "alpha", clips[:1]).as_numpy("SCORES").shape == (1, 3)  # still serving


def test_repository_extension_needs_the_admin_token(server, triton, clips):
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_repository_index()
    assert _code(e.value) in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    index = triton.get_model_repository_index(headers=AUTH)
    assert [(m.name, m.version, m.state) for m in index.models][:1] == [("alpha", "1", "READY")]
    triton.load_model("gamma", headers=AUTH)  # served: load succeeds
    with pytest.raises(InferenceServerException) as e:
        triton.load_model("nope", headers=AUTH)
    assert _code(e.value) == "NOT_FOUND"
    triton.unload_model("gamma", headers=AUTH)
    assert not triton.is_model_ready("gamma")
    with pytest.raises(InferenceServerException) as e:
        _infer(triton, "gamma", clips[:1])
    assert _code(e.value) == "NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        triton.unload_model("gamma", headers=AUTH)  # gone: NOT_FOUND, counted as such
    assert _code(e.value) == "NOT_FOUND"
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'method="ModelInfer"' in text and 'method="RepositoryModelUnload"' in text
    assert 'stadapter_unregistrations_total{result="not_found"} 1.0' in text


EMPTY_CLIP = "the clip is empty (0 bytes)"  # what stadapter.v1's Classify answers for an empty clip


@pytest.mark.parametrize("form", ["raw", "typed"])
def test_an_empty_clip_element_is_refused_as_over_the_native_api(server, triton, clips, form):
    """An empty CLIP element is INVALID_ARGUMENT with the native API's message, refused up front as a too-large one
    is (no clip of the request decoded); the server serves the next request."""
    before = decodes(server.metrics_url)
    with grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.VideoClassifierStub(ch).Classify(pb.ClassifyRequest(task="alpha", clip=b""), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and EMPTY_CLIP in e.value.details()
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        req = oip.ModelInferRequest(model_name="alpha")
        t = req.inputs.add(name="CLIP", datatype="BYTES", shape=[2])
        if form == "raw":
            req.raw_input_contents.append(join_bytes_elements([clips[0], b""]))
        else:
            t.contents.bytes_contents.extend([clips[0], b""])
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and EMPTY_CLIP in e.value.details(), e.value.details()
    assert decodes(server.metrics_url) == before, "the request's other clip was decoded before the refusal"
    assert _infer(triton, "alpha", clips[:1]).as_numpy("SCORES").shape == (1, 3)  # still serving
