"""Trunk and bundle files a container can read, and trunks from a named tag that start offline."""

from __future__ import annotations

import os
import stat

import open_clip
import pytest
from factories import TINY_MODEL, make_bundle, make_trunk_dir

import stadapter.factory as factory
from stadapter import init_trunk, load_trunk
from stadapter.weights import current_umask


def _modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_weights_are_written_with_the_process_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        trunk_dir = make_trunk_dir(tmp_path / "trunk")
        bundle = make_bundle(load_trunk(trunk_dir), tmp_path / "task", "alpha")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    assert set(_modes(trunk_dir).values()) == {want}, _modes(trunk_dir)  # visual.safetensors was 0600
    assert set(_modes(bundle).values()) == {want}, _modes(bundle)  # adapter.safetensors was 0600


def test_a_trunk_from_a_named_tag_stores_its_weights_and_loads_offline(tmp_path, monkeypatch):
    model_cfg = factory.read_model_config(TINY_MODEL)
    downloads = []

    def fake_create_model(model, pretrained=None, force_quick_gelu=False):  # what open_clip would download
        downloads.append((model, pretrained))
        visual = factory.build_visual(model_cfg, force_quick_gelu)
        return type("CLIP", (), {"visual": visual})()

    monkeypatch.setattr(factory, "_check_tag", lambda model, tag: None)
    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    spec = init_trunk(TINY_MODEL, "sometag", tmp_path / "trunk", quick_gelu=False)
    assert downloads == [(TINY_MODEL, "sometag")]
    assert spec.pretrained == factory.VISUAL_WEIGHTS and spec.source == "sometag"
    assert (tmp_path / "trunk" / factory.VISUAL_WEIGHTS).is_file()

    def no_network(*args, **kwargs):
        raise AssertionError("load_trunk tried to fetch weights")

    monkeypatch.setattr(open_clip, "create_model", no_network)
    trunk = load_trunk(tmp_path / "trunk")
    assert trunk.fingerprint == spec.fingerprint
