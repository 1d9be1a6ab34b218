"""The fast sampling mode, ``SamplingConfig.seek="keyframe"``: each sample moves to the cheapest frame of its
segment (see ``stadapter.video.sampling``), and only those frames are decoded.

Checked against PyAV's own ``frame.key_frame`` and a decode of every frame; the moved frames must be exactly
what exact decoding of the moved indices gives. Over gRPC: the ``seek`` and ``autorotate`` overrides.
"""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import av
import grpc
import media
import numpy as np
import pytest
import torch
from media import decode_all, indices_of, make_clip

from stadapter.config import ConfigError, SamplingConfig, TaskSpec
from stadapter.video import VideoError, VideoLimits, decode_clip, decode_frames, decode_views, keyframes, sample_indices, sample_plan
from stadapter.video.container import Clip
from stadapter.video.sampling import keyframe_indices, presentation_ranks, sample_cells, snap_to_keyframes, view_indices

REPO = Path(__file__).resolve().parents[2]
KF = SamplingConfig(num_frames=8, input_size=32, seek="keyframe")


def key_frames_by_decoding(clip) -> list[int]:
    """Reference: decode every frame and ask PyAV which ones are keyframes."""
    src = media.io.BytesIO(clip) if isinstance(clip, bytes) else str(clip)
    with av.open(src) as c:
        return [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]


# --- pure index logic ------------------------------------------------------------------------------


def test_the_issue_clip_moves_to_keyframes_or_segment_starts():
    """300 frames, a keyframe every 60: 8 uniform segments of 37.5 frames; 5 hold a keyframe, 3 none."""
    cfg = SamplingConfig(num_frames=8)
    keys = [0, 60, 120, 180, 240]
    assert sample_indices(300, cfg) == [18, 56, 93, 131, 168, 206, 243, 281]
    assert sample_cells(300, cfg)[:3] == [(0, 37), (37, 75), (75, 112)]
    assert keyframe_indices(300, cfg, 0, keys) == [0, 60, 75, 120, 180, 187, 240, 262]
    stride = SamplingConfig(num_frames=8, mode="stride", stride=16)
    assert sample_indices(300, stride) == [93, 109, 125, 141, 157, 173, 189, 205]
    assert keyframe_indices(300, stride, 0, keys) == [85, 101, 120, 133, 149, 180, 181, 197]


def test_snapping_rules_hold_for_random_samplings_and_gops():
    """Inside its cell; a keyframe where the cell holds one, else the cell's first frame; order kept."""
    rng = random.Random(0)
    for _ in range(3000):
        n, gop = rng.randint(1, 400), rng.randint(1, 80)
        cfg = SamplingConfig(num_frames=rng.randint(1, 16), temporal_views=rng.randint(1, 3),
                             mode=rng.choice(["uniform", "stride"]), stride=rng.randint(1, 20))
        keys = sorted(set(range(0, n, gop)) | {rng.randrange(n) for _ in range(rng.randint(0, 3))})
        for v in range(cfg.temporal_views):
            exact, cells = sample_indices(n, cfg, v), sample_cells(n, cfg, v)
            moved = keyframe_indices(n, cfg, v, keys)
            assert moved == sorted(moved) and all(0 <= i < n for i in moved)
            for s, m, (lo, hi) in zip(exact, moved, cells, strict=True):
                inside = [k for k in keys if lo <= k < hi]
                if not lo <= s < hi:
                    assert m == s
                elif inside:
                    assert m == min(inside, key=lambda k: (abs(k - s), k))
                else:
                    assert m == lo


def test_temporal_views_keep_apart():
    """Several views split each segment: snapping to the whole segment would make the views copies."""
    cfg = SamplingConfig(num_frames=4, temporal_views=3)
    views = view_indices(120, cfg.replace(seek="keyframe"), list(range(0, 120, 10)))
    assert len({tuple(v) for v in views}) == 3
    assert views == [[0, 30, 60, 90], [10, 40, 70, 100], [20, 50, 80, 110]]
    assert view_indices(120, cfg.replace(seek="keyframe"), None) == view_indices(120, cfg)  # unknown: exact


