"""TensorRT precision by version (issue 24): weak typing flags before 10, --stronglyTyped on 10.x,
the graph's precision from 11 on, and onnxruntime >= 1.27 for TensorRT 11. No TensorRT here:
versions are passed in or patched, the commands and configs are checked as text."""

from __future__ import annotations

import json
import subprocess

import pytest
from factories import make_bundle

from export.__main__ import main
from export.onnx_export import ExportOptions, export_multitask, load_tasks
from export.tensorrt import (
    TensorRTSettings,
    TensorRTVersionError,
    installed_tensorrt_version,
    parse_version,
    resolve_tensorrt_version,
)
from export.triton import TritonOptions, build_config, multitask_tensors

SHAPES = {"frames": (4, 3, 32, 32), "task_index": ()}


@pytest.fixture(scope="module")
def graphs(tiny_trunk, tmp_path_factory):
    """The same two tasks exported in fp32 and fp16 (legacy exporter: fast)."""
    root = tmp_path_factory.mktemp("trt")
    bundles = load_tasks(tiny_trunk, [make_bundle(tiny_trunk, root / "a", "alpha", seed=1),
                                      make_bundle(tiny_trunk, root / "b", "beta", seed=2)])
    out = {}
    for name, fp16 in (("fp32", False), ("fp16", True)):
        out[name] = export_multitask(tiny_trunk, bundles, root / f"{name}.onnx", ExportOptions(exporter="legacy", fp16=fp16)).path
    return out


def test_trtexec_precision_flags_follow_the_tensorrt_version():
    def line(version, graph_fp16):
        return TensorRTSettings(version, graph_fp16=graph_fp16).trtexec_command("m.onnx", SHAPES, 16)

    for graph_fp16 in (False, True):
        old, ten, eleven = line((8, 6, 1), graph_fp16), line((10, 3, 0), graph_fp16), line((11, 3, 0), graph_fp16)
        assert "--fp16" in old and "--stronglyTyped" not in old  # weak typing: the builder may pick fp16 kernels
        assert "--stronglyTyped" in ten and "--fp16" not in ten  # the graph's types, opted in
        assert "--fp16" not in eleven and "--stronglyTyped" not in eleven  # strong typing always on, --fp16 gone
        assert "--minShapes=frames:1x4x3x32x32,task_index:1" in eleven and "--maxShapes=frames:16x4x3x32x32,task_index:16" in eleven
    assert TensorRTSettings((11, 0), graph_fp16=True).engine_precision() == "fp16"
    assert TensorRTSettings((11, 0), graph_fp16=False).engine_precision() == "fp32"
    assert TensorRTSettings((8, 6), graph_fp16=False).engine_precision() == "fp16"


def test_strongly_typed_tensorrt_refuses_a_precision_the_graph_does_not_carry():
    with pytest.raises(TensorRTVersionError, match=r"TensorRT 11\.0 builds strongly typed.*\(fp32\).*fp16 engine.*"
                                                   r"export the graph with --fp16.*TensorRT < 11\.0"):
        TensorRTSettings((11, 0), graph_fp16=False, fp16=True).trtexec_command("m.onnx", SHAPES, 8)
    with pytest.raises(TensorRTVersionError, match=r"TensorRT 10\.3 builds strongly typed.*\(fp16\).*fp32 engine.*TensorRT < 10\.0"):
        TensorRTSettings((10, 3), graph_fp16=True, fp16=False).trtexec_command("m.onnx", SHAPES, 8)
    assert "--fp16" not in TensorRTSettings((8, 6), graph_fp16=False, fp16=False).trtexec_command("m.onnx", SHAPES, 8)


def test_onnxruntime_provider_options_by_version():
    old = TensorRTSettings((10, 3), graph_fp16=False).onnxruntime_options(SHAPES, 8, ort_version="1.22.0")
    assert old["trt_fp16_enable"] == "True" and old["trt_profile_max_shapes"] == "frames:8x4x3x32x32,task_index:8"
    new = TensorRTSettings((11, 1), graph_fp16=True).onnxruntime_options(SHAPES, 8, ort_version="1.27.0")
    assert "trt_fp16_enable" not in new and new["trt_profile_min_shapes"] == "frames:1x4x3x32x32,task_index:1"
    with pytest.raises(TensorRTVersionError, match=r"onnxruntime 1\.26\.1's TensorRT execution provider does not run "
                                                   r"TensorRT 11\.1: TensorRT 11 needs onnxruntime >= 1\.27"):
        TensorRTSettings((11, 1), graph_fp16=True).onnxruntime_options(SHAPES, 8, ort_version="1.26.1")


