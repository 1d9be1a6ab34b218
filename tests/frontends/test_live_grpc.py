"""ClassifyLive over the real server: a live stream in, one result per window out as the stream goes on.

The demo task ``motion`` (left / right / up / down) on a 12 s clip whose shape moves left for 6 s, then right,
re-encoded as H.264 and muxed into each container that can be read as it grows.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import media
import pytest
from serverproc import ServerProcess, metric, scrape, wait_for

from clients import AsyncClient, Client, ClientError
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2] / "model_repository"
MUX = {
    "mpegts": ["-c", "copy", "-f", "mpegts"],
    "matroska": ["-c", "copy", "-f", "matroska"],
    "webm": ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "1M", "-f", "webm"],
    "fmp4": ["-c", "copy", "-f", "mp4", "-movflags", "frag_keyframe+empty_moov"],
    "flv": ["-c", "copy", "-f", "flv"],
}
ARGS = ("--poll-interval-s", "0", "--max-batch-size", "8", "--decode-workers", "1")


@pytest.fixture(scope="module")
def h264(tmp_path_factory) -> Path:
    """12 s at 8 fps, 64 px: three 2 s segments moving left, then three moving right; H.264 in MP4."""
    folder = tmp_path_factory.mktemp("live")
    media.motion_video(folder / "src.mp4", ("left",) * 3 + ("right",) * 3)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(folder / "src.mp4"), "-c:v", "libx264", "-preset",
                    "ultrafast", "-g", "16", str(folder / "lr.mp4")], check=True, timeout=60)
    return folder / "lr.mp4"


def muxed(h264: Path, fmt: str) -> bytes:
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(h264), *MUX[fmt], "-"], capture_output=True,
                          check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def srv():
    if not (REPO / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    with ServerProcess(REPO, *ARGS, "--max-live-streams", "2", "--live-idle-s", "2",
                       "--max-live-chunk-bytes", "200000") as s:
        s.stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(s.address))
        yield s


def chunks_of(data: bytes, n: int = 4096) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


def served(srv, data: bytes) -> None:
    """The server still answers a good live stream."""
    assert len(list(Client(srv.address).live(data, "motion", 2.0, 2.0))) == 6


def key(w) -> tuple:
    return w.index, w.start_s, w.end_s, w.start_frame, w.end_frame, w.top.label


def children(pid: int) -> set[int]:
    """``pid``'s live processes and theirs: the clip workers, the live decoders' fork server and the decoders."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry))
    return out | {d for c in out for d in children(c)}


@pytest.mark.parametrize("fmt", sorted(MUX))
def test_each_container_gives_the_windows_of_classify_windows(srv, h264, fmt):
    data = muxed(h264, fmt)
    before = scrape(srv.metrics_url)
    with Client(srv.address) as c:
        whole = list(c.windows(data, "motion", 2.0, 1.0))
        t0 = time.time_ns()
        got = list(c.live(chunks_of(data), "motion", 2.0, 1.0, request_id="live-1"))
        t1 = time.time_ns()
    after = scrape(srv.metrics_url)
    assert [key(w) for w in got] == [key(w) for w in whole]
    assert len(got) == 11 and got[0].top.label == "left" and got[-1].top.label == "right"
    for w in got:
        assert t0 <= w.last_frame_received_unix_ns <= t1 and w.request_id == "live-1"
    count = lambda n, **kw: metric(after, n, **kw) - metric(before, n, **kw)  # noqa: E731
    assert count("stadapter_requests_total", method="ClassifyLive", task="motion", code="OK") == 1
    assert count("stadapter_live_windows_total") == 11
    assert count("stadapter_live_lag_seconds_count") == 11
    assert metric(after, "stadapter_live_streams_open") == 0


def test_several_tasks_share_one_stream(srv, h264):
    data = muxed(h264, "mpegts")
    with Client(srv.address) as c:
        one = list(c.live(data, "motion", 2.0, 2.0))
        both = list(c.live(data, ["motion", "shapes"], 2.0, 2.0, top_k=2))
    assert [w.task for w in both] == ["motion", "shapes"] * 6
    assert [key(w) for w in both if w.task == "motion"] == [key(w) for w in one]
    assert all(len(w.predictions) == 2 for w in both)
    assert "ClassifyLive tasks=motion,shapes code=OK" in srv.log()  # the access log names the stream's tasks