def test_without_a_keyframe_before_it_the_index_stays():
    assert snap_to_keyframes([5, 15], [(0, 10), (10, 20)], []) == [5, 15]
    assert snap_to_keyframes([5, 15], [(0, 10), (10, 20)], [12]) == [5, 12]


def test_presentation_ranks_follow_pts_order():
    assert presentation_ranks([0, 3, 1, 2, 6, 4, 5], [0, 6]) == [0, 6]
    assert presentation_ranks([10**18, 0, 7], [10**18]) == [2]  # a pts jump costs nothing


# --- the config field --------------------------------------------------------------------------------


def test_seek_field_is_validated_round_trips_and_old_task_json_loads():
    assert SamplingConfig().seek == "exact"
    assert SamplingConfig.from_dict({"num_frames": 4}).seek == "exact"
    fast = SamplingConfig(seek="keyframe")
    assert fast.to_dict()["seek"] == "keyframe" and SamplingConfig.from_dict(fast.to_dict()) == fast
    for bad in ("fast", "", "KEYFRAME", 1, None, True):
        with pytest.raises(ConfigError, match=r"SamplingConfig\.seek must be one of 'exact', 'keyframe'"):
            SamplingConfig(seek=bad)
    with pytest.raises(ConfigError, match="seek"):
        SamplingConfig().replace(seek="approximate")
    import json

    doc = json.loads((REPO / "model_repository/tasks/motion/1/task.json").read_text())
    assert "seek" not in doc["sampling"] and TaskSpec.from_dict(doc).sampling.seek == "exact"


# --- real clips ----------------------------------------------------------------------------------------

CLIPS = {
    "x264 mp4 B-frames gop 12": dict(num_frames=96, gop=12),
    "x264 mp4 no B gop 30": dict(num_frames=120, gop=30, bframes=0),
    "x264 mp4 gop 60": dict(num_frames=150, gop=60),
    "x264 mkv gop 10": dict(num_frames=80, gop=10, container="matroska"),
    "x264 ts gop 16": dict(num_frames=80, gop=16, container="mpegts"),
    "mpeg4 avi gop 15": dict(num_frames=90, gop=15, codec="mpeg4", container="avi"),
    "mpeg4 mp4 start pts 7": dict(num_frames=60, gop=20, codec="mpeg4", start_pts=7),
}


@pytest.fixture(scope="module", params=sorted(CLIPS))
def clip(request) -> bytes:
    return make_clip(**CLIPS[request.param])


def test_keyframes_from_the_demuxer_match_decoded_key_frames(clip):
    assert keyframes(clip) == key_frames_by_decoding(clip)


@pytest.mark.parametrize("cfg", [KF, KF.replace(temporal_views=3), KF.replace(mode="stride", stride=6),
                                 KF.replace(num_frames=4, spatial_views=3)], ids=["uniform", "3 views", "stride", "3 crops"])
def test_moved_frames_are_keyframes_and_exactly_what_exact_decoding_gives(clip, cfg):
    keys = key_frames_by_decoding(clip)
    reference = decode_all(clip)  # every frame, decoded naively
    plan = sample_plan(clip, cfg)
    n = len(reference)
    for v, moved in enumerate(plan):
        for i, (lo, hi) in zip(moved, sample_cells(n, cfg, v), strict=True):
            if any(lo <= k < hi for k in keys):
                assert i in keys, (v, moved, keys)
            else:
                assert i == lo
    flat = [i for v in plan for i in v]
    frames = decode_frames(clip, flat)
    assert np.array_equal(frames, reference[flat]) and indices_of(frames) == flat
    exact_cfg = cfg.replace(seek="exact")
    assert torch.equal(decode_clip(clip, cfg), decode_views(clip, plan, exact_cfg))


