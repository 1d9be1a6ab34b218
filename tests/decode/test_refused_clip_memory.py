"""A refused clip's bytes are freed when its request ends, not when the cycle collector next runs.

A decoder's failure raised from an object that a frame on its own traceback still held (the reply
tuple, a local) made a reference cycle: exception -> traceback -> frames -> the clip. Each refused
megabyte-sized clip then outlived its request until a garbage collection, several of them at once,
freed at random times between new allocations (``python -m bench.refused_rss`` shows the server's
RSS this left behind). These tests run with the cycle collector off: the clip must die by reference
counting alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tracemalloc
import weakref
from pathlib import Path

import grpc
import media
import pytest
from serverproc import make_repository

from server.decode.pool import ProcessDecodePool
from server.decode.window_jobs import WindowJob
from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

SAMPLING = SamplingConfig(num_frames=4, input_size=32, resize=36)
MiB = 1 << 20


class Clip(bytearray):
    """A clip buffer a weak reference can watch."""


@contextlib.contextmanager
def no_cycle_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _refused_whole(pool: ProcessDecodePool, clip: Clip) -> str:
    try:
        await pool.decode(clip, SAMPLING, VideoLimits(), 30.0)
    except VideoError as e:
        return str(e)
    return ""


async def _refused_windows(pool: ProcessDecodePool, clip: Clip) -> str:
    try:
        async with contextlib.aclosing(pool.windows(clip, SAMPLING, VideoLimits(), WindowJob(2.0, 2.0, per_batch=1),
                                                    30.0)) as batches:
            async for _ in batches:
                pass
    except VideoError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("mode", [_refused_whole, _refused_windows], ids=["whole", "windows"])
def test_a_refused_clip_dies_with_its_request(loop, pool, mode):
    with no_cycle_collector():
        clip = Clip(os.urandom(2 * MiB))
        alive = weakref.ref(clip)
        message = loop.run_until_complete(mode(pool, clip))
        del clip
        held = alive() is not None
    assert "not a readable video" in message
    assert not held, "the refused clip outlived its request: a reference cycle holds it until the next gc"


def test_many_refused_megabyte_clips_leave_the_server_serving(shared_server):
    """Refused 2 MiB inputs, whole and streamed: each an INVALID_ARGUMENT that says why, and a valid clip after."""
    srv = shared_server
    with grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 8 * MiB)]) as channel:
        stub = pb_grpc.VideoClassifierStub(channel)
        for i in range(12):
            data = os.urandom(2 * MiB)
            with pytest.raises(grpc.RpcError) as info:
                if i % 2:
                    stub.ClassifyStream(pb.ClassifyChunk(task="alpha" if j == 0 else "", data=data[j:j + (256 << 10)])
                                        for j in range(0, len(data), 256 << 10))
                else:
                    stub.Classify(pb.ClassifyRequest(task="alpha", clip=data))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a readable video" in info.value.details()
        reply = stub.Classify(pb.ClassifyRequest(task="alpha", clip=media.make_clip(num_frames=12)))
        assert reply.predictions
        assert "are mmapped" in srv.log()  # server.malloc_tuning took effect in the server


def test_a_refused_requests_clip_is_freed_when_the_request_ends(tmp_path: Path):
    """Through a real server in this process, with the cycle collector off: after refused 2 MiB clips (whole
    and streamed) the memory Python allocated meanwhile is under two clips (before: every clip, held by the
    cycle gRPC's abort makes through the handler frames)."""
    from server.app import Server
    from server.config import ServerConfig

    repo = make_repository(tmp_path / "repo")
    data = os.urandom(2 * MiB)
    request = pb.ClassifyRequest(task="alpha", clip=data)

    def chunks():
        for j in range(0, len(data), 256 << 10):
            yield pb.ClassifyChunk(task="alpha" if j == 0 else "", data=data[j:j + (256 << 10)])

    async def refused(stub, streamed: bool) -> grpc.StatusCode:
        try:
            await (stub.ClassifyStream(chunks()) if streamed else stub.Classify(request))
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    async def held_after_refusals() -> int:
        cfg = ServerConfig(model_repository=repo, host="127.0.0.1", port=0, metrics_port=0, http_port=-1,
                           decode_workers=1, warmup=False, poll_interval_s=0)
        srv = await Server.start(cfg)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}",
                                                 options=[("grpc.max_send_message_length", 8 * MiB)]) as channel:
                stub = pb_grpc.VideoClassifierStub(channel)
                assert await refused(stub, False) == grpc.StatusCode.INVALID_ARGUMENT  # first calls warm up
                assert await refused(stub, True) == grpc.StatusCode.INVALID_ARGUMENT
                with no_cycle_collector():
                    tracemalloc.start()
                    try:
                        codes = [await refused(stub, i % 2 == 1) for i in range(6)]
                        held, _ = tracemalloc.get_traced_memory()
                    finally:
                        tracemalloc.stop()
                assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 6
                return held
        finally:
            await srv.drain()

    held = asyncio.run(held_after_refusals())
    assert held < 2 * 2 * MiB, f"{held / MiB:.1f} MiB still allocated after 6 refused 2 MiB clips"


_MALLINFO = r"""
import ctypes, sys
from server.malloc_tuning import use_mmap_for_large_buffers
if sys.argv[1] == "tuned":
    assert use_mmap_for_large_buffers()
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(2 << 20))  # a first clip-sized block, freed
block = libc.malloc(2 << 20)  # the next one
print(libc.mallinfo2().hblkhd >= 2 << 20)
libc.free(block)
"""


@pytest.mark.parametrize("mode, mmapped", [("untuned", "False"), ("tuned", "True")])
def test_clip_sized_blocks_stay_mmapped_after_one_is_freed(mode, mmapped):
    """glibc raises its mmap threshold to the size of each mmapped block freed, so the second 2 MiB block comes
    from the heap; the server fixes the threshold (``server.malloc_tuning``), and every such block is mmapped."""
    import ctypes
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _MALLINFO, mode], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == mmapped


def test_the_refused_rss_bench_runs():
    from bench.refused_rss import main

    (r,) = main(["--requests", "4", "--every", "2", "--cases", "streams999"])
    assert r["codes"] == {"INVALID_ARGUMENT": 4}
    assert len(r["samples"]) == 2 and r["server_start_mb"] > 0 and r["workers_start_mb"] > 0
