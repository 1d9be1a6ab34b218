"""The device and dtype a server resolved are in its ready file and its startup log; a bf16 server on a CPU (its
trunk's weights packed for oneDNN) answers, and so does one with ``--quantize int8``, and one whose wide trunk the
default ``--quantize auto`` serves in int8; a start that cannot quantise is refused with the reason.

The real server on 127.0.0.1 (``python -m server``): ``--dtype`` as the suite pins it (float32), as named
(bfloat16), and ``auto`` (this machine's choice, by the same rule the test process applies).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import media
import pytest
import torch
from serverproc import ServerProcess, make_repository

from server.engine.model import dtype_name, resolve_dtype
from stadapter import load_classifier
from stadapter.predict import predict_clip
from stadapter.trunk.packed import packing_available
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repository(tmp_path_factory.mktemp("dtype") / "repo")


@pytest.mark.parametrize("flags, want", [
    ((), "float32"),  # tests/serverproc.py pins float32 unless a test names a dtype
    (("--dtype", "bfloat16"), "bfloat16"),
    (("--dtype", "auto"), dtype_name(resolve_dtype("auto", torch.device("cpu")))),
])
def test_the_ready_file_and_the_log_name_the_device_and_dtype(repo, flags, want):
    clip = media.make_clip(num_frames=12)
    with ServerProcess(repo, "--device", "cpu", "--poll-interval-s", "0", *flags) as srv:
        info = json.loads(srv.ready_file.read_text())
        assert (info["device"], info["dtype"], info["quantize"]) == ("cpu", want, "none")
        assert info["grpc_port"] == srv.grpc_port  # the ports as before
        given = flags[1] if flags else "float32"
        assert f"device cpu, dtype {want} (--device cpu, --dtype {given})" in srv.log()
        assert ("weights packed for oneDNN" in srv.log()) == (want == "bfloat16" and packing_available())
        with grpc.insecure_channel(srv.address) as channel:
            resp = pb_grpc.VideoClassifierStub(channel).Classify(pb.ClassifyRequest(task="alpha", clip=clip, top_k=3),
                                                                 timeout=60)
    clf = load_classifier(repo / "trunk", repo / "tasks" / "alpha" / "1")
    offline = predict_clip(clf, clip, 3)  # float32
    tolerance = 1e-4 if want == "float32" else 2e-2  # bf16 keeps 8 bits of mantissa
    assert [p.label for p in resp.predictions] == [w["label"] for w in offline]
    assert max(abs(p.score - w["score"]) for p, w in zip(resp.predictions, offline, strict=True)) < tolerance


@pytest.mark.skipif(not packing_available(int8=True), reason="this torch build has no oneDNN int8 linear")
def test_an_int8_server_says_so_and_answers_like_float32(repo):
    _int8_server_says_so_and_answers_like_float32(
        repo, ("--quantize", "int8"), "dtype bfloat16 (--device cpu, --dtype bfloat16), block linears in int8 (--quantize int8)")


def _int8_server_says_so_and_answers_like_float32(repo: Path, flags: tuple[str, ...], says: str) -> None:
    clip = media.make_clip(num_frames=12)
    with ServerProcess(repo, "--device", "cpu", "--dtype", "bfloat16", *flags, "--poll-interval-s", "0") as srv:
        info = json.loads(srv.ready_file.read_text())
        assert (info["device"], info["dtype"], info["quantize"]) == ("cpu", "bfloat16", "int8")
        assert says in srv.log()
        with grpc.insecure_channel(srv.address) as channel:
            resp = pb_grpc.VideoClassifierStub(channel).Classify(pb.ClassifyRequest(task="alpha", clip=clip, top_k=3),
                                                                 timeout=60)
    offline = predict_clip(load_classifier(repo / "trunk", repo / "tasks" / "alpha" / "1"), clip, 3)  # float32
    assert [p.label for p in resp.predictions] == [w["label"] for w in offline]
    assert max(abs(p.score - w["score"]) for p, w in zip(resp.predictions, offline, strict=True)) < 5e-2


@pytest.mark.parametrize("flags, reason", [
    (("--dtype", "float32"), "cannot start: --quantize int8 runs on a CPU in bfloat16, not on device cpu in float32"),
    (("--dtype", "bfloat16", "--quantize", "int4"), "--quantize: invalid choice: 'int4'"),
])
def test_a_start_that_cannot_quantise_is_refused_with_the_reason(repo, flags, reason):
    argv = [sys.executable, "-m", "server", "--model-repository", str(repo), "--device", "cpu", "--port", "0",
            "--metrics-port", "0", "--http-port", "-1", "--quantize", "int8", *flags]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and reason in done.stderr, done.stderr[-2000:]
    assert '"event": "ready"' not in done.stdout


@pytest.mark.skipif(not packing_available(int8=True), reason="this torch build has no oneDNN int8 linear")
def test_the_default_quantize_auto_serves_a_wide_trunk_in_int8_and_says_so(tmp_path):
    from factories import make_bundle

    from server.config import INT8_MIN_WIDTH
    from stadapter import init_trunk, load_trunk

    config = tmp_path / "wide.json"
    config.write_text(json.dumps({"embed_dim": 64, "vision_cfg": {
        "image_size": 32, "layers": 1, "width": INT8_MIN_WIDTH, "head_width": 64, "patch_size": 16, "mlp_ratio": 4.0}}))
    repo = tmp_path / "repo"
    init_trunk("test-vit-wide", "random", repo / "trunk", model_config=config)
    make_bundle(load_trunk(repo / "trunk"), repo / "tasks" / "alpha" / "1", name="alpha", seed=1)
    _int8_server_says_so_and_answers_like_float32(  # --quantize left at its default
        repo, (), "(--device cpu, --dtype bfloat16), block linears in int8 (--quantize auto: the probe clip's ")
