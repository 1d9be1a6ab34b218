"""Triton repository: every config.pbtxt parses as Triton's ModelConfig and matches its graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import make_bundle
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.__main__ import main
from export.onnx_export import ExportError, ExportOptions, load_tasks
from export.runtime import make_session
from export.triton import (
    MULTITASK_MODEL,
    TritonOptions,
    parse_config,
    read_tasks_param,
    validate_model_dir,
    write_repository,
)

LEGACY = ExportOptions(exporter="legacy")


@pytest.fixture(scope="module")
def repo(tiny_trunk, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    a = make_bundle(tiny_trunk, root / "tasks" / "alpha", "alpha", labels=["up", "down", 'say "café"'], seed=1)
    b = make_bundle(tiny_trunk, root / "tasks" / "beta", "beta", labels=[f"b{i}" for i in range(5)], seed=2, version=3)
    bundles = load_tasks(tiny_trunk, [a, b])
    opts = TritonOptions(max_batch_size=16, instances=2, kind="gpu", tensorrt=True, single_task_models=True)
    report = write_repository(tiny_trunk, bundles, root / "triton", opts, LEGACY)
    return root / "triton", report, bundles


def _parse(path):
    return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())


def test_multitask_config_parses_as_triton_model_config(repo, tiny_trunk):
    root, report, _ = repo
    assert sorted(p.name for p in root.iterdir()) == ["alpha", "beta", MULTITASK_MODEL]
    cfg = _parse(root / MULTITASK_MODEL / "config.pbtxt")
    assert cfg.name == MULTITASK_MODEL and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    ins = {t.name: t for t in cfg.input}
    outs = {t.name: t for t in cfg.output}
    assert ins["frames"].data_type == mc.TYPE_FP32 and list(ins["frames"].dims) == [4, 3, 32, 32]
    assert not ins["frames"].HasField("reshape")
    ti = ins["task_index"]
    assert ti.data_type == mc.TYPE_INT64 and list(ti.dims) == [1] and ti.HasField("reshape") and list(ti.reshape.shape) == []
    assert outs["logits"].data_type == mc.TYPE_FP32 and list(outs["logits"].dims) == [5]
    nc = outs["num_classes"]
    assert nc.data_type == mc.TYPE_INT64 and list(nc.dims) == [1] and nc.HasField("reshape")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert cfg.model_warmup[0].batch_size == 16 and set(cfg.model_warmup[0].inputs) == {"frames", "task_index"}
    manifest = read_tasks_param(cfg)
    assert manifest["trunk_fingerprint"] == tiny_trunk.fingerprint
    alpha, beta = manifest["tasks"]
    assert (alpha["name"], alpha["index"], alpha["labels"]) == ("alpha", 0, ["up", "down", 'say "café"'])
    assert (beta["name"], beta["index"], beta["version"], beta["num_frames"], beta["input_size"]) == ("beta", 1, 3, 4, 32)
    assert beta["sampling"]["mode"] == "uniform" and beta["sampling"]["num_frames"] == 4
    labels = (root / MULTITASK_MODEL / "labels" / "alpha.txt").read_text(encoding="utf-8").splitlines()
    assert labels == ["up", "down", 'say "café"']
    assert report.models[MULTITASK_MODEL].max_abs_diff <= 1e-4


def test_single_task_models_and_validation_of_every_config(repo):
    root, report, bundles = repo
    for name, n in (("alpha", 3), ("beta", 5)):
        cfg = validate_model_dir(root / name)
        assert [t.name for t in cfg.input] == ["frames"] and [t.name for t in cfg.output] == ["logits"]
        assert list(cfg.output[0].dims) == [n] and cfg.output[0].label_filename == "labels.txt"
        assert len((root / name / "labels.txt").read_text(encoding="utf-8").splitlines()) == n
        assert read_tasks_param(cfg)["tasks"][0]["index"] == 0
    assert validate_model_dir(root / MULTITASK_MODEL).name == MULTITASK_MODEL
    assert main(["validate", str(root)]) == 0


def test_triton_style_request_runs_on_the_repository_graph(repo):
    """What Triton's onnxruntime backend does with the config: [batch, 1] task_index reshaped to [batch]."""
    root, _, _ = repo
    cfg = validate_model_dir(root / MULTITASK_MODEL)
    ti = next(t for t in cfg.input if t.name == "task_index")
    request = np.array([[1], [0], [1]], dtype=np.int64)  # client shape [batch] + dims
    model_shape = (request.shape[0], *ti.reshape.shape)
    sess = make_session(root / MULTITASK_MODEL / "1" / "model.onnx")
    frames = np.random.default_rng(0).standard_normal((3, 4, 3, 32, 32), dtype=np.float32)
    logits, num_classes = sess.run(None, {"frames": frames, "task_index": request.reshape(model_shape)})
    assert logits.shape == (3, 5) and num_classes.tolist() == [5, 3, 5]
    assert (logits[1, 3:] == 0).all()
    for bad in (2, -1):  # out of range, and negative (ONNX Gather would wrap it to the last task)
        with pytest.raises(Exception, match="out of data bounds"):
            sess.run(None, {"frames": frames[:1], "task_index": np.array([bad], dtype=np.int64)})