def test_tensorrt_version_is_read_from_the_package_or_trtexec():
    assert parse_version("11.3.0.99") == (11, 3, 0)
    assert parse_version("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --version") == (10, 3, 0)
    assert parse_version("[TensorRT v8601]") == (8, 6, 1)
    with pytest.raises(TensorRTVersionError, match="cannot read a TensorRT version from 'latest'"):
        parse_version("latest")

    class FakeTensorRT:
        __version__ = "11.2.1.2"

    def no_module(name):
        raise ImportError(name)

    def trtexec(args, **kw):
        assert args == ["trtexec", "--version"]
        return subprocess.CompletedProcess(args, 0, "&&&& RUNNING TensorRT.trtexec [TensorRT v110000]\n", "")

    def no_trtexec(args, **kw):
        raise FileNotFoundError("trtexec")

    assert installed_tensorrt_version(lambda name: FakeTensorRT) == "11.2.1.2"
    assert parse_version(installed_tensorrt_version(no_module, trtexec)) == (11, 0, 0)
    assert installed_tensorrt_version(no_module, no_trtexec) is None
    assert resolve_tensorrt_version("10.3") == (10, 3)
    assert resolve_tensorrt_version(None, detect=lambda: "11.0.0") == (11, 0, 0)
    with pytest.raises(TensorRTVersionError, match="cannot tell which TensorRT.*pass --trt-version"):
        resolve_tensorrt_version(None, detect=lambda: None)


def test_triton_accelerator_writes_precision_mode_only_before_tensorrt_11():
    ins, outs = multitask_tensors(4, 32, 5)

    def accelerator(options, graph_fp16):
        (acc,) = build_config("m", ins, outs, options, graph_fp16=graph_fp16).optimization.execution_accelerators.gpu_execution_accelerator
        return dict(acc.parameters)

    default = accelerator(TritonOptions(kind="gpu", tensorrt=True), graph_fp16=False)
    assert default["precision_mode"] == "FP16"  # no --trt-version: TensorRT 10.x or older, weakly typed
    eleven = accelerator(TritonOptions(kind="gpu", tensorrt=True, trt_version="11.0"), graph_fp16=True)
    assert "precision_mode" not in eleven and eleven["trt_engine_cache_enable"] == "1"
    with pytest.raises(TensorRTVersionError, match="cannot read a TensorRT version"):
        TritonOptions(kind="gpu", tensorrt=True, trt_version="eleven")


def test_cli_trtexec_for_a_given_version_and_for_none(graphs, capsys):
    assert main(["trtexec", "--onnx", str(graphs["fp16"]), "--trt-version", "11.0", "--max-batch", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "--fp16" not in out["command"] and out["engine_precision"] == "fp16" and out["tensorrt_version"] == "11.0"
    assert main(["trtexec", "--onnx", str(graphs["fp32"]), "--trt-version", "10.3.0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "--stronglyTyped" in out["command"] and out["engine_precision"] == "fp32"
    assert main(["trtexec", "--onnx", str(graphs["fp32"])]) == 0  # no TensorRT here (conftest), no --trt-version
    out = json.loads(capsys.readouterr().out)
    assert out["tensorrt_version"] is None and "--trt-version" in out["note"]
    assert "--fp16" in out["commands_by_tensorrt"]["<10"] and "--stronglyTyped" in out["commands_by_tensorrt"]["10.x"]
    assert "--fp16" not in out["commands_by_tensorrt"][">=11"]


def test_check_on_tensorrt_refuses_what_the_versions_cannot_do(graphs, monkeypatch, capsys):
    """The provider is faked (no GPU here): the check reaches the session with the options of the version asked."""
    import export.check as check
    import export.tensorrt as trt
    from export.runtime import make_session

    seen = {}

    def cpu_session(path, provider, threads=None, trt_options=None, fp16_graph=False):
        if provider == "tensorrt":  # not the onnxruntime-cpu reference session
            seen["trt_options"] = trt_options
        return make_session(path, "cpu", threads=threads, fp16_graph=fp16_graph)

    monkeypatch.setattr(check, "ensure_available", lambda provider: "TensorrtExecutionProvider")
    monkeypatch.setattr(check, "make_session", cpu_session)
    monkeypatch.setattr(trt, "onnxruntime_version", lambda: "1.27.0")
    rc = main(["check", "--onnx", str(graphs["fp16"]), "--provider", "tensorrt", "--trt-version", "11.0", "--repeats", "1"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["engine_precision"] == "fp16" and out["tensorrt_version"] == "11.0"
    assert "trt_fp16_enable" not in seen["trt_options"]
    assert main(["check", "--onnx", str(graphs["fp16"]), "--provider", "tensorrt", "--trt-version", "11.0", "--trt-fp32"]) == 2
    assert "TensorRT 11.0 builds strongly typed engines" in capsys.readouterr().err
    assert main(["check", "--onnx", str(graphs["fp16"]), "--provider", "tensorrt"]) == 2  # no TensorRT found, none given
    assert "cannot tell which TensorRT" in capsys.readouterr().err
    monkeypatch.setattr(trt, "onnxruntime_version", lambda: "1.26.0")
    assert main(["check", "--onnx", str(graphs["fp16"]), "--provider", "tensorrt", "--trt-version", "11.0"]) == 2
    assert "onnxruntime 1.26.0's TensorRT execution provider does not run TensorRT 11.0" in capsys.readouterr().err
    rc = main(["check", "--onnx", str(graphs["fp32"]), "--provider", "tensorrt", "--trt-version", "10.3", "--repeats", "1"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["engine_precision"] == "fp16"
    assert seen["trt_options"]["trt_fp16_enable"] == "True"
