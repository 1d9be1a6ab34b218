"""ClassifyLive as a WebSocket on the HTTP port (``/v1/tasks/{task}:live``), over the real server, with aiohttp's
client: a WebM stream in binary messages, the ``{"end": true}`` message, one JSON message per window out; every
refusal as one JSON error message and a close; the server serving the next stream after each.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import aiohttp
import media
import pytest
from serverproc import ServerProcess, metric, scrape, wait_for

from clients import Client

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2] / "model_repository"
TOKEN = "live-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHUNK_LIMIT = 200_000


@pytest.fixture(scope="module")
def webm(tmp_path_factory) -> bytes:
    """12 s at 8 fps, 64 px: 6 s of a shape moving left, then 6 s moving right; VP8 in WebM (MediaRecorder's)."""
    folder = tmp_path_factory.mktemp("live-ws")
    media.motion_video(folder / "src.mp4", ("left",) * 3 + ("right",) * 3)
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(folder / "src.mp4"), "-c:v", "libvpx", "-deadline",
                           "realtime", "-cpu-used", "8", "-b:v", "1M", "-g", "16", "-f", "webm", "-"],
                          capture_output=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    if not (REPO / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    token = tmp_path_factory.mktemp("token") / "classify.txt"
    token.write_text(TOKEN)
    with ServerProcess(REPO, "--poll-interval-s", "0", "--max-batch-size", "8", "--decode-workers", "1",
                       "--max-live-streams", "1", "--live-idle-s", "2", "--max-live-chunk-bytes", str(CHUNK_LIMIT),
                       "--classify-token-file", str(token)) as s:
        yield s


@dataclass
class Outcome:
    windows: list[dict] = field(default_factory=list)
    error: Optional[dict] = None
    close: Optional[int] = None


async def stream(url: str, data: bytes = b"", chunk: int = 4096, headers: Optional[dict] = None, end: bool = True,
                 text: Optional[str] = None) -> Outcome:
    """Send ``data`` in binary messages (then ``text``, if any, and the end message unless not ``end``), read
    every answer until the server closes."""
    out = Outcome()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=headers if headers is not None else AUTH, max_msg_size=0) as ws:
            for i in range(0, len(data), chunk):
                await ws.send_bytes(data[i:i + chunk])
            if text is not None:
                await ws.send_str(text)
            if end:
                await ws.send_str(json.dumps({"end": True}))
            async for msg in ws:
                body = json.loads(msg.data)
                if "error" in body:
                    out.error = body["error"]
                else:
                    out.windows.append(body)
            out.close = ws.close_code
    return out


def url(srv, task: str = "motion", query: str = "window_s=2&stride_s=1") -> str:
    return f"ws://127.0.0.1:{srv.http_port}/v1/tasks/{task}:live?{query}"


def key(w) -> tuple:
    if isinstance(w, dict):
        return w["index"], w["start_s"], w["end_s"], w["start_frame"], w["end_frame"], w["predictions"][0]["label"]
    return w.index, w.start_s, w.end_s, w.start_frame, w.end_frame, w.top.label


def served(srv, webm: bytes) -> None:
    """The server still answers a good live stream over the socket."""
    got = asyncio.run(stream(url(srv, query="window_s=2&stride_s=2"), webm))
    assert got.error is None and got.close == 1000 and len(got.windows) == 6


def test_a_webm_stream_gives_the_windows_of_classify_windows(srv, webm):
    before = scrape(srv.metrics_url)
    whole = list(Client(srv.address, token=TOKEN).windows(webm, "motion", 2.0, 1.0))
    t0 = time.time_ns()
    got = asyncio.run(stream(url(srv, query="window_s=2&stride_s=1&request_id=ws-1"), webm))
    t1 = time.time_ns()
    after = scrape(srv.metrics_url)
    assert got.error is None and got.close == 1000
    assert [key(w) for w in got.windows] == [key(w) for w in whole]
    assert len(got.windows) == 11 and key(got.windows[0])[-1] == "left" and key(got.windows[-1])[-1] == "right"
    for w in got.windows:
        assert t0 <= w["last_frame_received_unix_ns"] <= t1 and w["request_id"] == "ws-1" and w["task"] == "motion"
    count = lambda n, **kw: metric(after, n, **kw) - metric(before, n, **kw)  # noqa: E731
    assert count("stadapter_requests_total", method="HTTP ClassifyLive", task="motion", code="OK") == 1
    assert count("stadapter_live_windows_total") == 11
    assert count("stadapter_live_lag_seconds_count") == 11
    assert metric(after, "stadapter_live_streams_open") == 0
    assert "ws-1]: http GET /v1/tasks/{task}:live tasks=motion code=OK status=101" in srv.log()


def test_several_tasks_and_the_task_list(srv, webm):
    got = asyncio.run(stream(url(srv, "motion,shapes", "window_s=2&stride_s=2&top_k=2"), webm))
    assert got.error is None and [w["task"] for w in got.windows] == ["motion", "shapes"] * 6
    assert all(len(w["predictions"]) == 2 for w in got.windows)

    async def tasks(headers):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{srv.http_port}/v1/tasks", headers=headers) as r:
                return r.status, await r.json()

    status, body = asyncio.run(tasks(AUTH))
    assert status == 200 and [t["name"] for t in body["tasks"]] == ["motion", "shapes"]
    assert body["tasks"][0]["labels"] == ["left", "right", "up", "down"]
    assert asyncio.run(tasks({}))[0] == 401

    async def plain_get():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{srv.http_port}/v1/tasks/motion:live", headers=AUTH) as r:
                return r.status, await r.json()

    status, body = asyncio.run(plain_get())
    assert status == 400 and "is a WebSocket" in body["error"]