def test_the_async_client_reads_a_file_object(srv, h264, tmp_path):
    flv = tmp_path / "lr.flv"
    flv.write_bytes(muxed(h264, "flv"))

    async def run():
        async with AsyncClient(srv.address) as c:
            with flv.open("rb") as f:
                return [w async for w in c.live(f, "motion", 2.0, 2.0)]

    got = asyncio.run(run())
    assert [key(w) for w in got] == [key(w) for w in Client(srv.address).live(flv, "motion", 2.0, 2.0)]
    assert len(got) == 6


def test_an_mp4_with_its_index_at_the_end_is_refused(srv, h264):
    with pytest.raises(ClientError) as e:
        list(Client(srv.address).live(h264, "motion", 2.0, 1.0))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "moov" in e.value.message and "ClassifyWindows" in e.value.message and "fragmented" in e.value.message
    served(srv, muxed(h264, "mpegts"))


@pytest.mark.parametrize("fmt", ["mpegts", "matroska"])
def test_a_stream_corrupt_mid_way_ends_invalid_argument_after_its_windows(srv, h264, fmt):
    data = muxed(h264, fmt)
    half = len(data) // 2
    got = []
    with pytest.raises(ClientError) as e:
        for w in Client(srv.address).live(data[:half] + media.garbage(400_000) + data[half:], "motion", 2.0, 1.0):
            got.append(w.index)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "corrupt" in e.value.message
    assert got == list(range(len(got))) and len(got) >= 2
    served(srv, data)


