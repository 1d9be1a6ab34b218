"""Task bundles: round trip, atomic writes, and every refusal names its reason."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from factories import TINY_SAMPLING, make_bundle, make_trunk_dir
from safetensors.torch import load_file, save_file

from stadapter import (
    AdapterConfig,
    BundleError,
    BundleLimits,
    load_bundle,
    load_classifier,
    load_trunk,
    read_bundle,
    save_bundle,
)
from stadapter.bundle import ADAPTER_FILE, TASK_FILE, read_spec


@pytest.fixture()
def bundle_dir(tmp_path, tiny_trunk):
    return make_bundle(tiny_trunk, tmp_path / "toy" / "1", name="toy", labels=["a", "b", "c"])


def _edit_json(bundle_dir, **changes):
    d = json.loads((bundle_dir / TASK_FILE).read_text())
    d.update(changes)
    (bundle_dir / TASK_FILE).write_text(json.dumps(d))


def _edit_tensors(bundle_dir, fn):
    path = bundle_dir / ADAPTER_FILE
    tensors = fn(load_file(str(path)))
    save_file(tensors, str(path))


def test_round_trip_gives_the_same_logits(bundle_dir, tiny_trunk):
    b = load_bundle(bundle_dir, tiny_trunk)
    assert b.spec.name == "toy" and b.spec.labels == ("a", "b", "c") and b.spec.created
    clf = load_classifier(tiny_trunk, bundle_dir)
    frames = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        direct = tiny_trunk(frames, b.stack(tiny_trunk.num_blocks))
        via_api = clf(frames)
    assert via_api.shape == (2, 3) and torch.equal(direct, via_api)
    assert clf.labels == ["a", "b", "c"]


def test_classifier_from_folders(bundle_dir, tiny_trunk_dir):
    clf = load_classifier(trunk=tiny_trunk_dir, task=bundle_dir)
    probs = clf.predict_views(torch.randn(3, 4, 3, 32, 32))
    assert probs.shape == (3,) and abs(float(probs.sum()) - 1) < 1e-5


def test_save_is_atomic_and_refuses_to_overwrite(bundle_dir, tiny_trunk):
    b = read_bundle(bundle_dir)
    with pytest.raises(FileExistsError):
        save_bundle(bundle_dir, b.spec, b.tensors)
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".tmp-")]
    save_bundle(bundle_dir, b.spec.replace(description="v2"), b.tensors, replace=True)
    assert read_bundle(bundle_dir).spec.description == "v2"


def test_save_refuses_head_label_mismatch(tmp_path, tiny_trunk):
    b = read_bundle(make_bundle(tiny_trunk, tmp_path / "x", labels=["a", "b"]))
    with pytest.raises(BundleError, match="2 labels"):
        save_bundle(tmp_path / "y", b.spec.replace(labels=("a", "b")), {**b.tensors, "fc.weight": torch.zeros(5, 32)})


def test_other_trunk_is_refused(bundle_dir, tmp_path):
    other = load_trunk(make_trunk_dir(tmp_path / "other", seed=7))
    with pytest.raises(BundleError, match="trained on trunk"):
        load_bundle(bundle_dir, other)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / TASK_FILE).unlink(), "task.json is missing"),
        (lambda d: (d / ADAPTER_FILE).unlink(), "adapter.safetensors is missing"),
        (lambda d: (d / TASK_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / ADAPTER_FILE).write_bytes(b"\x00garbage" * 10), "not a readable safetensors"),
        (lambda d: ((d / ADAPTER_FILE).unlink(), (d / ADAPTER_FILE).symlink_to(ADAPTER_FILE)),  # a loop: ELOOP
         "adapter.safetensors cannot be read: .*Too many levels of symbolic links"),
        (lambda d: _edit_json(d, name="Bad Name"), "task name"),
        (lambda d: _edit_json(d, labels=["a", "b"]), "3 classes but task.json lists 2"),
        (lambda d: _edit_json(d, surprise=1), "unknown keys"),
        (lambda d: _edit_json(d, trunk_fingerprint="zz"), "64 hex"),
        (lambda d: _edit_tensors(d, lambda t: {**t, "fc.bias": torch.full_like(t["fc.bias"], float("nan"))}), "NaN or Inf"),
        (lambda d: _edit_tensors(d, lambda t: {**t, "fc.bias": t["fc.bias"].to(torch.int32)}), "dtype"),
        (lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if k != "fc.weight"}), "'fc.weight' is missing"),
    ],
)
def test_malformed_bundles_are_refused_with_a_reason(bundle_dir, tiny_trunk, mutate, message):
    mutate(bundle_dir)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir, tiny_trunk)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: {k: v for k, v in t.items() if "resblocks.1.adapter_pre_mlp.fc1" not in k}, "missing"),
        (lambda t: {**t, "transformer.resblocks.0.extra.weight": torch.zeros(2)}, "unexpected"),
        (lambda t: {**t, "transformer.resblocks.1.adapter_pre_attn.fc1.weight": torch.zeros(8, 31)}, "shape"),
    ],
)
def test_tensors_that_do_not_fit_the_trunk_are_refused(bundle_dir, tiny_trunk, mutate, message):
    _edit_tensors(bundle_dir, mutate)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir, tiny_trunk)


def test_config_that_does_not_fit_the_trunk_is_refused(bundle_dir, tiny_trunk):
    _edit_json(bundle_dir, adapter=AdapterConfig(width=8, pre_attn=True, pre_mlp=True, layers=5).to_dict())
    with pytest.raises(BundleError, match="only 2 blocks"):
        load_bundle(bundle_dir, tiny_trunk)
    _edit_json(bundle_dir, adapter=AdapterConfig(width=8, pre_attn=True, pre_mlp=True).to_dict(),
               sampling=TINY_SAMPLING.replace(input_size=64).to_dict())
    with pytest.raises(BundleError, match="input_size 64"):
        load_bundle(bundle_dir, tiny_trunk)


def _replace_task_file(d, make) -> None:
    (d / TASK_FILE).unlink()
    make(d / TASK_FILE)


@pytest.mark.parametrize("make, message", [
    (os.mkfifo, "task.json is missing"),  # read_spec opens it: a FIFO must neither block the scan nor be read
    (lambda p: p.mkdir(), "task.json is missing"),
    (lambda p: p.write_text('{"name": "alpha"}', encoding="utf-16"), "not valid JSON"),  # UTF-8 only
    (lambda p: p.write_bytes(b"\xef\xbb\xbf{}"), "not valid JSON"),  # nor a byte-order mark
])
def test_a_task_file_that_is_not_a_plain_utf8_file_is_refused_with_a_reason(bundle_dir, tiny_trunk, make, message):
    _replace_task_file(bundle_dir, make)
    with pytest.raises(BundleError, match=message):
        read_spec(bundle_dir)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir, tiny_trunk)


def test_size_limits(bundle_dir, tiny_trunk):
    with pytest.raises(BundleError, match="above the limit"):
        load_bundle(bundle_dir, tiny_trunk, BundleLimits(max_tensor_bytes=100))
    with pytest.raises(BundleError, match="above the limit"):
        load_bundle(bundle_dir, tiny_trunk, BundleLimits(max_json_bytes=10))


def test_no_pickle_in_the_load_path(bundle_dir, tiny_trunk, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_bundle(bundle_dir, tiny_trunk)


def test_copied_bundle_folder_still_loads(bundle_dir, tiny_trunk, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    assert load_bundle(copy, tiny_trunk).spec.name == "toy"
