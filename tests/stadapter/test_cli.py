"""The library's command lines as a user runs them: ``python -m stadapter.trunk`` and ``python -m stadapter.predict``.

Each python + torch start costs seconds here, so three commands run as
subprocesses (trunk init, then predict) and the remaining cases call the same
CLI entry points in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import TINY_MODEL, make_bundle
from media import garbage, make_clip

import stadapter
from stadapter.factory import read_model_config, resolve_quick_gelu, trunk_cli
from stadapter.predict import main as predict_main
from stadapter.predict import predict_clip

REPO = Path(__file__).resolve().parents[2]
LABELS = ["left", "right", "up", "down"]


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.started = time.monotonic()  # type: ignore[attr-defined]
    return proc


def _wait(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str, float]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.monotonic() - proc.started  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def cli_trunk(work) -> tuple[Path, dict]:
    """``trunk init`` run as a subprocess; returns the folder and the printed spec."""
    rc, out, err, _ = _wait(_start("stadapter.trunk", "init", "--model", TINY_MODEL, "--pretrained", "random",
                                   "--out", str(work / "trunk")))
    assert rc == 0, err
    assert "Warning" not in err, err  # e.g. runpy's "found in sys.modules" warning
    return work / "trunk", json.loads(out)


@pytest.fixture(scope="module")
def clips(work) -> dict[str, Path]:
    bad = work / "bad.mp4"
    bad.write_bytes(garbage(4096))
    return {
        "a": make_clip(work / "a.mp4", num_frames=12, size=(64, 48)),
        "b": make_clip(work / "b.mkv", num_frames=9, size=(48, 64), pattern="grey"),
        "bad": bad,
    }


@pytest.fixture(scope="module")
def bundle(work, cli_trunk) -> Path:
    return make_bundle(stadapter.load_trunk(cli_trunk[0]), work / "bundle", name="motion", labels=LABELS)


@pytest.fixture(scope="module")
def clip_weights(work, cli_trunk) -> Path:
    """A whole-CLIP-style checkpoint (visual.* + text tower keys) holding the trunk's weights."""
    from safetensors.torch import load_file

    visual = load_file(str(cli_trunk[0] / "visual.safetensors"))
    state = {f"visual.{k}": v for k, v in visual.items()}
    state["token_embedding.weight"] = torch.zeros(64, 32)
    torch.save({"state_dict": state, "epoch": 3}, work / "clip.pt")
    return work / "clip.pt"


@pytest.fixture(scope="module")
def predicted(cli_trunk, bundle, clips) -> tuple[int, str, str, float]:
    return _wait(_start("stadapter.predict", "--trunk", str(cli_trunk[0]), "--task", str(bundle), "--json",
                        "--top-k", "2", str(clips["a"]), str(clips["bad"]), str(clips["b"])))


def test_trunk_init_writes_a_folder(cli_trunk):
    trunk_dir, spec = cli_trunk
    assert sorted(p.name for p in trunk_dir.iterdir()) == ["trunk.json", "visual.safetensors"]
    assert spec["model"] == TINY_MODEL and spec["pretrained"] == "visual.safetensors" and spec["quick_gelu"] is False
    assert json.loads((trunk_dir / "trunk.json").read_text()) == spec
    assert stadapter.load_trunk(trunk_dir).fingerprint == spec["fingerprint"]


def test_trunk_show_verifies(cli_trunk, capsys):
    trunk_cli(["show", str(cli_trunk[0])])
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified"] is True and shown["fingerprint"] == cli_trunk[1]["fingerprint"]
    assert shown["parameters"] == stadapter.load_trunk(cli_trunk[0]).num_parameters > 0


def test_trunk_show_refuses_tampered_weights(work, cli_trunk, capsys):
    from safetensors.torch import load_file, save_file

    tampered = work / "tampered"
    tampered.mkdir()
    (tampered / "trunk.json").write_text((cli_trunk[0] / "trunk.json").read_text())
    state = load_file(str(cli_trunk[0] / "visual.safetensors"))
    state["ln_post.bias"] = state["ln_post.bias"] + 1e-3
    save_file(state, str(tampered / "visual.safetensors"))
    with pytest.raises(SystemExit) as e:
        trunk_cli(["show", str(tampered)])
    assert e.value.code == 2 and "differs from trunk.json" in capsys.readouterr().err


def test_weights_file_needs_quick_gelu(work, clip_weights, capsys):
    with pytest.raises(SystemExit) as e:
        trunk_cli(["init", "--model", TINY_MODEL, "--pretrained", str(clip_weights), "--out", str(work / "from-file")])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert "does not say which activation" in err and "--quick-gelu yes" in err
    assert not (work / "from-file").exists()


