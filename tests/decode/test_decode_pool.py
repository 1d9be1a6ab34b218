"""The sandboxed decoder pool (server/decode/pool.py): same frames as in-process, crashes and hangs cost one request.

The crash/hang clips use the test-only hook (env ``STADAPTER_DECODE_TEST_HOOK``, read by workers at start).
"""

from __future__ import annotations

import asyncio
import os
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import grpc
import media
import pytest
import torch
from serverproc import ServerProcess, make_repository, wait_for_async

from server.decode.pool import CRASH_MAGIC, HANG_MAGIC, TEST_HOOK_ENV, ProcessDecodePool, ThreadDecoder
from server.errors import DeadlineExpired, DecoderCrashed, DecoderOutOfMemory, DecodeTimeout, Draining, status_for
from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits, decode_clip, normalise_views
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

SAMPLING = SamplingConfig(num_frames=4, input_size=32, resize=36)
LIMITS = VideoLimits()


def model_input(views: torch.Tensor) -> torch.Tensor:
    """The decoders' uint8 views as the model normalises them (``ModelRunner.stage``)."""
    return normalise_views(views, SAMPLING.mean, SAMPLING.std)


def shm_blocks(pool: ProcessDecodePool) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(pool.shm_prefix)]


@pytest.fixture(scope="module")
def clip() -> bytes:
    return media.make_clip(num_frames=12)


@pytest.fixture(scope="module")
def pool(loop):
    """Two workers with both test hooks armed ("crash-on-magic" first; hang tests use their own pool)."""
    os.environ[TEST_HOOK_ENV] = "crash-on-magic"
    try:
        p = ProcessDecodePool(2)
        loop.run_until_complete(p.start())
    finally:
        os.environ.pop(TEST_HOOK_ENV, None)
    yield p
    p.close()


def run(loop, coro):
    return loop.run_until_complete(coro)


def test_good_clip_equals_in_process_decode(loop, pool, clip):
    want = decode_clip(clip, SAMPLING, LIMITS)
    got, decode_s = run(loop, pool.decode(clip, SAMPLING, LIMITS, 30.0))
    assert got.dtype == torch.uint8 and torch.equal(model_input(got), want) and decode_s > 0
    assert shm_blocks(pool) == []


def test_workers_decode_clips_and_windows_without_torch(loop, pool, clip):
    """A worker holds PyAV and numpy, never torch (which took ~0.7 GB of RSS and seconds of start-up in each):
    after a clip and a window job, no worker process has torch's library mapped."""
    from server.decode.window_jobs import WindowJob

    run(loop, pool.decode(clip, SAMPLING, LIMITS, 30.0))

    async def windows() -> list:
        return [b async for b in pool.windows(clip, SAMPLING, LIMITS, WindowJob(0.2, 0.2, per_batch=2), 30.0)]

    batches = run(loop, windows())
    assert batches and all(isinstance(b.frames, torch.Tensor) for b in batches)  # tensors again in the server
    pids = [w.proc.pid for w in pool._all]
    assert len(pids) == 2
    for pid in pids:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps, f"decoder worker {pid} has torch loaded"
        assert "libavcodec" in maps  # the check reads a live worker's maps


def test_thread_backend_decodes_the_same(loop, clip):
    dec = ThreadDecoder(1)
    try:
        got, _ = run(loop, dec.decode(clip, SAMPLING, LIMITS, 30.0))
        assert torch.equal(model_input(got), decode_clip(clip, SAMPLING, LIMITS))
    finally:
        dec.close()


