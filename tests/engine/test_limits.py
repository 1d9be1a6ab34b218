"""Limits with one source: flags -> one frozen ServerLimits shared by services, pipeline, batcher, decoder;
the request ticket that owns what a request holds; the decoder's limits, --max-num-frames and the stream
idle timeout as a real server applies them (clear message, right code, the next request served)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import urllib.request

import grpc
import media
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, make_repository

from server.config import ServerConfig, parse_args
from server.engine.admission import Admission
from server.engine.batcher import Batcher
from server.engine.pipeline import Pipeline
from server.errors import BadRequest, Draining, QueueFull, TaskNotFound
from server.registry.registry import TaskRegistry
from stadapter.video import VideoLimits
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

# --- one frozen limits object from the flags -------------------------------------------------------


def test_flags_build_one_frozen_limits_object(tmp_path):
    cfg = parse_args(["--model-repository", str(tmp_path), "--max-clip-bytes", "1000", "--max-inflight-clip-bytes",
                      "3000", "--max-clip-duration-s", "5", "--max-frame-pixels", "640", "--max-decoded-pixels",
                      "9999", "--max-decode-seconds", "7", "--max-num-frames", "16", "--stream-idle-timeout-s", "3",
                      "--max-batch-size", "4", "--max-queue-size", "9", "--decode-timeout-s", "2",
                      "--max-bundle-bytes", "12345"])
    lim = cfg.limits
    assert lim is cfg.limits  # built once
    assert lim.max_clip_bytes == lim.video.max_bytes == 1000  # one place: the decoder checks the same number
    assert (lim.video.max_duration_s, lim.video.max_pixels, lim.video.max_decoded_pixels,
            lim.video.max_decode_seconds) == (5.0, 640, 9999, 7.0)
    assert (lim.max_inflight_clip_bytes, lim.max_num_frames, lim.stream_idle_timeout_s, lim.max_batch_rows,
            lim.max_queue_size, lim.decode_timeout_s, lim.bundle.max_tensor_bytes) == (3000, 16, 3.0, 4, 9, 2.0, 12345)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lim.max_num_frames = 1000
    with pytest.raises(AttributeError):
        lim.max_clip_bytes = 5  # a read-only view of video.max_bytes


def test_decoder_flag_defaults_are_the_decoders_own(tmp_path):
    v, d = ServerConfig(model_repository=tmp_path).limits.video, VideoLimits()
    assert (v.max_duration_s, v.max_pixels, v.max_decoded_pixels, v.max_decode_seconds, v.formats) == \
        (d.max_duration_s, d.max_pixels, d.max_decoded_pixels, d.max_decode_seconds, d.formats)


@pytest.mark.parametrize("flag, value", [("--max-num-frames", "0"), ("--stream-idle-timeout-s", "0"),
                                         ("--max-clip-duration-s", "-1"), ("--max-frame-pixels", "0"),
                                         ("--max-decode-seconds", "0")])
def test_bad_limit_flags_are_refused(tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), flag, value])
    assert flag.lstrip("-").replace("-", "_") in capsys.readouterr().err


def test_services_pipeline_batcher_share_the_one_object(two_task_repo, tiny_trunk):
    limits = ServerConfig(model_repository=two_task_repo, max_clip_bytes=1234).limits
    batcher = Batcher(None, limits, 0.01)
    p = Pipeline(TaskRegistry(two_task_repo, tiny_trunk), batcher, None, limits)
    try:
        assert p.limits is batcher.limits is p.admission.limits is limits
        assert not hasattr(p, "max_clip_bytes") and batcher.max_rows == limits.max_batch_rows
    finally:
        p.close()


def test_the_default_decoder_is_sized_by_the_one_decode_workers_setting(two_task_repo, tiny_trunk, monkeypatch):
    """``ServerConfig.decode_workers`` owns the decode pool's size; the pipeline has no size of its own."""
    monkeypatch.setattr(ServerConfig, "decode_workers", 3)
    limits = ServerConfig(model_repository=two_task_repo).limits
    args = (TaskRegistry(two_task_repo, tiny_trunk), Batcher(None, limits, 0.01), None, limits)
    p = Pipeline(*args)
    try:
        assert p.decoder.pool._max_workers == 3
    finally:
        p.close()
    with pytest.raises(TypeError, match="decode_workers"):
        Pipeline(*args, decode_workers=3)  # type: ignore[call-arg]


