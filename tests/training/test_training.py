"""training/: synthetic data, data lists, the trainer (loss, resume, bundles), broken clips.

Everything runs on the tiny test trunk (32 px, 2 blocks) and 32 px / 8-frame clips.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stadapter import load_classifier, load_trunk, read_bundle
from training.data import BrokenVideoError, DataError, read_labels, read_list, scan_class_folders
from training.synthetic import MOTION_LABELS, SyntheticConfig, clip_rng, draw_motion, generate
from training.train import TrainConfig, train
from training.train import main as train_main


@pytest.fixture(scope="module")
def motion_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("motion")
    generate(SyntheticConfig("motion", num_train=16, num_val=8, seed=1, size=32, frames=8), out)
    return out


def _cfg(trunk_dir, data: Path, tmp: Path, **kw) -> TrainConfig:
    base = dict(
        trunk=str(trunk_dir), task="motion", data_root=str(data), train_list=str(data / "train.txt"),
        val_list=str(data / "val.txt"), labels=str(data / "labels.txt"), out=str(tmp / "bundle"),
        run_dir=str(tmp / "run"), adapter_width=8, num_frames=4, batch_size=8, epochs=2, workers=0,
        lr=1e-2, warmup_epochs=0.5, dropout=0.0, progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


# --- synthetic data ------------------------------------------------------------------------------


def test_synthetic_is_deterministic_by_seed(tmp_path):
    cfg = SyntheticConfig("shapes", num_train=6, num_val=2, seed=5, size=32, frames=6)
    a, b, c = generate(cfg, tmp_path / "a"), generate(cfg, tmp_path / "b"), None
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6 + 2 + 4  # clips + train/val lists + labels + dataset.json
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    c = generate(SyntheticConfig("shapes", num_train=6, num_val=2, seed=6, size=32, frames=6), tmp_path / "c")
    assert a == b and c["seed"] == 6
    assert (tmp_path / "a/train/circle/000000.mp4").read_bytes() != (tmp_path / "c/train/circle/000000.mp4").read_bytes()


def test_motion_label_is_invisible_in_the_set_of_frames():
    """Moving right is moving left played backwards: same frames, other order, other label."""
    for i in range(5):
        left = draw_motion(clip_rng(0, "train", i), MOTION_LABELS.index("left"), 32, 8)
        right = draw_motion(clip_rng(0, "train", i), MOTION_LABELS.index("right"), 32, 8)
        assert np.array_equal(left[::-1], right)
        assert not np.array_equal(left, right)


def test_synthetic_refuses_bad_config():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        SyntheticConfig("colours", 1, 1)
    with pytest.raises(ValueError, match="even"):
        SyntheticConfig("motion", 1, 1, size=33)


# --- list files ----------------------------------------------------------------------------------


def test_list_and_labels_errors_name_the_line(tmp_path):
    (tmp_path / "labels.txt").write_text("a\nb\n")
    assert read_labels(tmp_path / "labels.txt") == ["a", "b"]
    (tmp_path / "l.txt").write_text("x/one clip.mp4 1\nx/two.mp4 2\n")
    with pytest.raises(DataError, match=r"l.txt:2: label 2 is outside 0..1"):
        read_list(tmp_path / "l.txt", tmp_path, 2)
    (tmp_path / "l.txt").write_text("x/one clip.mp4 1\nx/two.mp4 cat\n")
    with pytest.raises(DataError, match=r"l.txt:2: label 'cat' is not an integer"):
        read_list(tmp_path / "l.txt", tmp_path, 2)
    (tmp_path / "l.txt").write_text("x/one clip.mp4 1\n")
    assert read_list(tmp_path / "l.txt", tmp_path, 2)[0].path == tmp_path / "x/one clip.mp4"


def test_class_folders_follow_the_labels_file(motion_data):
    samples, names = scan_class_folders(motion_data / "train", MOTION_LABELS)
    assert names == list(MOTION_LABELS) and len(samples) == 16
    assert all(s.path.parent.name == MOTION_LABELS[s.label] for s in samples)
    with pytest.raises(DataError, match="not in the labels file"):
        scan_class_folders(motion_data / "train", ["left", "right"])


# --- trainer -------------------------------------------------------------------------------------


def test_training_reduces_the_loss_and_writes_a_servable_bundle(tiny_trunk_dir, motion_data, tmp_path):
    metrics = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=5, lr=3e-2, cache=True))
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0] - 0.1, losses
    assert metrics["steps"] == 10 and 0 <= metrics["val_top1"] <= 1 and metrics["val_clips"] == 8
    assert (tmp_path / "run/curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run/metrics.json").read_text())["method"] == "st-adapter"

    bundle = read_bundle(tmp_path / "bundle")
    assert bundle.spec.metrics["val_top1"] == metrics["val_top1"] and bundle.spec.labels == MOTION_LABELS
    assert bundle.spec.sampling.num_frames == 4 and bundle.spec.adapter.width == 8
    clf = load_classifier(tiny_trunk_dir, tmp_path / "bundle")
    assert clf(torch.zeros(2, 4, 3, 32, 32)).shape == (2, 4)

    from server.registry import registry  # the server's own loader
    tv = registry.TaskRegistry(tmp_path / "repo", load_trunk(tiny_trunk_dir)).load_version(tmp_path / "bundle")
    assert tv.name == "motion"


def test_resume_continues_at_the_same_step(tiny_trunk_dir, motion_data, tmp_path):
    straight = train(_cfg(tiny_trunk_dir, motion_data, tmp_path / "a", epochs=2))
    first = train(_cfg(tiny_trunk_dir, motion_data, tmp_path / "b", epochs=2, max_steps=2))
    assert first["steps"] == 2 and first["epochs"] == 1
    resumed = train(_cfg(tiny_trunk_dir, motion_data, tmp_path / "b", epochs=2, resume="auto", force=True))
    assert resumed["steps"] == straight["steps"] == 4
    assert [h["step"] for h in resumed["history"]] == [2, 4]
    a = torch.load(tmp_path / "a/run/checkpoint.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "b/run/checkpoint.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="no such checkpoint"):
        train(_cfg(tiny_trunk_dir, motion_data, tmp_path / "c", resume=str(tmp_path / "missing.pt")))


def test_linear_probe_bundle_equals_the_probe(tiny_trunk_dir, motion_data, tmp_path):
    train(_cfg(tiny_trunk_dir, motion_data, tmp_path, method="linear", epochs=1))
    clf = load_classifier(tiny_trunk_dir, tmp_path / "bundle")
    state = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["trainable"]
    x = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        want = torch.nn.functional.linear(clf.trunk.forward_features(x), state["head.weight"], state["head.bias"])
        torch.testing.assert_close(clf(x), want)


def test_full_finetuning_writes_weights_not_a_bundle(tiny_trunk_dir, motion_data, tmp_path):
    metrics = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, method="full", epochs=1, out=""))
    trunk = load_trunk(tiny_trunk_dir)
    assert metrics["trainable_params"] == trunk.num_parameters + 4 * trunk.dim + 4
    assert (tmp_path / "run/model.safetensors").is_file() and not (tmp_path / "bundle").exists()


def test_partial_trains_only_the_last_blocks(tiny_trunk_dir, motion_data, tmp_path):
    metrics = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, method="partial", partial_blocks=1, epochs=1, out=""))
    trunk = load_trunk(tiny_trunk_dir)
    last = sum(p.numel() for p in trunk.blocks[-1].parameters()) + sum(p.numel() for p in trunk.visual.ln_post.parameters())
    assert metrics["trainable_params"] == last + 4 * trunk.dim + 4


# --- broken clips --------------------------------------------------------------------------------


def _with_broken_clip(data: Path, tmp: Path) -> Path:
    bad = tmp / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    lst = tmp / "train_broken.txt"
    lst.write_text(f"{bad} 0\n" + (data / "train.txt").read_text())  # an absolute path ignores the root
    return lst


def test_broken_clip_stops_training_with_its_name(tiny_trunk_dir, motion_data, tmp_path, capsys):
    lst = _with_broken_clip(motion_data, tmp_path)
    with pytest.raises(BrokenVideoError, match="broken.mp4"):
        train(_cfg(tiny_trunk_dir, motion_data, tmp_path, train_list=str(lst), epochs=1, cache=True))
    argv = ["--trunk", str(tiny_trunk_dir), "--task", "motion", "--data-root", str(motion_data), "--train-list", str(lst),
            "--labels", str(motion_data / "labels.txt"), "--out", str(tmp_path / "b"), "--run-dir", str(tmp_path / "r"),
            "--num-frames", "4", "--workers", "0", "--epochs", "1", "--no-progress"]
    assert train_main(argv) == 2
    assert "broken.mp4" in capsys.readouterr().err


@pytest.mark.parametrize("cache", [False, True])
def test_broken_clip_is_skipped_and_counted(tiny_trunk_dir, motion_data, tmp_path, cache):
    lst = _with_broken_clip(motion_data, tmp_path)
    metrics = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, train_list=str(lst), epochs=1, skip_broken=True, cache=cache))
    assert [Path(p).name for p in metrics["broken_clips"]] == ["broken.mp4"]
    assert metrics["steps"] == 3 and (tmp_path / "bundle" / "task.json").is_file()  # 17 clips in batches of 8


# --- the committed demo ----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", ["shapes", "motion"])
def test_demo_bundles_classify_their_sample_clips(task):
    """The embedded trunk + demo bundle get the held-out sample clips right, through the serving decode path."""
    from training.frames import eval_views

    clf = load_classifier(REPO / "model_repository/trunk", REPO / "model_repository/tasks" / task / "1")
    assert clf.spec.metrics["val_top1"] >= 0.9 and clf.spec.trunk_fingerprint == clf.trunk.fingerprint
    truth = json.loads((REPO / "samples" / task / "labels.json").read_text())
    assert sorted(truth.values()) == sorted(clf.labels)
    for name, label in truth.items():
        probs = clf.predict_views(eval_views(REPO / "samples" / task / name, clf.spec.sampling))
        assert clf.labels[int(probs.argmax())] == label, (name, probs)


# --- outputs, checkpoints and refusals -------------------------------------------------------------


def test_an_existing_out_is_refused_before_training_unless_forced(tiny_trunk_dir, motion_data, tmp_path, capsys):
    """The README's command overwrote the shipped demo bundle; now --out must be new, or --force given."""
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "task.json").write_text("{}")
    cfg = _cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=1)
    with pytest.raises(FileExistsError, match="already exists"):
        train(cfg)
    assert (out / "task.json").read_text() == "{}" and not (tmp_path / "run").exists()  # refused before any work
    argv = ["--trunk", str(tiny_trunk_dir), "--task", "motion", "--data-root", str(motion_data), "--train-list",
            str(motion_data / "train.txt"), "--labels", str(motion_data / "labels.txt"), "--out", str(out),
            "--run-dir", str(tmp_path / "run"), "--num-frames", "4", "--workers", "0", "--epochs", "1", "--no-progress"]
    assert train_main(argv) == 2
    assert "already exists (pass --force to replace it)" in capsys.readouterr().err
    assert train_main(argv + ["--force"]) == 0
    assert read_bundle(out).spec.name == "motion"
    assert f"run folder {tmp_path / 'run'}" in capsys.readouterr().err  # where the checkpoint and curves are