def test_exact_mode_is_unchanged(clip):
    cfg = KF.replace(seek="exact")
    n = len(decode_all(clip))
    assert sample_plan(clip, cfg) == [sample_indices(n, cfg)]
    assert torch.equal(decode_clip(clip, cfg), decode_views(clip, [sample_indices(n, cfg)], cfg))
    assert torch.equal(decode_clip(clip, cfg), decode_clip(clip, SamplingConfig(num_frames=8, input_size=32)))


def test_only_the_moved_frames_are_decoded():
    """8 samples in 8 GOPs of 30 frames: the exact frames sit mid-GOP (128 decoded frames here), the moved
    ones are the keyframes; a budget of 2 decoded frames per sample holds only the fast mode."""
    clip = make_clip(num_frames=240, gop=30, bframes=0)
    budget = VideoLimits(max_frames_decoded=2 * KF.num_frames)
    assert sample_plan(clip, KF) == [list(range(0, 240, 30))]
    decode_clip(clip, KF, budget)
    with pytest.raises(VideoError, match="max_frames_decoded"):
        decode_clip(clip, KF.replace(seek="exact"), budget)


def test_the_scan_counts_against_the_packet_and_time_limits():
    clip = make_clip(num_frames=120, gop=30)
    with pytest.raises(VideoError, match="max_packets"):
        decode_clip(clip, KF, VideoLimits(max_packets=60))
    with pytest.raises(VideoError, match="max_decode_seconds"):
        decode_clip(clip, KF, VideoLimits(max_decode_seconds=1e-9))


def test_a_failed_rewind_reopens_and_reads_the_same(monkeypatch):
    clip = make_clip(num_frames=90, gop=15)
    want = decode_clip(clip, KF)
    with Clip(clip, VideoLimits()) as c:
        c.keyframes()
        assert c._lead is not None  # mp4 seeks back to its first packet: no second open
    monkeypatch.setattr(av.container.InputContainer, "seek", lambda *a, **k: (_ for _ in ()).throw(av.FFmpegError(5, "no")))
    assert torch.equal(decode_clip(clip, KF), want)


def test_a_cut_clip_is_resampled_in_fast_mode_too():
    """The header says 120 frames, the cut stream holds fewer: sampled again over the frames that exist."""
    cut = media.truncated(make_clip(num_frames=120, codec="libvpx-vp9", container="webm", gop=10), 0.5)
    n = len(decode_all(cut))
    assert 10 < n < 120 and sample_plan(cut, KF) != view_indices(n, KF, key_frames_by_decoding(cut))
    got = decode_clip(cut, KF)
    assert got.shape == (1, 8, 3, 32, 32)
    plan = view_indices(n, KF, key_frames_by_decoding(cut))
    assert torch.equal(got, decode_views(cut, plan, KF))


@pytest.mark.parametrize("bad", ["garbage", "empty", "corrupt", "truncated header", "audio only"])
def test_bad_clips_are_video_errors_in_fast_mode(bad):
    good = make_clip(num_frames=30, gop=10)
    data = {"garbage": media.garbage(), "empty": media.empty(), "corrupt": media.corrupt_payload(good),
            "truncated header": good[:200], "audio only": media.make_audio_only()}[bad]
    with pytest.raises(VideoError):
        decode_clip(data, KF)


def test_a_variable_frame_rate_clip_reads_by_counting_in_fast_mode():
    """Timestamps with holes: ranks of pts still place the keyframes; the frames are found by counting."""
    stamps = [0, 1, 2, 3, 5, 6, 9, 10, 11, 12, 14, 15, 18, 19, 20, 21, 23, 24, 27, 28, 29, 30, 32, 33]
    clip = make_clip(num_frames=len(stamps), gop=6, timestamps=stamps, container="matroska")
    keys = key_frames_by_decoding(clip)
    assert keyframes(clip) == keys
    n = len(decode_all(clip))  # the header's duration says more frames: decode_clip samples again over n
    plan = view_indices(n, KF, keys)
    assert all(i in keys for i in plan[0][::2]) and plan != view_indices(n, KF.replace(seek="exact"))
    frames = decode_frames(clip, plan[0])
    assert indices_of(frames) == plan[0]
    assert torch.equal(decode_clip(clip, KF), decode_views(clip, plan, KF))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line tool (apt-get install ffmpeg)")
