"""The Triton client against a Triton-protocol endpoint serving the real exported multi-task ONNX.

No Triton server runs in this suite: the endpoint is a small in-process implementation
of Triton's ``GRPCInferenceService`` (ModelConfig + ModelInfer, from tritonclient's own
protos) that checks every request against the exported ``config.pbtxt`` (names, dtypes,
dims without the batch axis, ``reshape``, ``max_batch_size``) the way Triton does, then
runs ``1/model.onnx`` in onnxruntime. So what is tested: the request the client builds,
the wire protocol through ``tritonclient.grpc``, and the answers against
``stadapter.predict`` on the same clip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent import futures

import grpc
import media
import numpy as np
import pytest
from factories import TINY_SAMPLING, make_bundle  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402
from tritonclient.grpc import service_pb2 as spb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as sgrpc  # noqa: E402

from clients import ClientError  # noqa: E402
from clients.cli import main as cli_main  # noqa: E402
from clients.triton import TritonClassifier, build_inputs, softmax_views  # noqa: E402
from stadapter import load_classifier  # noqa: E402
from stadapter.predict import predict_clip  # noqa: E402

NP = {"TYPE_FP32": (np.float32, "FP32"), "TYPE_INT64": (np.int64, "INT64")}


class FakeTriton(sgrpc.GRPCInferenceServiceServicer):
    """Triton's request checks for one ONNX model, then onnxruntime."""

    def __init__(self, model_dir):
        from export.runtime import make_session
        from export.triton import parse_config

        self.config = parse_config((model_dir / "config.pbtxt").read_text())
        self.session = make_session(model_dir / "1" / "model.onnx", "cpu", threads=1)
        self.requests: list[dict] = []

    def ModelConfig(self, request, context):
        if request.name != self.config.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}' is not found")
        return spb.ModelConfigResponse(config=self.config)

    def ModelInfer(self, request, context):
        if request.model_name != self.config.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.model_name}'")
        specs = {t.name: t for t in self.config.input}
        got = {t.name for t in request.inputs}
        if got != set(specs):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected inputs {sorted(specs)}, got {sorted(got)}")
        feeds, batch = {}, set()
        self.requests.append({t.name: (t.datatype, list(t.shape)) for t in request.inputs})
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            spec = specs[tensor.name]
            dtype, triton_type = NP[mc.DataType.Name(spec.data_type)]
            shape = list(tensor.shape)
            if tensor.datatype != triton_type:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{tensor.name}: datatype {tensor.datatype}, "
                                                                f"expected {triton_type}")
            if shape[1:] != list(spec.dims) or not 1 <= shape[0] <= self.config.max_batch_size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{tensor.name}: shape {shape}, expected "
                                                                f"[1..{self.config.max_batch_size}] + {list(spec.dims)}")
            batch.add(shape[0])
            arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
            if spec.HasField("reshape"):
                arr = arr.reshape([shape[0], *spec.reshape.shape])
            feeds[tensor.name] = arr
        if len(batch) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inputs disagree on the batch size: {sorted(batch)}")
        names = [o.name for o in self.config.output]
        values = self.session.run(names, feeds)
        resp = spb.ModelInferResponse(model_name=self.config.name, model_version="1", id=request.id)
        for spec, value in zip(self.config.output, values, strict=True):
            dtype, triton_type = NP[mc.DataType.Name(spec.data_type)]
            value = np.ascontiguousarray(value, dtype=dtype).reshape([value.shape[0], *spec.dims])
            resp.outputs.add(name=spec.name, datatype=triton_type, shape=list(value.shape))
            resp.raw_output_contents.append(value.tobytes())
        return resp