def test_validation_catches_configs_that_do_not_fit(repo, tmp_path):
    root, _, _ = repo
    with pytest.raises(ExportError, match="does not parse"):
        parse_config('name: "x"\nmax_batch_size: lots\n')
    import shutil

    bad = tmp_path / MULTITASK_MODEL
    shutil.copytree(root / MULTITASK_MODEL, bad)
    from google.protobuf import text_format

    good = parse_config((bad / "config.pbtxt").read_text(encoding="utf-8"))

    def write_changed(change) -> None:
        cfg = type(good)()
        cfg.CopyFrom(good)
        change({t.name: t for t in (*cfg.input, *cfg.output)})
        (bad / "config.pbtxt").write_text(text_format.MessageToString(cfg), encoding="utf-8")

    write_changed(lambda t: t["frames"].dims.__setitem__(0, 8))
    with pytest.raises(ExportError, match=r"input 'frames': config gives the model shape \[8, 3, 32, 32\]"):
        validate_model_dir(bad)
    write_changed(lambda t: t["task_index"].ClearField("reshape"))
    with pytest.raises(ExportError, match=r"'task_index': config gives the model shape \[1\].*graph has \[\]"):
        validate_model_dir(bad)
    write_changed(lambda t: setattr(t["task_index"], "data_type", type(good).DESCRIPTOR.file.enum_types_by_name[
        "DataType"].values_by_name["TYPE_INT32"].number))
    with pytest.raises(ExportError, match="'task_index' is TYPE_INT32 in config but TYPE_INT64"):
        validate_model_dir(bad)


def test_triton_options_refuse_bad_values():
    with pytest.raises(ExportError, match="TensorRT accelerator needs GPU"):
        TritonOptions(kind="cpu", tensorrt=True)
    with pytest.raises(ExportError, match="outside 1..max_batch_size=8"):
        TritonOptions(max_batch_size=8, preferred_batch_sizes=(4, 16))
    with pytest.raises(ExportError, match="max_batch_size"):
        TritonOptions(max_batch_size=0)
    assert TritonOptions(max_batch_size=32).batch_sizes() == (4, 8, 16, 32)
    assert TritonOptions(max_batch_size=1).batch_sizes() == (1,)


def test_cli_writes_a_cpu_repository(tiny_trunk_dir, repo, tmp_path, capsys):
    root, _, bundles = repo
    out = tmp_path / "model_repository" / "triton"
    rc = main(["triton", "--trunk", str(tiny_trunk_dir), "--tasks", *(str(b.path) for b in bundles), "--out", str(out),
               "--max-batch-size", "8", "--kind", "cpu", "--exporter", "legacy"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and list(report["models"]) == [MULTITASK_MODEL]
    cfg = validate_model_dir(out / MULTITASK_MODEL)
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert not cfg.HasField("optimization") and len(cfg.model_warmup) == 0