def test_an_edit_list_that_starts_mid_gop(tmp_path):
    """``ffmpeg -ss 0.4 -c copy``: the packets from the keyframe before the cut are kept but marked discard
    (decoded as references, never shown). They give no frame index, and the rewind must keep them."""
    import subprocess

    src = make_clip(tmp_path / "src.mp4", num_frames=90, gop=30)
    cut = tmp_path / "cut.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-ss", "0.4", "-i", str(src), "-c", "copy",
                    str(cut)], check=True)
    data = cut.read_bytes()
    reference = decode_all(data)
    assert indices_of(reference[:1]) == [12] and len(reference) == 78
    keys = key_frames_by_decoding(data)
    assert keyframes(data) == keys == [18, 48]
    plan = view_indices(len(reference), KF, keys)
    assert plan[0][0] == 4  # no keyframe at or before its segment: the exact index stays
    assert np.array_equal(decode_frames(data, plan[0]), reference[plan[0]])
    assert torch.equal(decode_clip(data, KF), decode_views(data, plan, KF))


def _hflip(data: bytes) -> bytes:
    """The mp4 with a horizontal-flip display matrix in its tkhd box (see tests/video/test_video_display.py)."""
    u, w1 = 1 << 16, 1 << 30
    out = bytearray(data)
    box = out.index(b"tkhd") - 4
    at = box + (48 if out[box + 8] == 0 else 60)
    out[at : at + 36] = struct.pack(">9i", -u, 0, 0, 0, u, 0, 0, 0, w1)
    return bytes(out)


def test_fast_mode_keeps_the_display_matrix():
    clip = _hflip(make_clip(num_frames=60, gop=15, size=(64, 48)))
    plan = sample_plan(clip, KF)
    shown = decode_clip(clip, KF)
    assert torch.equal(shown, decode_views(clip, plan, KF))
    assert not torch.equal(shown, decode_clip(clip, KF.replace(autorotate=False)))
    flat = plan[0]
    assert np.array_equal(decode_frames(clip, flat), decode_frames(clip, flat, autorotate=False)[:, :, ::-1])


# --- over gRPC: the seek and autorotate overrides -------------------------------------------------------


