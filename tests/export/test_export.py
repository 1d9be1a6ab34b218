"""ONNX export: single-task and multi-task parity in onnxruntime, refusals, fp16, the check command.

Tiny configs only (test-vit-tiny, 32 px, 4 frames). The default (dynamo) exporter
takes ~4 s per graph here, so only two tests use it; the rest use the legacy one.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from factories import make_bundle, make_trunk_dir

from export.__main__ import main
from export.onnx_export import (
    ExportError,
    ExportOptions,
    common_shape,
    export_multitask,
    export_single,
    load_tasks,
)
from export.runtime import ProviderUnavailable, make_session
from stadapter import AdapterConfig, AdapterStack, SamplingConfig, load_trunk, read_bundle
from stadapter.bundle import TaskBundle

LEGACY = ExportOptions(exporter="legacy")


@pytest.fixture(scope="module")
def tasks(tiny_trunk, tmp_path_factory):
    """Two tasks that differ in class count, adapter width, kernel and placement."""
    root = tmp_path_factory.mktemp("tasks")
    a = make_bundle(tiny_trunk, root / "a", "alpha", seed=1)
    b = make_bundle(
        tiny_trunk, root / "b", "beta", labels=[f"b{i}" for i in range(5)], seed=2,
        cfg=AdapterConfig(width=4, kernel=(3, 3, 3), pre_attn=False, pre_mlp=True),
    )
    return [a, b]


def _graph_io(path):
    g = onnx.load(str(path)).graph
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return ({v.name: (v.type.tensor_type.elem_type, shape(v)) for v in g.input},
            {v.name: (v.type.tensor_type.elem_type, shape(v)) for v in g.output})


def test_single_task_graph_matches_pytorch_at_any_batch(tiny_trunk, tasks, tmp_path):
    bundle = load_tasks(tiny_trunk, tasks[:1])[0]
    report = export_single(tiny_trunk, bundle, tmp_path / "alpha.onnx")  # default: dynamo exporter
    assert report.exporter == "dynamo" and report.max_abs_diff <= 1e-4
    ins, outs = _graph_io(report.path)
    assert ins == {"frames": (onnx.TensorProto.FLOAT, ["batch", 4, 3, 32, 32])}
    assert outs == {"logits": (onnx.TensorProto.FLOAT, ["batch", 3])}
    sess = make_session(report.path)
    stack = bundle.stack(tiny_trunk.num_blocks)
    for batch in (1, 5):  # neither is the export's example batch (2) nor the check's (3)
        frames = torch.randn(batch, 4, 3, 32, 32)
        with torch.no_grad():
            ref = tiny_trunk(frames, stack).numpy()
        got = sess.run(None, {"frames": frames.numpy()})[0]
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_multitask_graph_matches_each_task_run_alone(tiny_trunk, tasks, tmp_path):
    bundles = load_tasks(tiny_trunk, tasks)
    report = export_multitask(tiny_trunk, bundles, tmp_path / "multi.onnx")
    assert report.tasks == ("alpha", "beta") and report.max_abs_diff <= 1e-4
    ins, outs = _graph_io(report.path)
    assert ins == {"frames": (onnx.TensorProto.FLOAT, ["batch", 4, 3, 32, 32]),
                   "task_index": (onnx.TensorProto.INT64, ["batch"])}
    assert outs == {"logits": (onnx.TensorProto.FLOAT, ["batch", 5]), "num_classes": (onnx.TensorProto.INT64, ["batch"])}
    frames = torch.randn(5, 4, 3, 32, 32)
    task_index = torch.tensor([1, 0, 0, 1, 1])
    logits, num_classes = make_session(report.path).run(None, {"frames": frames.numpy(), "task_index": task_index.numpy()})
    assert num_classes.tolist() == [5, 3, 3, 5, 5]
    stacks = [b.stack(tiny_trunk.num_blocks) for b in bundles]
    for i, k in enumerate(task_index.tolist()):
        with torch.no_grad():
            alone = tiny_trunk(frames[i : i + 1], stacks[k])[0].numpy()  # the clip with its own task, unbatched
        c = len(alone)
        np.testing.assert_allclose(logits[i, :c], alone, atol=1e-4, rtol=0)
        assert (logits[i, c:] == 0).all()
    # and the same as the PyTorch mixed-batch path (AdapterStack.concat + task_index)
    with torch.no_grad():
        mixed = tiny_trunk(frames, AdapterStack.concat(stacks), task_index).numpy()
    np.testing.assert_allclose(logits, mixed, atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    manifest = json.loads(meta["stadapter.tasks_json"])
    assert [(t["name"], t["index"], len(t["labels"])) for t in manifest["tasks"]] == [("alpha", 0, 3), ("beta", 1, 5)]
    assert manifest["trunk_fingerprint"] == tiny_trunk.fingerprint


def test_legacy_exporter_and_fp16_graph(tiny_trunk, tasks, tmp_path):
    bundles = load_tasks(tiny_trunk, tasks)
    r32 = export_multitask(tiny_trunk, bundles, tmp_path / "m32.onnx", LEGACY)
    assert r32.exporter == "legacy" and r32.opset == 17 and r32.max_abs_diff <= 1e-4
    r16 = export_multitask(tiny_trunk, bundles, tmp_path / "m16.onnx", ExportOptions(exporter="legacy", fp16=True))
    assert r16.fp16 and 0 < r16.max_abs_diff <= 2e-2  # fp16 maths, compared with the fp32 PyTorch model
    ins, outs = _graph_io(r16.path)  # the graph's interface stays float32 / int64
    assert ins["frames"][0] == onnx.TensorProto.FLOAT and outs["logits"][0] == onnx.TensorProto.FLOAT
    weights = onnx.load(str(r16.path)).graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)


def test_export_refuses_a_bundle_of_another_trunk(tiny_trunk, tmp_path):
    other = load_trunk(make_trunk_dir(tmp_path / "other-trunk", seed=7))
    foreign = make_bundle(other, tmp_path / "foreign", "foreign")
    with pytest.raises(ExportError, match=r"cannot export task bundle .*foreign.*trained on trunk"):
        load_tasks(tiny_trunk, [foreign])


def test_cli_exports_one_task_and_reports_parity(tiny_trunk_dir, tasks, tmp_path, capsys):
    out = tmp_path / "alpha.onnx"
    rc = main(["onnx", "--trunk", str(tiny_trunk_dir), "--task", str(tasks[0]), "--out", str(out), "--exporter", "legacy",
               "--frames", "6"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and out.is_file() and report["onnx_bytes"] == out.stat().st_size
    assert report["tasks"] == ["alpha"] and report["num_frames"] == 6 and report["max_abs_diff"] <= 1e-4
    assert _graph_io(out)[0]["frames"][1] == ["batch", 6, 3, 32, 32]


def test_cli_refuses_foreign_bundle_with_a_clear_error(tiny_trunk_dir, tmp_path, capsys):
    other = load_trunk(make_trunk_dir(tmp_path / "other-trunk", seed=7))
    foreign = make_bundle(other, tmp_path / "foreign", "foreign")
    out = tmp_path / "x.onnx"
    rc = main(["onnx", "--trunk", str(tiny_trunk_dir), "--task", str(foreign), "--out", str(out)])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export task bundle") and "trained on trunk" in err


def test_tasks_must_share_frames_and_input_size(tiny_trunk, tasks, tmp_path):
    eight = make_bundle(tiny_trunk, tmp_path / "eight", "eight", sampling=SamplingConfig(num_frames=8, input_size=32))
    bundles = load_tasks(tiny_trunk, [tasks[0], eight])
    with pytest.raises(ExportError, match=r"differ in frames per clip \(alpha=4, eight=8\)"):
        common_shape(bundles)
    assert common_shape(bundles, num_frames=8) == (8, 32)  # --frames forces one T
    a = read_bundle(tasks[0])
    big = TaskBundle(a.spec.replace(sampling=SamplingConfig(num_frames=4, input_size=64)), a.tensors)
    with pytest.raises(ExportError, match="differ in input size"):
        common_shape([a, big])
    with pytest.raises(ExportError, match="given more than once"):
        load_tasks(tiny_trunk, [tasks[0], tasks[0]])
    with pytest.raises(ExportError, match="dynamo exporter writes opset >= 18"):
        ExportOptions(opset=17)


def test_failed_parity_fails_the_export(tiny_trunk, tasks, tmp_path, monkeypatch, capsys):
    import export.onnx_export as ox

    monkeypatch.setattr(ox, "run_parity", lambda *a, **k: (0.5, []))
    out = tmp_path / "graphs" / "bad.onnx"
    with pytest.raises(ExportError, match=r"differ by 0.5 \(tolerance 0.0001\).*not written"):
        export_single(tiny_trunk, load_tasks(tiny_trunk, tasks[:1])[0], out, LEGACY)
    assert list(out.parent.iterdir()) == []  # nothing at --out, no staging file left behind


def test_check_command_cpu_parity_and_unavailable_provider(tiny_trunk_dir, tiny_trunk, tasks, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    export_multitask(tiny_trunk, load_tasks(tiny_trunk, tasks), path, LEGACY)
    rc = main(["check", "--onnx", str(path), "--trunk", str(tiny_trunk_dir), "--tasks", *map(str, tasks),
               "--batch", "3", "--repeats", "2"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["ok"] and result["reference"] == "pytorch-cpu"
    assert result["max_abs_diff"] <= 1e-4 and result["onnxruntime"]["clips_per_s"] > 0
    rc = main(["check", "--onnx", str(path), "--trunk", str(tiny_trunk_dir), "--tasks", *map(str, tasks[::-1])])
    assert rc == 2 and "in its order" in capsys.readouterr().err
    if "TensorrtExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(ProviderUnavailable, match="TensorrtExecutionProvider is not available"):
            make_session(path, "tensorrt")
        assert main(["check", "--onnx", str(path), "--provider", "tensorrt"]) == 2
        assert "onnxruntime-gpu" in capsys.readouterr().err
    cmd = main(["trtexec", "--onnx", str(path), "--max-batch", "16", "--opt-batch", "8"])
    line = json.loads(capsys.readouterr().out)["command"]
    assert cmd == 0 and "--fp16" in line
    assert "--minShapes=frames:1x4x3x32x32,task_index:1" in line and "--maxShapes=frames:16x4x3x32x32,task_index:16" in line