# --- the ticket: one owner for what a request holds ---------------------------------------------------


def _admission(repo, trunk, **cfg) -> Admission:
    reg = TaskRegistry(repo, trunk)
    reg.sync()
    return Admission(reg, ServerConfig(model_repository=repo, **cfg).limits)


def test_ticket_gives_everything_back_on_every_exit(two_task_repo, tiny_trunk):
    a = _admission(two_task_repo, tiny_trunk, max_queue_size=2, max_clip_bytes=100, max_inflight_clip_bytes=100)
    alpha = a.registry.tasks["alpha"]

    async def go():
        async with a.request() as t:  # a normal exit
            t.hold(60)
            slot = t.take_slot("alpha")
            assert (a.inflight, a.pending, a.held_bytes, alpha.inflight) == (1, 1, 60, 1)
            slot.release()
            slot.release()  # twice is once
            assert (a.pending, alpha.inflight) == (0, 0)
            t.take_slot("alpha")
        assert (a.inflight, a.pending, a.held_bytes, alpha.inflight) == (0, 0, 0, 0)

        with pytest.raises(QueueFull, match="already hold 60 bytes; 50 more would pass the limit of 100"):
            async with a.request() as t1, a.request() as t2:  # a refusal holds nothing more
                t1.hold(60)
                t2.hold(50)
        with pytest.raises(BadRequest, match="one request carries 101 bytes .* --max-inflight-clip-bytes of 100"):
            async with a.request() as t:
                t.hold(101)
        with pytest.raises(QueueFull, match="--max-queue-size"):
            async with a.request() as t:
                t.take_slot("alpha"), t.take_slot("beta"), t.take_slot("alpha")
        with pytest.raises(TaskNotFound):
            async with a.request() as t:
                t.take_slot("nope")
        assert (a.inflight, a.pending, a.held_bytes, alpha.inflight) == (0, 0, 0, 0)

        started = asyncio.Event()

        async def hangs():  # cancelled while holding everything
            async with a.request() as t:
                t.hold(40)
                t.take_slot("alpha")
                started.set()
                await asyncio.sleep(3600)

        task = asyncio.ensure_future(hangs())
        await started.wait()
        assert (a.inflight, a.pending, a.held_bytes, alpha.inflight) == (1, 1, 40, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (a.inflight, a.pending, a.held_bytes, alpha.inflight) == (0, 0, 0, 0)
        assert await a.wait_idle(0.1)

        a.draining = True
        with pytest.raises(Draining):
            async with a.request():
                pass
        assert a.inflight == 0

    asyncio.run(go())


# --- over a real server --------------------------------------------------------------------------


def _held_bytes(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "stadapter_clip_in_flight_bytes")


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("limits") / "repo")
    with ServerProcess(repo, "--allow-insecure-admin", "--max-num-frames", "6", "--max-clip-duration-s", "0.5",
                       "--max-frame-pixels", "3000", "--stream-idle-timeout-s", "1", "--max-clip-bytes", "200000",
                       "--poll-interval-s", "0", "--no-warmup") as srv:
        srv.repo = repo
        srv.clf = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
        srv.admin = pb_grpc.TaskAdminStub(grpc.insecure_channel(srv.address))
        yield srv


@pytest.fixture(scope="module")
def ok_clip() -> bytes:
    return media.make_clip(num_frames=12, size=(48, 40))  # 0.4 s, 1,920 pixels