def test_weights_file_with_quick_gelu(work, cli_trunk, clip_weights, capsys):
    # Same weights and activation as the random trunk: the same fingerprint, whether from a whole CLIP
    # checkpoint (.pt) or a visual state dict (.safetensors).
    trunk_cli(["init", "--model", TINY_MODEL, "--pretrained", str(clip_weights), "--quick-gelu", "no",
               "--out", str(work / "from-pt")])
    assert json.loads(capsys.readouterr().out)["fingerprint"] == cli_trunk[1]["fingerprint"]
    trunk_cli(["init", "--model", TINY_MODEL, "--pretrained", str(cli_trunk[0] / "visual.safetensors"),
               "--quick-gelu", "yes", "--out", str(work / "from-st")])
    spec = json.loads(capsys.readouterr().out)
    assert spec["quick_gelu"] is True and spec["fingerprint"] != cli_trunk[1]["fingerprint"]
    assert stadapter.load_trunk(work / "from-st").arch["quick_gelu"] is True


def test_openai_tag_implies_quick_gelu():
    # metadata only, nothing is downloaded
    assert resolve_quick_gelu("ViT-B-16", "openai", read_model_config("ViT-B-16"), is_file=False) is True
    assert resolve_quick_gelu("ViT-B-16", "laion2b_s34b_b88k", read_model_config("ViT-B-16"), is_file=False) is False


def test_unknown_tag_fails_fast_without_network(work, capsys):
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        trunk_cli(["init", "--model", "ViT-B-16", "--pretrained", "nonexistent-tag", "--out", str(work / "vitb16")])
    wall = time.monotonic() - start
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'nonexistent-tag' is neither a file nor a pretrained tag of 'ViT-B-16'" in err
    assert "openai" in err  # lists the real tags
    assert wall < 10  # a download attempt would retry for ~46 s
    assert not (work / "vitb16").exists()


def test_predict_json_reports_each_clip(predicted, cli_trunk, bundle, clips):
    rc, out, err, _ = predicted
    assert rc == 1, err  # one clip failed
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["clip"] for r in rows] == [str(clips["a"]), str(clips["bad"]), str(clips["b"])]
    assert "not a readable video" in rows[1]["error"] and "top" not in rows[1]
    clf = stadapter.load_classifier(cli_trunk[0], bundle)
    for row, name in ((rows[0], "a"), (rows[2], "b")):
        assert (row["task"], row["version"]) == ("motion", 1)
        want = predict_clip(clf, clips[name], k=2)
        assert [t["label"] for t in row["top"]] == [t["label"] for t in want]
        assert [t["score"] for t in row["top"]] == pytest.approx([t["score"] for t in want], abs=1e-5)
    assert rows[0]["top"] != rows[2]["top"]  # two different clips, two different answers


def test_predict_text_output_and_bad_clip(cli_trunk, bundle, clips, capsys):
    rc = predict_main(["--trunk", str(cli_trunk[0]), "--task", str(bundle), str(clips["bad"]), str(clips["a"]),
                       "--top-k", "9"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"{clips['bad']}: error: cannot open clip" in err
    lines = out.splitlines()
    assert lines[0] == f"{clips['a']}  [motion v1]" and len(lines) == 1 + len(LABELS)  # top-k capped at 4 labels
    scores = [float(line.split()[0]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-3)
    assert {line.split(maxsplit=1)[1] for line in lines[1:]} == set(LABELS)


def test_predict_refuses_a_bundle_of_another_trunk(work, cli_trunk, clips, capsys):
    stadapter.init_trunk(TINY_MODEL, "random", work / "other-trunk", seed=1)
    other = stadapter.load_trunk(work / "other-trunk")
    foreign = make_bundle(other, work / "foreign", name="foreign")
    rc = predict_main(["--trunk", str(cli_trunk[0]), "--task", str(foreign), str(clips["a"])])
    assert rc == 2 and "trained on trunk" in capsys.readouterr().err
    rc = predict_main(["--trunk", str(cli_trunk[0]), "--task", str(work / "nope"), str(clips["a"])])
    assert rc == 2 and "task.json is missing" in capsys.readouterr().err


def test_weights_file_unreadable(work, capsys):
    (work / "garbage.pt").write_bytes(garbage(3000, seed=5))
    with pytest.raises(SystemExit) as e:
        trunk_cli(["init", "--model", TINY_MODEL, "--pretrained", str(work / "garbage.pt"), "--quick-gelu", "no",
                   "--out", str(work / "from-garbage")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "garbage.pt is not a readable weights file" in err and "weights_only=False" not in err
    assert not (work / "from-garbage").exists()


def test_predict_views_override(cli_trunk, bundle, clips, capsys):
    args = ["--trunk", str(cli_trunk[0]), "--task", str(bundle), "--json", str(clips["a"])]
    assert predict_main(args + ["--temporal-views", "0"]) == 2
    assert "temporal_views must be a positive int" in capsys.readouterr().err
    assert predict_main(args + ["--temporal-views", "2", "--spatial-views", "3"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert len(top) == len(LABELS) and sum(t["score"] for t in top) == pytest.approx(1.0, abs=1e-4)
