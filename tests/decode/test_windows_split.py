"""A long ClassifyWindows video split between decoder workers (``--window-decoders``): each decodes a run of
the windows after one seek; the answers are those of one decoder, in window order, and every worker comes back."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import media
import numpy as np
import pytest
from serverproc import ServerProcess, code_of, metric, scrape

from clients import Client
from server.decode.pool import CRASH_MAGIC, TEST_HOOK_ENV, ProcessDecodePool
from server.decode.window_jobs import WindowJob
from server.errors import DecoderCrashed
from stadapter.config import SamplingConfig
from stadapter.video import VideoLimits
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc
from training.synthetic import MOTION_LABELS, draw_motion, encode_mp4

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2] / "model_repository"
SEGMENTS = 12  # 2 s segments each way: 48 s, 24 windows of 2 s, three parts' worth


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """64 px, 8 fps: twelve 2 s segments moving left, then twelve moving right (48 s, 384 frames)."""
    rng = np.random.default_rng(1)
    segments = [draw_motion(rng, MOTION_LABELS.index(d), 64, 16) for d in ("left",) * SEGMENTS + ("right",) * SEGMENTS]
    path = tmp_path_factory.mktemp("split") / "left_right_48s.mp4"
    encode_mp4(np.concatenate(segments), path, fps=8)
    return path


def servers(*args: str):
    if not (REPO / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    return ServerProcess(REPO, "--poll-interval-s", "0", "--max-batch-size", "8", "--decode-workers", "2", *args)


@pytest.fixture(scope="module")
def split():
    with servers("--window-decoders", "2") as s:
        yield s


def test_a_split_timeline_is_the_one_decoder_timeline_in_order(split, clip):
    with servers("--window-decoders", "1") as one:
        whole = list(Client(one.address).windows(clip, "motion", window_s=2.0, stride_s=2.0, top_k=4))
    n0 = metric(scrape(split.metrics_url), "stadapter_decode_seconds_count")
    got = list(Client(split.address).windows(clip, "motion", window_s=2.0, stride_s=2.0, top_k=4))
    assert [w.index for w in got] == list(range(24))  # in window order, each once
    assert [(w.start_frame, w.end_frame) for w in got] == [(w.start_frame, w.end_frame) for w in whole]
    for a, b in zip(got, whole, strict=True):
        assert [p.label for p in a.predictions] == [p.label for p in b.predictions]
        assert [p.score for p in a.predictions] == pytest.approx([p.score for p in b.predictions], abs=1e-5)
    labels = [w.top.label for w in got]
    assert labels == ["left"] * SEGMENTS + ["right"] * SEGMENTS, labels
    assert metric(scrape(split.metrics_url), "stadapter_decode_seconds_count") == n0 + 1  # one request, one decode


def test_leaving_a_split_stream_gives_back_both_workers(split):
    ten_minutes = media.make_clip(num_frames=4800, fps=8, size=(64, 48), pattern="grey", gop=64)
    stream = Client(split.address).windows(ten_minutes, "motion", 1.0, 1.0)
    assert next(stream).index == 0
    stream.close()
    deadline = time.monotonic() + 20
    held = ("stadapter_requests_in_flight", "stadapter_queue_depth", "stadapter_clip_in_flight_bytes")
    while any(metric(scrape(split.metrics_url), n) for n in held):
        assert time.monotonic() < deadline, "the cancelled windows call still holds the server"
        time.sleep(0.05)
    # two clips at once need both workers back: neither waits past the decode
    small = media.make_clip(num_frames=16, fps=8)
    with grpc.insecure_channel(split.address) as ch:
        stub = pb_grpc.VideoClassifierStub(ch)
        futures = [stub.Classify.future(pb.ClassifyRequest(task="motion", clip=small), timeout=30) for _ in range(2)]
        assert all(f.result().predictions for f in futures)
    pid = split.proc.pid
    deadline = time.monotonic() + 10
    while [n for n in os.listdir("/dev/shm") if n.startswith(f"stadapter-dec-{pid}-")]:
        assert time.monotonic() < deadline, "a shared-memory block of the stopped parts was left"
        time.sleep(0.05)


def test_bad_clips_on_the_split_path_are_clean_errors(split, clip):
    stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(split.address))
    garbage = pb.ClassifyWindowsRequest(task="motion", clip=media.garbage(), window_s=2.0, stride_s=2.0)
    assert code_of(lambda: list(stub.ClassifyWindows(garbage, timeout=30))) == grpc.StatusCode.INVALID_ARGUMENT
    mkv = media.make_clip(num_frames=384, fps=8, size=(64, 64), pattern="grey", gop=16, container="matroska")
    cut = media.truncated(mkv, 0.6)  # the header plans 24 windows; the stream holds fewer
    got = list(Client(split.address).windows(cut, "motion", 2.0, 2.0))
    assert 1 <= len(got) < 24 and [w.index for w in got] == list(range(len(got)))
    assert [w.index for w in Client(split.address).windows(clip, "motion", 2.0, 2.0)] == list(range(24))


async def spans(stream) -> list[int]:
    """The window indices of a pool's windowed decode, sorted."""
    return sorted(s.index for b in [b async for b in stream] for s in b.spans)


