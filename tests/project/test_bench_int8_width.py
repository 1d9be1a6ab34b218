"""``python -m bench.int8_width`` (where int8 block linears start to pay) runs end to end on a small shape."""

from __future__ import annotations

import json

import pytest

from bench import int8_width
from stadapter.trunk.packed import packing_available


@pytest.mark.skipif(not packing_available(int8=True), reason="this torch build has no oneDNN int8 linear")
def test_the_width_bench_times_both_ways_of_each_shape(capsys, tmp_path):
    out = tmp_path / "w.json"
    assert int8_width.main(["--shapes", "64x32,128x32/8", "--layers", "1", "--frames", "2", "--iters", "1",
                            "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["width"], r["image_size"], r["patch"], r["tokens_per_frame"]) for r in result["shapes"]] == [
        (64, 32, 16, 5), (128, 32, 8, 17)]
    for r in result["shapes"]:
        assert set(r["median_s"]) == {"bf16-packed", "int8"} and all(t > 0 for t in r["median_s"].values())
        assert r["int8_over_bf16_packed"] == r["median_s"]["bf16-packed"] / r["median_s"]["int8"]
    assert "int8 speed-up" in capsys.readouterr().err