def test_a_bad_task_name_is_refused_before_training(tiny_trunk_dir, motion_data, tmp_path):
    with pytest.raises(ValueError, match="task"):
        train(_cfg(tiny_trunk_dir, motion_data, tmp_path, task="Motion Task!", epochs=1))
    assert not (tmp_path / "run").exists()


def _scripted_evaluation(monkeypatch, top1: list[float]) -> None:
    """Validation top-1 per epoch as given (the model's real accuracy on 8 clips hardly moves in 3 tiny epochs)."""
    scores = iter(top1)
    monkeypatch.setattr("training.train.evaluate", lambda *a, **k: {"val_top1": next(scores), "val_clips": 8, "val_broken": 0})


def _saved_states(monkeypatch) -> list[dict]:
    """The trained tensors of every checkpoint written, per epoch (copies: the model keeps training)."""
    from training import checkpoint

    saved, real = [], checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, state: (real(path, state), saved.append(
        {k: v.clone() for k, v in state["trainable"].items()})))
    return saved


def _bundle_equals(bundle_dir: Path, trainable: dict) -> bool:
    tensors = read_bundle(bundle_dir).tensors
    return all(torch.equal(v, trainable["adapters." + k]) for k, v in tensors.items())


@pytest.mark.parametrize("keep,epoch", [("best", 2), ("last", 3)])
def test_bundle_holds_the_best_epoch_unless_keep_last(tiny_trunk_dir, motion_data, tmp_path, monkeypatch, keep, epoch):
    _scripted_evaluation(monkeypatch, [0.25, 0.75, 0.5])
    saved = _saved_states(monkeypatch)
    kw = {} if keep == "best" else {"keep": keep}
    metrics = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=3, **kw))
    other = 3 if keep == "best" else 2
    assert len(saved) == 3 and _bundle_equals(tmp_path / "bundle", saved[epoch - 1])
    assert not _bundle_equals(tmp_path / "bundle", saved[other - 1])  # the epochs' tensors really differ
    spec = read_bundle(tmp_path / "bundle").spec
    assert spec.metrics["kept_epoch"] == metrics["kept_epoch"] == epoch
    assert spec.metrics["val_top1"] == metrics["val_top1"] == [0.25, 0.75, 0.5][epoch - 1]
    assert metrics["best_val_top1"] == 0.75 and metrics["epochs"] == 3