def test_frames_cross_shared_memory_as_uint8(loop, pool, clip, monkeypatch):
    """A worker's block for a clip of V views of T frames of S x S x 3 holds V*T*S*S*3 bytes (uint8 crops, a
    quarter of float32's), in clip and window mode, and the views reach the server as uint8."""
    from server.decode import pool as pool_module
    from server.decode.window_jobs import WindowJob

    blocks: list[int] = []
    real = pool_module.read_block

    def measured(name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        shm = SharedMemory(name=name)
        blocks.append(shm.size)
        shm.close()
        return real(name, shape, dtype)

    monkeypatch.setattr(pool_module, "read_block", measured)
    per_clip = SAMPLING.num_views * SAMPLING.num_frames * SAMPLING.input_size ** 2 * 3
    got, _ = run(loop, pool.decode(clip, SAMPLING, LIMITS, 30.0))
    assert blocks == [per_clip]
    assert got.dtype == torch.uint8 and got.shape == (1, 4, 3, 32, 32)

    async def windows() -> list:
        return [b async for b in pool.windows(clip, SAMPLING, LIMITS, WindowJob(0.2, 0.2, per_batch=2), 30.0)]

    blocks.clear()
    batches = run(loop, windows())
    assert blocks == [len(b.spans) * per_clip for b in batches]
    assert batches and all(b.frames.dtype == torch.uint8 for b in batches)
    assert shm_blocks(pool) == []


def test_the_thread_backend_hands_over_uint8_too(loop, clip):
    from server.decode.window_jobs import WindowJob

    dec = ThreadDecoder(1)

    async def windows() -> list:
        return [b async for b in dec.windows(clip, SAMPLING, LIMITS, WindowJob(0.2, 0.2, per_batch=2), 30.0)]

    try:
        got, _ = run(loop, dec.decode(clip, SAMPLING, LIMITS, 30.0))
        assert got.dtype == torch.uint8 and got.shape == (1, 4, 3, 32, 32)
        batches = run(loop, windows())
        assert batches and all(b.frames.dtype == torch.uint8 and b.frames.shape[1:] == got.shape for b in batches)
    finally:
        dec.close()


@pytest.mark.parametrize("bad", [media.garbage(3000), media.make_audio_only()], ids=["garbage", "audio-only"])
def test_bad_clip_gives_the_same_video_error(loop, pool, bad):
    with pytest.raises(VideoError) as local:
        decode_clip(bad, SAMPLING, LIMITS)
    with pytest.raises(VideoError) as remote:
        run(loop, pool.decode(bad, SAMPLING, LIMITS, 30.0))
    assert type(remote.value) is type(local.value) and str(remote.value) == str(local.value)
    assert status_for(remote.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert shm_blocks(pool) == []


def test_crashed_worker_fails_only_its_request_and_is_replaced(loop, pool, clip):
    pids = {w.proc.pid for w in pool._all}

    async def both():
        return await asyncio.gather(pool.decode(CRASH_MAGIC + b"x", SAMPLING, LIMITS, 30.0),
                                    pool.decode(clip, SAMPLING, LIMITS, 30.0), return_exceptions=True)

    crashed, ok = run(loop, both())
    assert isinstance(crashed, DecoderCrashed) and "crashed on this clip" in str(crashed)
    assert status_for(crashed)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert torch.equal(model_input(ok[0]), decode_clip(clip, SAMPLING, LIMITS))
    for _ in range(3):  # the replacement serves (the survivor may take some of these)
        run(loop, pool.decode(clip, SAMPLING, LIMITS, 30.0))
    run(loop, wait_for_async(lambda: pool._free.qsize() == 2, "both workers free again", 30))
    now = {w.proc.pid for w in pool._all}
    assert len(now) == 2 and len(now - pids) == 1
    assert shm_blocks(pool) == []


def test_out_of_memory_in_a_worker_is_resource_exhausted():
    pool = ProcessDecodePool(1)  # not started: only the reply mapping is used
    with pytest.raises(DecoderOutOfMemory) as e:
        pool._result(object(), ("oom", "frames"), pool.shm_prefix + "none")
    assert status_for(e.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert pool._free.get_nowait() is not None  # the worker was fine: back in the free queue


def test_cancelled_requests_leak_no_worker_and_no_shm(loop, pool, clip):
    async def cancel_some():
        tasks = [asyncio.ensure_future(pool.decode(clip, SAMPLING, LIMITS, 30.0)) for _ in range(5)]
        await asyncio.sleep(0.05)  # two are mid-decode, three wait for a worker
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_for_async(lambda: pool._free.qsize() == 2 and not pool._tasks, "both workers free, no task left", 30)

    run(loop, cancel_some())
    assert shm_blocks(pool) == [] and len(pool._all) == 2
    got, _ = run(loop, pool.decode(clip, SAMPLING, LIMITS, 30.0))
    assert torch.equal(model_input(got), decode_clip(clip, SAMPLING, LIMITS))


def test_hung_decode_is_killed_at_the_timeout_and_close_is_prompt(loop, clip, monkeypatch):
    monkeypatch.setenv(TEST_HOOK_ENV, "hang-on-magic")
    pool = ProcessDecodePool(1)
    run(loop, pool.start())
    try:
        t0 = time.monotonic()
        with pytest.raises(DecodeTimeout, match="took longer than 0.5 s"):
            run(loop, pool.decode(HANG_MAGIC, SAMPLING, LIMITS, 0.5))
        assert time.monotonic() - t0 < 2.0
        # the replacement worker serves the next clip; the request deadline gives DEADLINE_EXCEEDED
        got, _ = run(loop, pool.decode(clip, SAMPLING, LIMITS, 30.0))
        assert torch.equal(model_input(got), decode_clip(clip, SAMPLING, LIMITS))
        with pytest.raises(DeadlineExpired):
            run(loop, pool.decode(HANG_MAGIC, SAMPLING, LIMITS, 30.0, deadline=time.monotonic() + 0.3))
        run(loop, wait_for_async(lambda: pool._free.qsize() == 1, "the worker free again", 30))

        async def close_while_hung():
            task = asyncio.ensure_future(pool.decode(HANG_MAGIC, SAMPLING, LIMITS, 30.0))
            await wait_for_async(lambda: pool._free.qsize() == 0, "the worker to take the hanging clip")
            t1 = time.monotonic()
            pool.close()
            with pytest.raises(Draining, match="shutting down"):
                await task
            return time.monotonic() - t1

        assert run(loop, close_while_hung()) < 2.0
        assert all(not w.proc.is_alive() for w in pool._all) and shm_blocks(pool) == []
    finally:
        pool.close()


# --- over a real server -------------------------------------------------------------------------------


@pytest.mark.integration
def test_server_process_backend_survives_crashing_and_hanging_clips(tmp_path: Path, clip):
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--decode-backend", "process", "--decode-workers", "1", "--decode-timeout-s", "1",
                       "--no-warmup", env={TEST_HOOK_ENV: "crash-on-magic,hang-on-magic"}) as srv:
        stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))

        def classify(data: bytes, timeout: float = 30):
            return stub.Classify(pb.ClassifyRequest(task="alpha", clip=data), timeout=timeout)

        assert classify(clip).predictions
        for bad, timeout, code, says in [
            (CRASH_MAGIC, 30, grpc.StatusCode.INVALID_ARGUMENT, "crashed on this clip"),
            (HANG_MAGIC, 30, grpc.StatusCode.INVALID_ARGUMENT, "took longer than 1 s"),
            (HANG_MAGIC, 0.5, grpc.StatusCode.DEADLINE_EXCEEDED, ""),  # the request deadline is the tighter bound
        ]:
            with pytest.raises(grpc.RpcError) as e:
                classify(bad, timeout)
            assert e.value.code() == code and says in (e.value.details() or ""), (e.value.code(), e.value.details())
            assert classify(clip).predictions  # the one worker was replaced and serves again


def test_the_pool_bench_runs():
    from bench.decode_pool import main

    result = main(["--clips", "4", "--size", "64x48", "--workers", "1"])
    (row,) = result["rows"]
    assert row["thread_clips_per_s"] > 0 and row["process_clips_per_s"] > 0


def test_the_pool_bench_measures_shared_memory_per_clip():
    from bench.decode_pool import main

    result = main(["--shm-bytes", "--size", "64x48"])
    for row in result["shm"]:
        assert row["float32_bytes_per_clip"] == 4 * row["shm_bytes_per_clip"]
