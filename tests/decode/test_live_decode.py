"""Live streams' decoder processes (server.decode.live_streams): one per stream, bounded, killed when it ends,
and a stream whose windows nobody takes stops taking bytes (backpressure)."""

from __future__ import annotations

import asyncio
import os
import subprocess

import media
import numpy as np
import pytest

from server.decode.live_streams import LiveDecoders, LiveFull
from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits, WindowLimits, decode_windows

CFG = SamplingConfig(num_frames=4, input_size=32, mean=(0, 0, 0), std=(1, 1, 1))


@pytest.fixture(scope="module")
def ts(tmp_path_factory) -> bytes:
    """20 s at 30 fps, 64x48, every frame costly, as MPEG-TS."""
    mp4 = media.make_clip(tmp_path_factory.mktemp("live") / "clip.mp4", num_frames=600, fps=30, gop=30,
                          pattern="texture")
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(mp4), "-c", "copy", "-f", "mpegts", "-"],
                          capture_output=True, check=True, timeout=60).stdout


def chunks_of(data: bytes, n: int = 8192) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def start(decoders: LiveDecoders, window_s: float = 1.0, stride_s: float = 1.0):
    return await decoders.start(CFG, VideoLimits(), WindowLimits(), window_s, stride_s)


def test_a_stream_decoded_in_its_own_process_gives_the_clip_windows(ts):
    async def run():
        decoders = LiveDecoders(1)
        d = await start(decoders)
        pid = d.pid
        assert decoders.open == 1 and alive(pid)

        async def feed():
            for c in chunks_of(ts):
                await d.feed(c)
            await d.end()

        feeding = asyncio.ensure_future(feed())
        got = [w async for w in d.windows()]
        await feeding
        d.close()
        return got, pid, decoders

    got, pid, decoders = asyncio.run(run())
    whole = list(decode_windows(ts, CFG, 1.0, 1.0, as_array=True, normalised=False))
    assert [w.span.index for w in got] == [w.index for w in whole] == list(range(20))
    for a, b in zip(got, whole, strict=True):
        np.testing.assert_array_equal(a.frames.numpy(), b.frames)
        assert a.received_ns > 0
    assert decoders.open == 0
    assert not alive(pid)


def test_streams_are_bounded_and_a_closed_one_frees_its_place_and_process(ts):
    async def run():
        refused: list[str] = []
        decoders = LiveDecoders(1, refused=refused.append)
        first = await start(decoders)
        with pytest.raises(LiveFull, match="--max-live-streams"):
            await start(decoders)
        pid = first.pid
        first.close()
        assert not alive(pid) and decoders.open == 0
        second = await start(decoders)
        second.close()
        off = LiveDecoders(0, refused=refused.append)
        with pytest.raises(LiveFull, match="turned off"):
            await start(off)
        return refused

    assert asyncio.run(run()) == ["full", "disabled"]


def test_a_stream_whose_windows_are_not_taken_stops_taking_bytes(ts):
    async def run():
        decoders = LiveDecoders(1)
        d = await start(decoders, 1.0, 1.0 / 30)  # a window per frame: the first comes early
        chunks = chunks_of(ts, 4096)
        fed = 0
        for c in chunks:
            try:
                await asyncio.wait_for(d.feed(c), 2.0)
            except asyncio.TimeoutError:
                break
            fed += 1
        pid = d.pid
        d.close()
        return fed, len(chunks), pid

    fed, total, pid = asyncio.run(run())
    assert fed < total // 2, (fed, total)  # the pipe filled and the decoder waited for its window to be taken
    assert not alive(pid)


def test_a_corrupt_stream_ends_with_the_decoders_error(ts):
    async def run():
        decoders = LiveDecoders(1)
        d = await start(decoders)
        half = len(ts) // 2

        async def feed():
            for c in chunks_of(ts[:half] + media.garbage(400_000) + ts[half:]):
                await d.feed(c)
            await d.end()

        feeding = asyncio.ensure_future(feed())
        got = []
        try:
            async for w in d.windows():
                got.append(w.span.index)
        finally:
            d.close()
            feeding.cancel()
        return got

    with pytest.raises(VideoError, match="corrupt") as e:
        asyncio.run(run())
    assert "hold no packet" in str(e.value)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_decoders_are_forked_from_one_process_that_imported_pyav_once(ts):
    """A stream's decoder is not a new interpreter that imports PyAV and numpy again at every stream's start: it is
    forked from the decoders' fork server, which imported them once."""

    async def run():
        decoders = LiveDecoders(2)
        decoders.warm()
        a, b = await start(decoders), await start(decoders)
        try:
            parents = {parent_of(a.pid), parent_of(b.pid)}
            assert len(parents) == 1 and os.getpid() not in parents
            server = parents.pop()
            with open(f"/proc/{server}/cmdline", "rb") as f:
                assert b"forkserver" in f.read()
            with open(f"/proc/{server}/maps") as f:
                assert "libavcodec" in f.read()  # PyAV was imported there, before the fork

            async def feed():
                for c in chunks_of(ts)[:20]:
                    await a.feed(c)
                await a.end()

            feeding = asyncio.ensure_future(feed())
            assert len([w async for w in a.windows()]) >= 1  # and a forked decoder decodes
            await feeding
        finally:
            a.close()
            b.close()
        assert not alive(a.pid) and not alive(b.pid) and decoders.open == 0

    asyncio.run(run())