@pytest.mark.parametrize("task, query, text, code, says, close", [
    ("nope", "window_s=2&stride_s=1", None, "NOT_FOUND", "nope", 1008),
    ("motion", "window_s=2", None, "INVALID_ARGUMENT", "no stride_s", 1008),
    ("motion", "window_s=1&stride_s=2", None, "INVALID_ARGUMENT", "longer than window_s", 1008),
    ("motion", "window_s=2&stride_s=1&colour=red", None, "INVALID_ARGUMENT", "unknown query parameter 'colour'", 1008),
    ("motion", "window_s=2&stride_s=1", "start", "INVALID_ARGUMENT", '{"end": true}', 1008),
])
def test_bad_requests_get_an_error_message_and_a_close(srv, webm, task, query, text, code, says, close):
    got = asyncio.run(stream(url(srv, task, query), webm[:20_000], text=text))
    assert got.error is not None and got.error["code"] == code and says in got.error["message"], got.error
    assert got.close == close
    served(srv, webm)


def test_a_binary_message_over_the_chunk_limit(srv, webm):
    got = asyncio.run(stream(url(srv), webm[:1000] + media.garbage(CHUNK_LIMIT), chunk=CHUNK_LIMIT + 1))
    assert got.error == {"code": "INVALID_ARGUMENT", "status": 400, "message": got.error["message"]}
    assert "--max-live-chunk-bytes of 200000" in got.error["message"]
    assert got.close == 1009  # MESSAGE_TOO_BIG
    served(srv, webm)


def test_tokens(srv, webm):
    for headers, query, says in (({}, "", "need 'authorization: Bearer <token>'"),
                                 ({"Authorization": "Bearer wrong"}, "", "not valid"),
                                 ({}, "&access_token=wrong", "not valid")):
        got = asyncio.run(stream(url(srv, query="window_s=2&stride_s=2" + query), webm, headers=headers))
        assert got.error["code"] == "UNAUTHENTICATED" and says in got.error["message"] and got.close == 1008
        assert not got.windows
    by_query = asyncio.run(stream(url(srv, query=f"window_s=2&stride_s=2&access_token={TOKEN}"), webm, headers={}))
    assert by_query.error is None and len(by_query.windows) == 6


def test_a_full_server_an_idle_stream_and_a_client_that_closes(srv, webm):
    async def run():
        held = asyncio.ensure_future(stream(url(srv), webm[: len(webm) // 3], end=False))
        await asyncio.to_thread(wait_for, lambda: metric(scrape(srv.metrics_url), "stadapter_live_streams_open") == 1,
                                "one live stream")
        full = await stream(url(srv), webm)
        return full, await held  # the held stream never ends its input: --live-idle-s ends it

    full, idle = asyncio.run(run())
    assert full.error["code"] == "RESOURCE_EXHAUSTED" and "--max-live-streams" in full.error["message"]
    assert full.close == 1013  # TRY_AGAIN_LATER
    assert idle.error["code"] == "DEADLINE_EXCEEDED" and "--live-idle-s" in idle.error["message"]
    assert [w["index"] for w in idle.windows] == list(range(len(idle.windows))) and idle.close == 1008

    async def close_early():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url(srv), headers=AUTH) as ws:
                await ws.send_bytes(webm[: len(webm) // 2])
                await ws.receive()  # a first window: the stream runs
                await ws.close()

    before = scrape(srv.metrics_url)
    asyncio.run(close_early())
    wait_for(lambda: metric(scrape(srv.metrics_url), "stadapter_live_streams_open") == 0, "the stream closed")
    after = scrape(srv.metrics_url)
    assert metric(after, "stadapter_requests_total", method="HTTP ClassifyLive", task="motion", code="CANCELLED") - \
        metric(before, "stadapter_requests_total", method="HTTP ClassifyLive", task="motion", code="CANCELLED") == 1
    served(srv, webm)


def test_drain_ends_an_open_stream_unavailable(webm):
    if not (REPO / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    with ServerProcess(REPO, "--poll-interval-s", "0", "--max-batch-size", "8", "--decode-workers", "1") as s:
        async def run():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(url(s), max_msg_size=0) as ws:
                    await ws.send_bytes(webm[: len(webm) // 3])  # and no end: a camera still going
                    first = json.loads((await ws.receive(timeout=30)).data)
                    s.proc.send_signal(15)
                    rest = [json.loads(m.data) async for m in ws]
                    return first, rest, ws.close_code

        first, rest, close = asyncio.run(run())
        assert first["index"] == 0
        assert rest[-1]["error"]["code"] == "UNAVAILABLE" and "draining" in rest[-1]["error"]["message"]
        assert [w["index"] for w in rest[:-1]] == list(range(1, len(rest)))
        assert close == 1001  # GOING_AWAY
        assert s.proc.wait(30) == 0
