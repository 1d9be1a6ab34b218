"""ClassifyLive from a URL the client opens (clients.live_remux): its video remuxed on the client's side, never
decoded, and sent as MPEG-TS bytes; the server takes bytes only and never opens a URL.

No internet: the sources are local, an HLS playlist made by ffmpeg served over HTTP from this process, and
ffmpeg pushing a stream at real time (``-re``) over TCP to the client, which listens.
"""

from __future__ import annotations

import functools
import http.server
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import grpc
import pytest
import test_live_grpc as live
from serverproc import ServerProcess
from test_live_grpc import ARGS, REPO, key, muxed

from clients import Client, ClientError, LiveURL
from clients.live_remux import is_url, remuxed_chunks
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
h264 = live.h264  # the fixture: a 12 s clip moving left, then right
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def srv():
    if not (REPO / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    with ServerProcess(REPO, *ARGS, "--max-live-streams", "2", "--live-idle-s", "5") as s:
        yield s


class Served:
    """A folder served over HTTP on 127.0.0.1 (port 0), counting the requests it gets."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: list[str] = []
        served = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                served.paths.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hls(h264, tmp_path):
    folder = tmp_path / "hls"
    folder.mkdir()
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(h264), "-c", "copy", "-f", "hls", "-hls_time", "2",
                    "-hls_list_size", "0", "-hls_playlist_type", "vod", str(folder / "index.m3u8")], check=True,
                   timeout=60)
    served = Served(folder)
    yield served
    served.close()


def test_urls_are_told_from_files():
    assert all(is_url(u) for u in ("rtsp://cam/1", "SRT://h:9000", "https://h/i.m3u8", "udp://127.0.0.1:5000",
                                   "tcp://127.0.0.1:9?listen=1", "rtmp://h/app"))
    assert not any(is_url(u) for u in ("clip.ts", "/data/rtsp.ts", "file:///tmp/x.ts", Path("rtsp://x"), b"rtsp://"))


def test_only_the_video_stream_is_carried_packet_for_packet(h264, tmp_path):
    with_audio = tmp_path / "av.mkv"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(h264), "-f", "lavfi", "-i", "sine=d=12", "-c:v", "copy",
                    "-c:a", "aac", "-shortest", str(with_audio)], check=True, timeout=60)
    data = b"".join(remuxed_chunks(LiveURL(str(with_audio))))
    assert data[0] == 0x47  # MPEG-TS
    with av.open(str(h264)) as src, av.open(io.BytesIO(data)) as out:
        assert len(out.streams) == 1 and out.streams.video[0].codec_context.name == "h264"
        want = [(p.pts, p.is_keyframe) for p in src.demux(src.streams.video[0]) if p.size]
        got = [(p.pts, p.is_keyframe) for p in out.demux(out.streams.video[0]) if p.size]
        assert len(got) == len(want) == 96 and [k for _, k in got] == [k for _, k in want]
        src.seek(0)
        out.seek(0)
        a = [f.to_ndarray(format="rgb24") for f in src.decode(video=0)]
        b = [f.to_ndarray(format="rgb24") for f in out.decode(video=0)]
    assert len(a) == len(b) == 96 and all((x == y).all() for x, y in zip(a, b, strict=True))  # copied, not encoded again


def test_an_hls_playlist_over_http_gives_the_windows_of_classify_windows(srv, h264, hls):
    with Client(srv.address) as c:
        whole = list(c.windows(muxed(h264, "mpegts"), "motion", 2.0, 1.0))
        got = list(c.live(f"{hls.url}/index.m3u8", "motion", 2.0, 1.0))
    assert [key(w) for w in got] == [key(w) for w in whole]
    assert len(got) == 11 and got[0].top.label == "left" and got[-1].top.label == "right"
    assert "/index.m3u8" in hls.paths and any(p.endswith(".ts") for p in hls.paths)  # read by the client


def test_a_codec_mpeg_ts_cannot_carry_goes_in_matroska(srv, h264, tmp_path):
    webm = tmp_path / "lr.webm"
    webm.write_bytes(muxed(h264, "webm"))  # VP8
    chunks = list(remuxed_chunks(LiveURL(str(webm))))
    assert chunks[0][:4] == bytes.fromhex("1a45dfa3") and len(chunks) == 97  # EBML; the header, then a packet each
    with Client(srv.address) as c:
        got = list(c.live(LiveURL(str(webm)), "motion", 2.0, 1.0))
        whole = list(c.windows(webm.read_bytes(), "motion", 2.0, 1.0))
    assert [key(w) for w in got] == [key(w) for w in whole] and len(got) == 11


def test_a_stream_pushed_at_real_time_over_tcp(srv, h264):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = threading.Event()

    def push() -> None:  # ffmpeg connects once the client listens: retried until it does
        while not stop.is_set():
            r = subprocess.run(["ffmpeg", "-loglevel", "quiet", "-re", "-i", str(h264), "-c", "copy", "-f", "mpegts",
                                f"tcp://127.0.0.1:{port}"], timeout=60)
            if r.returncode == 0:
                return
            time.sleep(0.2)

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    t0 = time.monotonic()
    try:
        with Client(srv.address) as c:
            got = [(w, time.monotonic() - t0) for w in c.live(f"tcp://127.0.0.1:{port}?listen=1", "motion", 2.0, 2.0)]
            whole = list(c.windows(muxed(h264, "mpegts"), "motion", 2.0, 2.0))
    finally:
        stop.set()
        pusher.join(60)
    assert [key(w) for w, _ in got] == [key(w) for w in whole]
    assert got[0][1] < got[-1][1] - 6  # the windows came as the stream played (12 s), not all at its end


def test_a_source_that_cannot_be_opened_fails_in_the_client(srv, tmp_path):
    with Client(srv.address) as c:
        for source, says in ((LiveURL("http://127.0.0.1:9/none.m3u8", open_timeout_s=5), "cannot open the live source"),
                             ("udp://127.0.0.1:9?timeout=500000", "cannot open the live source"),
                             (tmp_path / "missing.ts", "cannot read")):
            with pytest.raises(ClientError) as e:
                list(c.live(source, "motion", 2.0, 1.0))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and says in e.value.message, e.value.message
            assert e.value.local  # said by the client, not the server's error


def test_a_source_that_fails_mid_way_ends_with_its_error_after_the_windows_answered(srv, h264):
    data = muxed(h264, "mpegts")

    def camera():
        yield data[: len(data) // 2]
        raise OSError("the camera went away")

    got = []
    with pytest.raises(ClientError) as e:
        for w in Client(srv.address).live(camera(), "motion", 2.0, 1.0):
            got.append(w.index)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.local
    assert "the live source failed: the camera went away" in e.value.message
    assert got == list(range(len(got))) and len(got) >= 3  # what the first half held was answered


def test_the_cli_reads_a_url_and_says_why_one_cannot_be_opened(srv, hls, tmp_path):
    cmd = [sys.executable, "-m", "clients", "live", "--address", srv.address, "--task", "motion", "--window-s", "2",
           "--json"]
    ok = subprocess.run([*cmd, f"{hls.url}/index.m3u8"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 6
    playlist = tmp_path / "local.m3u8"  # a playlist file: opened with PyAV on request, its segments over HTTP
    playlist.write_text((hls.folder / "index.m3u8").read_text()
                        .replace("index", f"{hls.url}/index"))
    flagged = subprocess.run([*cmd, "--open-with-pyav", "--input-option", "protocol_whitelist=file,http,tcp",
                              str(playlist)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert flagged.returncode == 0, flagged.stderr
    assert len(flagged.stdout.splitlines()) == 6
    for source, says in (("rtsp://127.0.0.1:9/cam", "cannot open the live source rtsp://127.0.0.1:9/cam"),
                         (str(tmp_path / "missing.ts"), "cannot read")):
        bad = subprocess.run([*cmd, "--open-timeout-s", "5", source], capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
        assert bad.returncode == 1 and bad.stdout == ""
        assert bad.stderr.startswith("error: ") and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    bad_option = subprocess.run([*cmd, "--input-option", "novalue", "x"], capture_output=True, text=True, timeout=60,
                                cwd=ROOT)
    assert bad_option.returncode == 2 and "KEY=VALUE" in bad_option.stderr


def test_the_server_never_opens_a_url(srv, hls, h264):
    """What a client sends is bytes, read from a file object: a playlist (whose segments are URLs) or a URL sent
    as the stream is refused, and nothing is fetched."""
    stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
    playlist = (f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{hls.url}/index0.ts\n"
                f"#EXTINF:2.0,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n").encode()
    before = len(hls.paths)
    for data in (playlist, f"{hls.url}/index.m3u8".encode(), b"rtsp://127.0.0.1:9/cam"):
        first = pb.LiveChunk(task="motion", window_s=2, stride_s=1, data=data)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ClassifyLive(iter([first]), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert len(hls.paths) == before  # the server fetched nothing
    assert len(list(Client(srv.address).live(muxed(h264, "mpegts"), "motion", 2.0, 2.0))) == 6
