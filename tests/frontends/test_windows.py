"""ClassifyWindows / ClassifyWindowsStream over the real server: a long clip as a timeline, decoded once.

The shipped demo task ``motion`` (model_repository/tasks/motion: left / right / up / down,
trained on 2 s clips of 16 frames at 8 fps) classifies a synthetic clip in which a shape moves
left for 6 s, then right for 6 s (three training-like segments each way).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import grpc
import media
import numpy as np
import pytest
from serverproc import ServerProcess, code_of, metric, scrape

from clients import AsyncClient, Client, ClientError, cli
from server.decode.pool import CRASH_MAGIC, HANG_MAGIC, TEST_HOOK_ENV, ProcessDecodePool, ThreadDecoder
from server.decode.window_jobs import WindowJob
from server.errors import DecoderCrashed, DecodeTimeout
from stadapter.config import SamplingConfig
from stadapter.video import VideoLimits
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc
from training.synthetic import MOTION_LABELS, draw_motion, encode_mp4

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2] / "model_repository"
CHANGE_S = 6.0


def left_then_right(path: Path, seed: int = 0) -> Path:
    """64 px, 8 fps: three 2 s segments moving left, then three moving right (12 s, 96 frames)."""
    rng = np.random.default_rng(seed)
    segments = [draw_motion(rng, MOTION_LABELS.index(d), 64, 16) for d in ("left",) * 3 + ("right",) * 3]
    encode_mp4(np.concatenate(segments), path, fps=8)
    return path



@pytest.fixture(scope="module")
def srv():
    if not (REPO / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    with ServerProcess(REPO, "--poll-interval-s", "0", "--max-batch-size", "8", "--decode-workers", "1") as s:
        s.stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(s.address))
        yield s


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return left_then_right(tmp_path_factory.mktemp("windows") / "left_right.mp4")


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> bytes:
    """Ten minutes at 8 fps, 600 one-second windows: long enough to leave mid-stream."""
    return media.make_clip(num_frames=4800, fps=8, size=(64, 48), pattern="grey", gop=64)


def served(srv) -> None:
    """The server still answers a good request."""
    assert [w.index for w in Client(srv.address).windows(media.make_clip(num_frames=16, fps=8), "motion", 2, 2)] == [0]


def test_left_then_right_changes_at_the_right_time(srv, clip):
    before = scrape(srv.metrics_url)
    with Client(srv.address) as c:
        got = list(c.windows(clip, "motion", window_s=2.0, stride_s=1.0, top_k=2, request_id="tl-1"))
    after = scrape(srv.metrics_url)
    assert [w.index for w in got] == list(range(11))  # starts 0..10 s; the last ends at 12 s
    for w in got:
        assert (w.start_s, w.end_s) == pytest.approx((w.index * 1.0, w.index + 2.0))
        assert (w.start_frame, w.end_frame) == (8 * w.index, 8 * w.index + 16)
        assert w.task == "motion" and w.task_version >= 1 and w.request_id == "tl-1" and len(w.predictions) == 2
    labels = [w.top.label for w in got]
    assert all(label == "left" for w, label in zip(got, labels, strict=True) if w.end_s <= CHANGE_S), labels
    assert all(label == "right" for w, label in zip(got, labels, strict=True) if w.start_s >= CHANGE_S), labels
    first_right = next(w for w in got if w.top.label == "right")
    assert abs(first_right.start_s - CHANGE_S) <= 1.0  # within one stride of the change
    count = lambda n, **kw: metric(after, n, **kw) - metric(before, n, **kw)  # noqa: E731
    assert count("stadapter_decode_seconds_count") == 1  # one decode for eleven windows
    assert count("stadapter_clips_total", task="motion") == 11
    assert count("stadapter_requests_total", method="ClassifyWindows", task="motion", code="OK") == 1


def test_stride_equal_to_window_and_the_async_client(srv, clip):
    async def run():
        async with AsyncClient(srv.address) as c:
            return [w async for w in c.windows(clip, "motion", window_s=2.0, stride_s=2.0)]

    got = asyncio.run(run())
    assert [(w.start_s, w.top.label) for w in got] == [(0, "left"), (2, "left"), (4, "left"),
                                                        (6, "right"), (8, "right"), (10, "right")]


def test_chunked_upload_gives_the_same_timeline(srv, clip):
    whole = list(Client(srv.address).windows(clip, "motion", 2.0, 2.0))
    n0 = metric(scrape(srv.metrics_url), "stadapter_requests_total", method="ClassifyWindowsStream", task="motion",
                code="OK")
    with Client(srv.address, stream_threshold_bytes=1000, chunk_bytes=700) as c:
        chunked = list(c.windows(clip, "motion", 2.0, 2.0))
    assert [(w.index, w.top.label) for w in chunked] == [(w.index, w.top.label) for w in whole]
    for a, b in zip(chunked, whole, strict=True):
        assert a.top.score == pytest.approx(b.top.score, abs=1e-5)
    assert metric(scrape(srv.metrics_url), "stadapter_requests_total", method="ClassifyWindowsStream", task="motion",
                  code="OK") == n0 + 1


@pytest.mark.parametrize("window_s, stride_s, says", [
    (0.0, 1.0, "window_s must be a positive"),
    (2.0, -1.0, "stride_s must be a positive"),
    (1.0, 2.0, "longer than window_s"),
    (0.5, 0.5, "shorter than the 8 frames the task's sampling takes"),
    (2.0, 0.01, "shorter than one frame"),
])
def test_bad_window_arguments_are_invalid_argument(srv, clip, window_s, stride_s, says):
    req = pb.ClassifyWindowsRequest(task="motion", clip=clip.read_bytes(), window_s=window_s, stride_s=stride_s)
    with pytest.raises(grpc.RpcError) as e:
        list(srv.stub.ClassifyWindows(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.value.details()
    served(srv)


def test_unknown_task_garbage_and_short_clips(srv, clip):
    data = clip.read_bytes()
    with pytest.raises(ClientError) as e:
        list(Client(srv.address).windows(data, "no-such-task", 2, 2))
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    for bad, says in ((media.garbage(), "not a readable video"), (media.make_clip(num_frames=12, fps=8), "shorter than")):
        req = pb.ClassifyWindowsRequest(task="motion", clip=bad, window_s=2, stride_s=1)
        with pytest.raises(grpc.RpcError) as e:
            list(srv.stub.ClassifyWindows(req, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.value.details()
        served(srv)
    assert code_of(lambda: list(srv.stub.ClassifyWindowsStream(iter([]), timeout=10))) == grpc.StatusCode.INVALID_ARGUMENT


def shm_blocks(srv) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"stadapter-dec-{srv.proc.pid}-")]


def test_leaving_mid_stream_stops_the_decode_and_frees_everything(srv, long_clip):
    before = scrape(srv.metrics_url)
    stream = Client(srv.address).windows(long_clip, "motion", 1.0, 1.0)
    assert next(stream).index == 0
    stream.close()  # leaves the loop: the call is cancelled
    deadline = time.monotonic() + 10
    m = scrape(srv.metrics_url)
    held = ("stadapter_requests_in_flight", "stadapter_queue_depth", "stadapter_clip_in_flight_bytes")
    while any(metric(m, n) for n in held) and time.monotonic() < deadline:  # gauges are read one by one: wait for all
        time.sleep(0.05)
        m = scrape(srv.metrics_url)
    assert metric(m, "stadapter_requests_in_flight") == 0 and metric(m, "stadapter_queue_depth") == 0
    assert metric(m, "stadapter_clip_in_flight_bytes") == 0
    assert metric(m, "stadapter_requests_total", method="ClassifyWindows", task="motion", code="CANCELLED") == \
        metric(before, "stadapter_requests_total", method="ClassifyWindows", task="motion", code="CANCELLED") + 1
    computed = metric(m, "stadapter_clips_total", task="motion") - metric(before, "stadapter_clips_total", task="motion")
    assert computed < 600  # the decode stopped: not every window of the ten minutes was classified
    served(srv)  # the one decoder worker is free again
    assert shm_blocks(srv) == []


def test_cli_json_table_and_plot(srv, clip, tmp_path, capsys):
    args = ["windows", "--address", srv.address, "--task", "motion", "--window-s", "2", "--stride-s", "2", str(clip)]
    assert cli.main([*args, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["start_s"], r["end_s"], r["predictions"][0]["label"]) for r in rows] == [
        (0, 2, "left"), (2, 4, "left"), (4, 6, "left"), (6, 8, "right"), (8, 10, "right"), (10, 12, "right")]
    out = tmp_path / "timeline.png"
    assert cli.main([*args, "--plot", str(out)]) == 0
    text = capsys.readouterr()
    assert text.out.splitlines()[0].split()[:4] == ["START", "END", "TOP-1", "SCORE"]
    assert [line.split()[2] for line in text.out.splitlines()[1:]] == ["left"] * 3 + ["right"] * 3
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "timeline written to" in text.err
    assert cli.main([*args[:-1], str(tmp_path / "missing.mp4")]) == 1


def test_plot_without_matplotlib_is_a_clear_error_before_any_upload(srv, clip, tmp_path, capsys, monkeypatch):
    """The client-only install has no matplotlib: --plot says so (exit 1, one line) and sends nothing."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    before = scrape(srv.metrics_url)
    out = tmp_path / "t.png"
    assert cli.main(["windows", "--address", srv.address, "--task", "motion", "--window-s", "2", str(clip),
                     "--plot", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install matplotlib" in err and "Traceback" not in err
    assert not out.exists()
    after = scrape(srv.metrics_url)
    assert metric(after, "stadapter_requests_total", method="ClassifyWindows", task="motion", code="OK") == \
        metric(before, "stadapter_requests_total", method="ClassifyWindows", task="motion", code="OK")


def test_an_hour_long_clip_and_the_deadline(srv, long_clip):
    hour = media.make_clip(num_frames=3600 * 8 + 4, fps=8, size=(64, 48), pattern="grey", gop=240)  # 28,804 frames
    n0 = metric(scrape(srv.metrics_url), "stadapter_decode_seconds_count")
    got = list(Client(srv.address).windows(hour, "motion", window_s=60.0, stride_s=60.0))
    assert [w.index for w in got] == list(range(60)) and got[-1].end_s == pytest.approx(3600.0)
    assert metric(scrape(srv.metrics_url), "stadapter_decode_seconds_count") == n0 + 1
    with pytest.raises(ClientError) as e:  # 600 windows do not fit in half a second
        list(Client(srv.address).windows(long_clip, "motion", 1.0, 1.0, timeout=0.5))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    served(srv)


def test_the_pool_streams_windows_in_the_sandbox(clip, monkeypatch):
    """Process and thread backends give the same batches; a hung or crashing window decode costs its worker only;
    leaving early gives the worker back; no shared-memory block is left."""
    monkeypatch.setenv(TEST_HOOK_ENV, "hang-on-magic,crash-on-magic")
    data, cfg = clip.read_bytes(), SamplingConfig(num_frames=8, input_size=48)
    job = WindowJob(2.0, 2.0, per_batch=4)

    async def collect(decoder, clip_bytes, timeout_s=10.0, j=job):
        return [b async for b in decoder.windows(clip_bytes, cfg, VideoLimits(), j, timeout_s)]

    async def run():
        pool, thread = ProcessDecodePool(1), ThreadDecoder(1)
        await pool.start()
        try:
            a, b = await collect(pool, data), await collect(thread, data)
            assert [len(x.spans) for x in a] == [len(x.spans) for x in b] == [1, 3, 2]  # small first, up to 4
            for x, y in zip(a, b, strict=True):
                assert x.spans == y.spans and x.frames.shape == (len(x.spans), 1, 8, 3, 48, 48)
                assert bool((x.frames == y.frames).all())
            with pytest.raises(DecodeTimeout, match="no window decoded for 0.5 s"):
                await collect(pool, HANG_MAGIC + data, timeout_s=0.5)
            with pytest.raises(DecoderCrashed):
                await collect(pool, CRASH_MAGIC + data)
            stream = pool.windows(data, cfg, VideoLimits(), WindowJob(2.0, 2.0, per_batch=1), 10.0)
            assert (await stream.__anext__()).spans[0].index == 0
            await stream.aclose()  # the job is stopped in the background and the worker reused
            assert [len(x.spans) for x in await collect(pool, data)] == [1, 3, 2]
            assert not [n for n in os.listdir("/dev/shm") if n.startswith(pool.shm_prefix)]
        finally:
            pool.close()
            thread.close()

    asyncio.run(run())


def test_the_first_batches_are_small_so_compute_starts_early(clip):
    """The first batch is handed over after its first window, not after a whole forward's worth: the decoder
    goes on while the model computes; batches triple up to ``per_batch``."""
    from server.decode.window_jobs import window_batches
    from stadapter.video import DecodeStats

    data, cfg = clip.read_bytes(), SamplingConfig(num_frames=8, input_size=48)
    stats = DecodeStats()
    batches = window_batches(data, cfg, VideoLimits(), WindowJob(1.0, 0.5, per_batch=9), stats)
    first = next(batches)
    assert len(first.spans) == 3 and stats.windows == 3
    assert [len(b.spans) for b in batches] == [9, 9, 2] and stats.windows == 23  # 12 s, every 0.5 s
    assert [len(b.spans) for b in window_batches(data, cfg, VideoLimits(), WindowJob(1.0, 0.5, 8, first_batch=8))][0] == 8
    with pytest.raises(ValueError, match="first_batch"):
        WindowJob(1.0, 1.0, 8, first_batch=0)