def test_the_bundle_is_written_without_matplotlib(tiny_trunk_dir, motion_data, tmp_path, monkeypatch, capsys):
    """With only the server extra installed, the plot import fails; the trained task must not be lost with it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=1))
    assert read_bundle(tmp_path / "bundle").spec.name == "motion"
    assert (tmp_path / "run/metrics.json").is_file() and not (tmp_path / "run/curve.png").exists()
    assert "no " + str(tmp_path / "run/curve.png") in capsys.readouterr().err


def test_checkpoint_holds_the_config_and_every_rng_state(tiny_trunk_dir, motion_data, tmp_path, monkeypatch):
    import random

    from training import checkpoint

    def draws() -> tuple:
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    after_save, real = [], checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, state: (real(path, state), after_save.append(draws())))
    cfg = _cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=2, max_steps=2)
    train(cfg)
    ck = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert ck["config"] == cfg.to_dict() and ck["epoch"] == 1 and ck["step"] == 2
    assert {"torch", "cuda", "python", "numpy"} <= set(ck["rng"])
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    checkpoint.restore_rng_states(ck["rng"])
    assert draws() == after_save[-1]  # the numbers the saving process drew next


def test_resume_with_dropout_matches_a_straight_run(tiny_trunk_dir, motion_data, tmp_path):
    """Dropout draws from torch's generator: the restored state gives the straight run's masks."""
    straight = train(_cfg(tiny_trunk_dir, motion_data, tmp_path / "a", epochs=2, dropout=0.5))
    train(_cfg(tiny_trunk_dir, motion_data, tmp_path / "b", epochs=2, dropout=0.5, max_steps=2))
    resumed = train(_cfg(tiny_trunk_dir, motion_data, tmp_path / "b", epochs=2, dropout=0.5, resume="auto", force=True))
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in straight["history"]])
    assert _bundle_equals(tmp_path / "b/bundle", {"adapters." + k: v for k, v in read_bundle(tmp_path / "a/bundle").tensors.items()})


def test_resuming_past_the_schedule_warns(tiny_trunk_dir, motion_data, tmp_path, capsys):
    first = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=1))
    capsys.readouterr()
    again = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=1, resume="auto", force=True))
    err = capsys.readouterr().err
    assert "past the end of the schedule (1 epochs): nothing is left to train" in err
    assert again["steps"] == first["steps"] == 2 and again["val_top1"] == first["val_top1"]
    longer = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=2, resume="auto", force=True))
    assert "--epochs 1 -> 2" in capsys.readouterr().err and longer["steps"] == 4  # the schedule changed: said so


@pytest.mark.parametrize("classes", [4, 6])
def test_top5_is_reported_only_with_more_than_five_classes(tiny_trunk_dir, motion_data, tmp_path, capsys, classes):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{name}\n" for name in [*MOTION_LABELS, "spin", "stop"][:classes]))
    metrics = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=1, labels=str(labels)))
    err, spec = capsys.readouterr().err, read_bundle(tmp_path / "bundle").spec
    if classes > 5:
        assert 0 <= metrics["val_top5"] <= 1 and "val_top5" in spec.metrics and "top-5" in err
    else:
        assert metrics["val_top5"] is None and "val_top5" not in spec.metrics and "top-5" not in err
        assert "val_top5" not in metrics["history"][0]


def test_flag_defaults_are_the_config_defaults(tmp_path):
    from training.train import parse_args

    got = parse_args(["--trunk", "t", "--task", "x", "--train-dir", "d", "--out", "o"])
    assert got == TrainConfig(trunk="t", task="x", train_dir="d", out="o")


def test_the_checkpoint_is_fsynced_before_it_replaces_the_last_one(tiny_trunk_dir, motion_data, tmp_path, monkeypatch):
    from stadapter import fsutil

    synced, real = [], os.fsync
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=2))
    run = tmp_path / "run"
    assert sum(Path(p).name.startswith(".tmp-checkpoint.pt-") for p in synced) == 2  # once per epoch
    assert str(run) in synced and sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "curve.png", "metrics.json"]


def test_the_loss_is_read_back_only_when_logged(tiny_trunk_dir, motion_data, tmp_path, monkeypatch):
    """Each ``loss.item()`` waits for the device; without a progress bar no step reads its loss back."""
    reads, real = [], torch.nn.functional.cross_entropy

    def counted(*args, **kwargs):
        loss = real(*args, **kwargs)
        loss.item = lambda: (reads.append(1), torch.Tensor.item(loss))[1]
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", counted)
    metrics = train(_cfg(tiny_trunk_dir, motion_data, tmp_path, epochs=1, batch_size=2, progress=False))
    assert metrics["steps"] == 8 and reads == [] and metrics["history"][0]["train_loss"] > 0