@pytest.fixture(scope="module")
def triton(tiny_trunk, tmp_path_factory):
    from export.onnx_export import ExportOptions, load_tasks
    from export.triton import TritonOptions, write_repository

    root = tmp_path_factory.mktemp("triton-client")
    a = make_bundle(tiny_trunk, root / "tasks" / "alpha", "alpha", labels=["a0", "a1", "a2"], seed=1)
    b = make_bundle(tiny_trunk, root / "tasks" / "beta", "beta", labels=[f"b{i}" for i in range(5)], seed=2,
                    sampling=TINY_SAMPLING.replace(temporal_views=2), version=3)
    write_repository(tiny_trunk, load_tasks(tiny_trunk, [a, b]), root / "triton",
                     TritonOptions(max_batch_size=8, kind="cpu"), ExportOptions(exporter="legacy"))
    servicer = FakeTriton(root / "triton" / "stadapter_multitask")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sgrpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    clip = media.make_clip(root / "clip.mp4", num_frames=20, size=(64, 48))
    yield {"url": f"127.0.0.1:{port}", "servicer": servicer, "bundles": {"alpha": a, "beta": b}, "clip": clip,
           "model_dir": root / "triton" / "stadapter_multitask"}
    server.stop(0)


def test_build_inputs_and_view_softmax():
    frames = np.zeros((2, 4, 3, 32, 32), np.float64)
    (n1, f, t1), (n2, idx, t2) = build_inputs(frames, 3)
    assert (n1, f.dtype, f.shape, t1) == ("frames", np.float32, (2, 4, 3, 32, 32), "FP32")
    assert (n2, idx.dtype, idx.tolist(), t2) == ("task_index", np.int64, [[3], [3]], "INT64")
    with pytest.raises(ClientError, match="frames must be"):
        build_inputs(np.zeros((4, 3, 32, 32), np.float32), 0)
    logits = np.array([[1.0, 2.0, 0.0, 99.0], [3.0, 0.0, 0.0, 99.0]], np.float32)  # padded column ignored
    p = softmax_views(logits, np.array([[3], [3]]))
    e1, e2 = np.exp([1.0, 2.0, 0.0]), np.exp([3.0, 0.0, 0.0])
    assert np.allclose(p, (e1 / e1.sum() + e2 / e2.sum()) / 2)


def test_triton_classify_matches_stadapter_predict(triton, tiny_trunk_dir):
    clf = TritonClassifier(triton["url"])
    try:
        assert sorted(clf.tasks) == ["alpha", "beta"]
        for task, k in (("alpha", 3), ("beta", 5)):
            got = clf.classify(triton["clip"], task, top_k=k)
            want = predict_clip(load_classifier(tiny_trunk_dir, triton["bundles"][task]), triton["clip"], k)
            assert [p.label for p in got.predictions] == [w["label"] for w in want]
            assert np.allclose([p.score for p in got.predictions], [w["score"] for w in want], atol=1e-4)
            assert got.task == task and got.task_version == (1 if task == "alpha" else 3)
    finally:
        clf.close()
    reqs = triton["servicer"].requests[-2:]
    assert reqs[0] == {"frames": ("FP32", [1, 4, 3, 32, 32]), "task_index": ("INT64", [1, 1])}
    assert reqs[1] == {"frames": ("FP32", [2, 4, 3, 32, 32]), "task_index": ("INT64", [2, 1])}  # 2 temporal views


