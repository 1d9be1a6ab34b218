"""bench.live and bench.live_plan: the clip's chunks, which chunk carried a window's last frame, the lag arithmetic,
and a dry run of the bench (one stream of a few seconds) on a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import live
from bench.live_plan import Chunk, LagMap, chunk_plan, make_clip, percentiles

ROOT = Path(__file__).resolve().parents[2]


def test_each_chunk_is_one_packet_at_its_time():
    clip = make_clip(2.0, 64, 48, fps=10, seed=1)
    chunks = chunk_plan(clip)
    assert b"".join(c.data for c in chunks) == clip  # every byte sent once, in order
    assert [c.frame for c in chunks] == list(range(20))
    assert [c.at_s for c in chunks] == pytest.approx([i / 10 for i in range(20)])
    assert make_clip(2.0, 64, 48, fps=10, seed=1) == clip  # seeded


def test_a_windows_last_frame_maps_to_the_chunk_that_carried_it():
    chunks = [Chunk(b"", i / 10, f) for i, f in enumerate([0, 1, 2, 4, 5])]  # frame 3 missing
    m = LagMap(chunks)
    assert m.carrier(3) == 2  # window [0, 3): its last frame is 2, carried by chunk 2
    assert m.carrier(4) == 2  # frame 3 never came: the slot takes frame 2, so chunk 2 completed the window
    assert m.carrier(5) == 3 and m.carrier(99) == 4
    with pytest.raises(ValueError, match="no chunk carries"):
        m.carrier(0)
    with pytest.raises(ValueError, match="B-frames"):
        LagMap([Chunk(b"", 0, 0), Chunk(b"", 0.1, 2), Chunk(b"", 0.2, 1)])


def test_lags_from_the_send_and_from_the_schedule():
    chunks = [Chunk(b"", i * 0.5, i) for i in range(4)]
    run = live.StreamRun(sent=[100.0, 100.5, 101.25, 101.5], start=100.0)  # chunk 2 sent 0.25 s late
    run.results = [(2, 100.7), (3, 101.5)]  # windows ending at frames 2 and 3: carried by chunks 1 and 2
    got = live.lags([run], chunks, settle_s=1.0)
    assert got["windows"] == 2 and got["lag_after_start"] == {"p50_ms": 250.0, "p99_ms": 250.0}
    assert got["lag"] == {"p50_ms": 200.0, "p99_ms": 250.0}
    assert got["lag_from_schedule"] == {"p50_ms": 200.0, "p99_ms": 500.0}
    assert got["late"]["p99_ms"] == 250.0
    assert percentiles([]) == {"p50_ms": None, "p99_ms": None}
    assert percentiles([0.001 * i for i in range(1, 101)]) == {"p50_ms": 50.0, "p99_ms": 99.0}


def test_what_counts_as_sustained():
    assert live.expected_windows(30, 2, 1) == 29 and live.expected_windows(1, 2, 1) == 0
    step = {"streams": 2, "codes": {"OK": 2}, "windows_per_stream": [29], "lag_from_schedule": {"p99_ms": 400.0}}
    assert live.sustained(step, 29, 1.0)
    assert not live.sustained({**step, "lag_from_schedule": {"p99_ms": 1000.0}}, 29, 1.0)
    assert not live.sustained({**step, "codes": {"OK": 1, "RESOURCE_EXHAUSTED": 1}}, 29, 1.0)
    assert not live.sustained({**step, "windows_per_stream": [28, 29]}, 29, 1.0)


@pytest.mark.integration
def test_a_dry_run(tmp_path, capsys):
    if not (ROOT / "model_repository" / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    out = tmp_path / "live.json"
    assert live.main(["--streams", "1", "--seconds", "3", "--fast-seconds", "3", "--width", "160", "--height",
                      "120", "--fps", "15", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    step = r["sweep"][0]
    assert step["codes"] == {"OK": 1} and step["windows_per_stream"] == [2] and step["windows"] == 2
    assert 0 < step["lag"]["p50_ms"] <= step["lag"]["p99_ms"] < 30_000
    assert [link["link_mbps"] for link in r["fast"]["links"]] == [0, 8]
    for link in r["fast"]["links"]:
        assert link["ClassifyLive"]["windows"] == link["ClassifyWindowsStream"]["windows"] == 2
    assert "largest N sustained" in capsys.readouterr().err