def _motion_clip(label: str, frames: int = 16, gop: int = 60) -> bytes:
    """A demo ``motion`` clip (training.synthetic's drawing), MPEG-4 in mp4 with one keyframe per ``gop``."""
    from training.synthetic import MOTION_LABELS, clip_rng, draw_motion

    out = media.io.BytesIO()
    with av.open(out, mode="w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=8, options={"qscale": "2"})
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.codec_context.gop_size = gop
        for f in draw_motion(clip_rng(7, "val", 0), MOTION_LABELS.index(label), 64, frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode(None))
    return out.getvalue()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    if not (REPO / "model_repository/trunk").is_dir():
        pytest.skip("no committed demo model_repository")
    from serverproc import ServerProcess

    repo = tmp_path_factory.mktemp("demo") / "repo"  # a copy: the server keeps its version marks there
    for part in ("trunk", "tasks"):
        shutil.copytree(REPO / "model_repository" / part, repo / part)
    with ServerProcess(repo, "--decode-workers", "1") as srv:
        yield srv, repo


def test_seek_override_over_grpc(demo_server):
    """A bad value is INVALID_ARGUMENT naming the field, and the server keeps serving; ``keyframe``
    answers what the offline classifier gives on the moved frames."""
    from clients.core import ClientError
    from clients.sync import Client
    from stadapter.api import load_classifier
    from stadapter.predict import predict_clip

    srv, repo = demo_server
    clip = _motion_clip("right")
    with Client(srv.address) as c:
        for bad in ("fast", "", "KEYFRAME"):
            with pytest.raises(ClientError) as e:
                c.classify(clip, "motion", sampling={"seek": bad})
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "seek" in e.value.message, e.value
        exact = c.classify(clip, "motion", top_k=4)
        fast = c.classify(clip, "motion", top_k=4, sampling={"seek": "keyframe"})
    clf = load_classifier(repo / "trunk", repo / "tasks/motion/1")
    with torch.no_grad():
        want = {"exact": predict_clip(clf, clip, 4), "keyframe": predict_clip(clf, clip, 4, seek="keyframe")}
    for got, ref in ((exact, want["exact"]), (fast, want["keyframe"])):
        assert [p.label for p in got.predictions] == [w["label"] for w in ref]
        assert all(abs(p.score - w["score"]) < 1e-4 for p, w in zip(got.predictions, ref, strict=True))
    assert sample_plan(clip, clf.spec.sampling.replace(seek="keyframe")) != sample_plan(clip, clf.spec.sampling)
    assert fast.predictions[0].label == "right"
    assert abs(fast.predictions[0].score - exact.predictions[0].score) > 1e-6  # other frames, other scores


def test_autorotate_override_over_grpc_changes_what_the_model_sees(demo_server):
    """A clip moving left with a horizontal-flip display matrix: a viewer sees it move right, and so does
    the model by default; ``autorotate: false`` shows the model the coded picture, moving left."""
    from clients.sync import Client

    srv, _ = demo_server
    plain = _motion_clip("left", gop=12)
    shown = _hflip(plain)
    with Client(srv.address) as c:
        assert c.classify(plain, "motion").predictions[0].label == "left"
        assert c.classify(shown, "motion").predictions[0].label == "right"
        off = c.classify(shown, "motion", top_k=4, sampling={"autorotate": False})
        assert off.predictions[0].label == "left"
        ref = c.classify(plain, "motion", top_k=4)
        assert [(p.label, round(p.score, 4)) for p in off.predictions] == [(p.label, round(p.score, 4)) for p in ref.predictions]
        assert c.classify(shown, "motion", sampling={"autorotate": True}).predictions[0].label == "right"


def test_the_fast_seek_bench_runs_on_a_tiny_clip():
    """bench/fast_seek.py: its rows check the fast mode against exact decoding of the moved frames."""
    from bench.fast_seek import bench_clip, eval_set, evaluate, floor_views

    clip = make_clip(num_frames=90, gop=30)
    r = bench_clip(clip, SamplingConfig(num_frames=8, input_size=32), repeats=1)
    assert r["max_abs_diff_vs_exact_decoding_of_moved"] == 0 and r["keyframes"] == [0, 30, 60]
    assert r["keyframe_indices"] == [0, 11, 30, 33, 45, 60, 67, 78] and r["speedup_cpu"] > 0
    assert floor_views(clip, [r["keyframe_indices"]]) == [[0, 0, 30, 30, 30, 60, 60, 60]]
    if (REPO / "model_repository/trunk").is_dir():
        from stadapter.api import load_classifier

        clf = load_classifier(REPO / "model_repository/trunk", REPO / "model_repository/tasks/motion/1")
        e = evaluate(clf, eval_set("motion", 4, 16, 60, seed=1000))
        assert e["clips"] == 4 and e["moved_share"] == 1.0 and 0 <= e["top1_keyframe"] <= 1


def test_offline_predict_takes_seek(capsys):
    if not (REPO / "model_repository/trunk").is_dir():
        pytest.skip("no committed demo model_repository")
    import json

    from stadapter.api import load_classifier
    from stadapter.predict import main, predict_clip

    trunk, task = REPO / "model_repository/trunk", REPO / "model_repository/tasks/motion/1"
    clip = REPO / "samples/motion/left.mp4"
    assert main(["--trunk", str(trunk), "--task", str(task), str(clip), "--seek", "keyframe", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["top"]
    want = predict_clip(load_classifier(trunk, task), clip, 5, seek="keyframe")
    assert [t["label"] for t in got] == [t["label"] for t in want]
    assert all(abs(a["score"] - b["score"]) < 1e-6 for a, b in zip(got, want, strict=True))
    with pytest.raises(SystemExit):
        main(["--trunk", str(trunk), "--task", str(task), str(clip), "--seek", "fast"])