def test_triton_cli_same_output_as_native_and_errors(triton, capsys, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(media.garbage(1024))
    assert cli_main(["triton-classify", str(triton["clip"]), "--url", triton["url"], "--task", "beta"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["CLIP", "TASK", "VERSION", "TOP-1", "SCORE", "NEXT", "MS"]
    assert lines[1].split()[1:3] == ["beta", "3"]
    assert cli_main(["triton-classify", str(triton["clip"]), "--url", triton["url"], "--task", "alpha", "--json",
                     "--top-k", "2"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js[0]["task"] == "alpha" and len(js[0]["predictions"]) == 2 and set(js[0]["predictions"][0]) == {
        "label", "score", "index"}
    assert cli_main(["triton-classify", str(triton["clip"]), "--url", triton["url"], "--task", "nope"]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli_main(["triton-classify", str(bad), "--url", triton["url"], "--task", "alpha"]) == 1
    assert "bad clip" in capsys.readouterr().err
    assert cli_main(["triton-classify", str(triton["clip"]), "--url", triton["url"], "--task", "alpha",
                     "--model", "other"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


# --- a real Triton server (optional) -------------------------------------------------------------

PYTRITON_SERVE = r'''"""Serve an exported stadapter_multitask model folder on a real Triton (nvidia-pytriton, python backend).

python pytriton_serve.py MODEL_DIR READY_FILE: onnxruntime runs MODEL_DIR/1/model.onnx inside a
Python callable; the config's inputs/outputs/max_batch_size/tasks_json are copied from
MODEL_DIR/config.pbtxt. Writes {"grpc_port": N} to READY_FILE once serving; stops on SIGTERM.
"""
import json, signal, socket, sys, threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.models import model as pm
from pytriton.triton import Triton, TritonConfig

model_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
tasks_json = cfg.parameters["tasks_json"].string_value
sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
NP = {mc.TYPE_FP32: np.float32, mc.TYPE_INT64: np.int64}

_orig = pm.Model._get_triton_model_config
def _with_tasks(self):  # pytriton has no API for custom config parameters: add tasks_json
    c = _orig(self)
    c.backend_parameters.setdefault("tasks_json", tasks_json)
    return c
pm.Model._get_triton_model_config = _with_tasks

@batch
def infer(frames, task_index):
    logits, num_classes = sess.run(["logits", "num_classes"], {"frames": frames, "task_index": task_index.reshape(-1)})
    return {"logits": logits, "num_classes": num_classes.reshape(-1, 1)}

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

ports = [free_port() for _ in range(3)]
tc = TritonConfig(grpc_address="127.0.0.1", http_address="127.0.0.1", grpc_port=ports[0], http_port=ports[1],
                  metrics_port=ports[2])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
with Triton(config=tc) as triton:
    triton.bind(model_name=cfg.name, infer_func=infer,
                inputs=[Tensor(name=t.name, dtype=NP[t.data_type], shape=tuple(t.dims)) for t in cfg.input],
                outputs=[Tensor(name=t.name, dtype=NP[t.data_type], shape=tuple(t.dims)) for t in cfg.output],
                config=ModelConfig(max_batch_size=cfg.max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=2000)))
    triton.run()
    ready.write_text(json.dumps({"grpc_port": ports[0]}))
    stop.wait()
'''


@pytest.mark.skipif(not os.environ.get("STADAPTER_PYTRITON_PYTHON"),
                    reason="set STADAPTER_PYTRITON_PYTHON to a Python with nvidia-pytriton, numpy<2, onnxruntime "
                           "(make test builds one from /usr/bin/python3.11)")
def test_triton_classify_on_a_real_triton_server(triton, tmp_path):
    """Real tritonserver (pytriton's python backend) running the exported ONNX in onnxruntime."""
    script, ready = tmp_path / "pytriton_serve.py", tmp_path / "ready.json"
    script.write_text(PYTRITON_SERVE)
    log = open(tmp_path / "triton.log", "wb")
    proc = subprocess.Popen([os.environ["STADAPTER_PYTRITON_PYTHON"], str(script), str(triton["model_dir"]), str(ready)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 120
        while not (ready.exists() and ready.read_text()):
            assert proc.poll() is None and time.monotonic() < end, (tmp_path / "triton.log").read_text()[-3000:]
            time.sleep(0.2)
        url = f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"
        real, fake = TritonClassifier(url), TritonClassifier(triton["url"])
        try:
            for task in ("alpha", "beta"):
                got, want = real.classify(triton["clip"], task, top_k=0), fake.classify(triton["clip"], task, top_k=0)
                assert [p.label for p in got.predictions] == [p.label for p in want.predictions]
                assert np.allclose([p.score for p in got.predictions], [p.score for p in want.predictions], atol=1e-5)
        finally:
            real.close()
            fake.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