def test_the_pool_splits_only_between_free_workers(clip, monkeypatch):
    """Both workers take a part when both are free; a job that starts while one is busy runs whole on the other;
    a crash in the parts fails the call, and the pool serves the next one."""
    monkeypatch.setenv(TEST_HOOK_ENV, "crash-on-magic")
    data, cfg = clip.read_bytes(), SamplingConfig(num_frames=8, input_size=48)
    job = WindowJob(2.0, 2.0, per_batch=4)

    async def run():
        pool = ProcessDecodePool(2, window_workers=2)
        await pool.start()
        try:
            stream = pool.windows(data, cfg, VideoLimits(), job, 30.0)
            first = await stream.__anext__()
            assert pool._free.qsize() == 0  # both workers decode a part
            rest = await spans(stream)
            assert sorted([s.index for s in first.spans] + rest) == list(range(24))
            busy = await pool._free.get()  # one worker is busy elsewhere: the next job runs whole on the other
            stream = pool.windows(data, cfg, VideoLimits(), job, 30.0)
            first = await stream.__anext__()
            assert first.spans[0].index == 0 and pool._free.qsize() == 0
            assert sorted([s.index for s in first.spans] + await spans(stream)) == list(range(24))
            pool._free.put_nowait(busy)
            with pytest.raises(DecoderCrashed):
                await spans(pool.windows(CRASH_MAGIC + data, cfg, VideoLimits(), job, 30.0))
            assert await spans(pool.windows(data, cfg, VideoLimits(), job, 30.0)) == list(range(24))
            end = time.monotonic() + 10
            while pool._free.qsize() < 2:
                assert time.monotonic() < end, "a worker of a stopped part did not come back"
                await asyncio.sleep(0.05)
            assert not [n for n in os.listdir("/dev/shm") if n.startswith(pool.shm_prefix)]
        finally:
            pool.close()

    asyncio.run(run())


def test_a_split_video_is_held_to_the_limits_of_one_decode(clip):
    """Each part's decoder has a budget of its own: a video over max_frames_decoded whose parts are each under it
    is refused split as it is whole (the parts' counts are summed), and the pool serves the next call."""
    from stadapter.video import DecodeStats, VideoError, WindowLimits, WindowPart, decode_windows

    data, cfg = clip.read_bytes(), SamplingConfig(num_frames=8, input_size=48)
    counts = []
    for part in (WindowPart(), WindowPart(0, 2), WindowPart(1, 2)):
        stats = DecodeStats()
        list(decode_windows(data, cfg, 2.0, 2.0, stats=stats, part=part))
        counts.append(stats.frames)
    whole, parts = counts[0], counts[1:]
    limit = max(parts) + 1
    assert whole > limit, (whole, parts)  # each part is under the limit, the video is not
    job = WindowJob(2.0, 2.0, per_batch=4, limits=WindowLimits(max_frames_decoded=limit))

    async def run():
        pool = ProcessDecodePool(2, window_workers=2)
        await pool.start()
        try:
            with pytest.raises(VideoError, match=f"more than {limit} decoded frames"):
                await spans(pool.windows(data, cfg, VideoLimits(), job, 30.0))  # split between both workers
            end = time.monotonic() + 10
            while pool._free.qsize() < 2:
                assert time.monotonic() < end, "a worker of the refused parts did not come back"
                await asyncio.sleep(0.05)
            busy = await pool._free.get()  # one worker free: the video decodes whole, refused the same way
            with pytest.raises(VideoError, match=f"more than {limit} decoded frames"):
                await spans(pool.windows(data, cfg, VideoLimits(), job, 30.0))
            pool._free.put_nowait(busy)
            assert await spans(pool.windows(data, cfg, VideoLimits(), WindowJob(2.0, 2.0, per_batch=4), 30.0)) == \
                list(range(24))
        finally:
            pool.close()

    asyncio.run(run())
