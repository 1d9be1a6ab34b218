"""One labels reader (stadapter.labels) for training, the converter and the demo builder: same classes, same errors."""

from __future__ import annotations

import pytest

from stadapter import convert
from stadapter.labels import LabelsError, read_labels
from training import data, make_demo
from training.train import main as train_main


def _readers():
    """(reader, error type) for every caller: they must agree line for line."""
    return [(read_labels, LabelsError), (data.read_labels, data.DataError), (convert.read_labels, convert.ConvertError)]


@pytest.mark.parametrize("reader,error", _readers())
def test_a_blank_line_inside_is_refused_with_its_number(tmp_path, reader, error):
    """Skipping it (as training did) would shift every later class index by one."""
    (tmp_path / "l.txt").write_text("run\nwalk\n\njump\n\n")
    with pytest.raises(error, match=r"l.txt: line\(s\) \[3\] are blank"):
        reader(tmp_path / "l.txt")


@pytest.mark.parametrize("reader,error", _readers())
def test_repeats_are_refused_with_their_lines(tmp_path, reader, error):
    (tmp_path / "l.txt").write_text("run\nwalk\nrun\n")
    with pytest.raises(error, match=r"repeats 'run' \(lines 1 and 3\)"):
        reader(tmp_path / "l.txt")


@pytest.mark.parametrize("reader,error", _readers())
def test_names_keep_inner_spaces_and_lose_a_byte_order_mark(tmp_path, reader, error):
    (tmp_path / "l.txt").write_bytes("\ufeffturn left \r\n turn right\r\n\r\n".encode("utf-8"))
    assert list(reader(tmp_path / "l.txt")) == ["turn left", "turn right"]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(error, match="cannot read labels file"):
        reader(tmp_path / "bad.txt")


def test_training_and_convert_clis_refuse_a_blank_line(tmp_path, tiny_trunk_dir, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\n\nb\n")
    argv = ["--trunk", str(tiny_trunk_dir), "--task", "t", "--train-list", str(tmp_path / "train.txt"),
            "--labels", str(labels), "--out", str(tmp_path / "bundle"), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert train_main(argv) == 2
    assert "line(s) [2] are blank" in capsys.readouterr().err
    argv = ["--checkpoint", str(tmp_path / "ck.pth"), "--trunk", str(tiny_trunk_dir), "--labels", str(labels),
            "--task", "t", "--out", str(tmp_path / "converted")]
    assert convert.main(argv) == 2
    assert "line(s) [2] are blank" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "converted").exists()


def test_demo_samples_are_named_by_whole_labels(tmp_path):
    """make_demo split the labels file on any whitespace: 'turn left' became two classes."""
    d = tmp_path / "data" / "turns"
    (d / "val").mkdir(parents=True)
    (d / "labels.txt").write_text("turn left\nturn right\n")
    for i in range(3):
        (d / "val" / f"{i}.mp4").write_bytes(f"clip {i}".encode())
    (d / "val.txt").write_text("val/0.mp4 1\nval/1.mp4 0\nval/2.mp4 1\n")
    truth = make_demo.copy_samples("turns", tmp_path / "data", tmp_path / "samples")
    assert truth == {"turn left.mp4": "turn left", "turn right.mp4": "turn right"}
    assert (tmp_path / "samples/turns/turn right.mp4").read_bytes() == b"clip 0"  # the first clip of its class