def _refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("what, request_kwargs, message", [
    ("num_frames override", dict(sampling=pb.SamplingOverrides(num_frames=8)),
     "num_frames=8 is above the server's --max-num-frames of 6"),
    ("duration", dict(clip=media.make_clip(num_frames=30, size=(48, 40))), "over the limit of 0.5 s"),
    ("frame pixels", dict(clip=media.make_clip(num_frames=12, size=(64, 48))), "3072 pixels is over the limit"),
    ("clip bytes", dict(clip=b"\0" * 200001), "above the server's --max-clip-bytes of 200000"),
])
def test_a_request_over_a_limit_is_refused_and_the_next_served(limited, ok_clip, what, request_kwargs, message):
    req = pb.ClassifyRequest(task="alpha", clip=ok_clip)
    for k, v in request_kwargs.items():
        getattr(req, k).CopyFrom(v) if k == "sampling" else setattr(req, k, v)
    err = _refused(lambda: limited.clf.Classify(req, timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details(), (what, err.details())
    ok = limited.clf.Classify(pb.ClassifyRequest(task="alpha", clip=ok_clip,
                                                 sampling=pb.SamplingOverrides(num_frames=6)), timeout=60)
    assert ok.task == "alpha" and ok.predictions
    assert _held_bytes(limited.metrics_url) == 0


def _stalls(first, gate: threading.Event):
    yield first
    gate.wait(60)


def test_a_silent_stream_is_ended_and_its_bytes_freed(limited, ok_clip):
    """No client deadline: only the idle timeout ends it (DEADLINE_EXCEEDED: the data did not arrive in time;
    nothing in it is invalid)."""
    gate = threading.Event()
    try:
        t0 = time.monotonic()
        fut = limited.clf.ClassifyStream.future(_stalls(pb.ClassifyChunk(task="alpha", data=ok_clip[:500]), gate))
        err = fut.exception(timeout=20)
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 1 s (--stream-idle-timeout-s) after 500 bytes" in err.details()
        assert time.monotonic() - t0 < 10
        assert _held_bytes(limited.metrics_url) == 0
        bundle = limited.repo / "tasks" / "beta" / "1"
        fut = limited.admin.RegisterTask.future(_stalls(pb.RegisterTaskChunk(
            filename="task.json", data=(bundle / "task.json").read_bytes()), gate))
        err = fut.exception(timeout=20)
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert "--stream-idle-timeout-s" in err.details()
    finally:
        gate.set()
    deadline = time.monotonic() + 10
    while list(limited.repo.glob("tasks/.upload-*")):
        assert time.monotonic() < deadline, "the idle upload's folder was left behind"
        time.sleep(0.05)
    chunks = [pb.ClassifyChunk(task="alpha", data=ok_clip[:500]), pb.ClassifyChunk(data=ok_clip[500:])]
    assert limited.clf.ClassifyStream(iter(chunks), timeout=60).task == "alpha"  # a prompt stream still works
    assert sorted(p.name for p in (limited.repo / "tasks" / "beta").iterdir()) == ["1"]


def test_a_streamed_clip_over_max_clip_bytes_names_the_flag(limited):
    chunks = [pb.ClassifyChunk(task="alpha", data=b"\0" * 150000), pb.ClassifyChunk(data=b"\0" * 60000)]
    err = _refused(lambda: limited.clf.ClassifyStream(iter(chunks), timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-clip-bytes of 200000" in err.details()
    assert _held_bytes(limited.metrics_url) == 0


def test_the_stalled_streams_bench_runs():
    """The bench behind the RSS figure in docs/benchmarks.md (its ratio is a bench figure, not asserted here)."""
    from bench.stalled_streams import main

    res = main(["--streams", "2", "--mb", "2", "--chunk-kb", "256", "--phase", "decoding"])["decoding"]
    assert res["held_bytes_gauge"] == res["budget_bytes"] == 4 << 20 and not res["refused"]
    assert res["held_after_cancel"] == 0 and res["rss_growth_mb"] > 0


# --- the flags that own these limits -------------------------------------------------------------


def test_window_and_response_cache_flags_reach_the_limits():
    from server.config import parse_args

    cfg = parse_args(["--model-repository", "r", "--max-windows", "7", "--max-window-video-s", "90",
                      "--response-cache-bytes", "4096"])
    assert (cfg.limits.windows.max_windows, cfg.limits.windows.max_duration_s) == (7, 90.0)
    assert cfg.response_cache_bytes == 4096
    default = parse_args(["--model-repository", "r"])
    assert default.response_cache_bytes == 0  # off unless asked for
    assert default.limits.windows.max_windows == 20_000


@pytest.mark.parametrize("argv", [["--max-windows", "0"], ["--max-window-video-s", "0"],
                                  ["--response-cache-bytes", "-1"],
                                  ["--drain-timeout", "7"]])  # an abbreviation is not a flag
def test_bad_or_abbreviated_flags_are_usage_errors(argv, capsys):
    from server.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--model-repository", "r", *argv])
    assert e.value.code == 2 and capsys.readouterr().err