def test_bad_first_messages(srv, h264):
    data = muxed(h264, "mpegts")
    cases = [
        (pb.LiveChunk(window_s=2, stride_s=1, data=data), grpc.StatusCode.INVALID_ARGUMENT, "names no task"),
        (pb.LiveChunk(task="nope", window_s=2, stride_s=1, data=data), grpc.StatusCode.NOT_FOUND, "nope"),
        (pb.LiveChunk(task="motion", window_s=1, stride_s=2, data=data), grpc.StatusCode.INVALID_ARGUMENT,
         "longer than window_s"),
        (pb.LiveChunk(task="motion", window_s=2, stride_s=1, data=data[:100_000] * 3), grpc.StatusCode.INVALID_ARGUMENT,
         "--max-live-chunk-bytes"),
    ]
    for first, code, says in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(srv.stub.ClassifyLive(iter([first]), timeout=30))
        assert e.value.code() == code and says in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(srv.stub.ClassifyLive(iter([]), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no chunks" in e.value.details()
    served(srv, data)


class Held:
    """A live call whose client sends the first part of a stream, then waits (a camera still going)."""

    def __init__(self, srv, data: bytes):
        self.gate = threading.Event()

        def messages():
            yield pb.LiveChunk(task="motion", window_s=2, stride_s=1)
            yield pb.LiveChunk(data=data[: len(data) // 3])
            self.gate.wait(30)

        self.call = srv.stub.ClassifyLive(messages(), timeout=60)

    def close(self) -> None:
        self.call.cancel()
        self.gate.set()


def test_a_full_server_refuses_and_a_cancelled_stream_frees_its_decoder(srv, h264):
    data = muxed(h264, "mpegts")
    before = scrape(srv.metrics_url)
    workers = children(srv.proc.pid)
    held = [Held(srv, data), Held(srv, data)]
    try:
        wait_for(lambda: metric(scrape(srv.metrics_url), "stadapter_live_streams_open") == 2, "two live streams")
        live_pids = children(srv.proc.pid) - workers
        assert len(live_pids) == 2  # a decoder process per stream, besides the clip workers
        with pytest.raises(ClientError) as e:
            list(Client(srv.address).live(data, "motion", 2.0, 1.0))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-live-streams" in e.value.message
        assert next(held[0].call).index == 0  # the held streams answer what they have
    finally:
        for h in held:
            h.close()
    wait_for(lambda: metric(scrape(srv.metrics_url), "stadapter_live_streams_open") == 0, "streams closed")
    wait_for(lambda: not (children(srv.proc.pid) & live_pids), "decoder processes gone")
    after = scrape(srv.metrics_url)
    assert metric(after, "stadapter_live_refused_total", reason="full") - \
        metric(before, "stadapter_live_refused_total", reason="full") == 1
    served(srv, data)


def test_an_idle_stream_ends_deadline_exceeded_and_frees_its_decoder(srv, h264):
    data = muxed(h264, "mpegts")
    h = Held(srv, data)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(h.call)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--live-idle-s" in e.value.details()
        assert time.monotonic() - t0 < 20
    finally:
        h.close()
    wait_for(lambda: metric(scrape(srv.metrics_url), "stadapter_live_streams_open") == 0, "stream closed")
    served(srv, data)


def test_the_cli_reads_a_file_and_stdin(srv, h264, tmp_path):
    ts = tmp_path / "lr.ts"
    ts.write_bytes(muxed(h264, "mpegts"))
    cmd = [sys.executable, "-m", "clients", "live", "--address", srv.address, "--task", "motion", "--window-s", "2",
           "--stride-s", "2", "--json"]
    root = Path(__file__).resolve().parents[2]
    # the real-time run takes the clip's length: it runs while the other two do
    realtime = subprocess.Popen([*cmd, "--realtime", str(ts)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=root)
    from_file = subprocess.run([*cmd, str(ts)], capture_output=True, text=True, timeout=120, cwd=root)
    assert from_file.returncode == 0, from_file.stderr
    rows = [json.loads(line) for line in from_file.stdout.splitlines()]
    assert [r["start_s"] for r in rows] == [0, 2, 4, 6, 8, 10]
    assert [r["predictions"][0]["label"] for r in rows][:2] == ["left", "left"]
    assert all(r["last_frame_received_unix_ns"] > 0 for r in rows)
    from_stdin = subprocess.run([*cmd[:-1], "-"], input=ts.read_bytes(), capture_output=True, timeout=120, cwd=root)
    assert from_stdin.returncode == 0, from_stdin.stderr
    lines = from_stdin.stdout.decode().splitlines()
    assert len(lines) == 7 and "LAG" in lines[0] and "motion" in lines[1]
    try:
        realtime_out, realtime_err = realtime.communicate(timeout=120)
    finally:
        realtime.kill()
        realtime.wait()
    assert realtime.returncode == 0, realtime_err
    assert [json.loads(line)["start_s"] for line in realtime_out.splitlines()] == [0, 2, 4, 6, 8, 10]


def test_a_stream_past_max_live_s_ends_and_drain_ends_a_held_stream(h264):
    if not (REPO / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    data = muxed(h264, "mpegts")
    with ServerProcess(REPO, *ARGS, "--max-live-s", "5") as s:
        got = []
        with pytest.raises(ClientError) as e:
            for w in Client(s.address).live(data, "motion", 2.0, 1.0):
                got.append(w.end_s)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "longer than 5 s" in e.value.message
        assert got and max(got) <= 5.0
        s.stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(s.address))
        h = Held(s, data)
        try:
            first = next(h.call)
            assert first.index == 0
            s.proc.send_signal(15)
            with pytest.raises(grpc.RpcError) as e2:
                list(h.call)
            assert e2.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e2.value.details()
        finally:
            h.close()
        assert s.proc.wait(30) == 0


def test_tasks_that_sample_differently_cannot_share_a_stream(tmp_path, h264):
    from factories import TINY_SAMPLING, make_bundle, make_trunk_dir

    from stadapter import load_trunk

    repo = tmp_path / "repo"
    trunk = load_trunk(make_trunk_dir(repo / "trunk"))
    make_bundle(trunk, repo / "tasks" / "four" / "1", name="four")
    make_bundle(trunk, repo / "tasks" / "six" / "1", name="six", sampling=TINY_SAMPLING.replace(num_frames=6), seed=1)
    data = muxed(h264, "mpegts")
    with ServerProcess(repo, *ARGS) as s:
        with pytest.raises(ClientError) as e:
            list(Client(s.address).live(data, ["four", "six"], 2.0, 2.0))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "share its decode" in e.value.message
        assert len(list(Client(s.address).live(data, ["four"], 2.0, 2.0))) == 6
        assert metric(scrape(s.metrics_url), "stadapter_live_streams_open") == 0
