"""The live page (``GET /live``) in a real headless Chromium (Debian's ``chromium``) against the real server.

Chromium's fake camera plays a y4m file made from the demo's motion clips (4 s of a shape moving left, 4 s up,
4 s right, then again: the file loops); the page records it with MediaRecorder, streams the WebM slices over the
live socket and shows each window's label. The test reads the page's state over the Chrome DevTools protocol
(``--remote-debugging-port``, a WebSocket) and checks the labels come in the clips' order.

``LIVE_PAGE_SCREENSHOT=docs/img/live-page.png`` also saves the page as the docs show it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import media
import pytest
from serverproc import ServerProcess, metric, scrape, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parents[2] / "model_repository"
ORDER = ("left", "up", "right")  # the clips in the y4m, 4 s each
WINDOWS = 6  # windows of 2 s the test waits for: the first 12 s, one play of the file
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def y4m(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("live-page")
    media.motion_video(folder / "src.mp4", [d for d in ORDER for _ in range(2)])
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(folder / "src.mp4"), "-pix_fmt", "yuv420p",
                    str(folder / "camera.y4m")], check=True, timeout=60)
    return folder / "camera.y4m"


@contextlib.contextmanager
def chromium(url: str, y4m: Path, profile: Path):
    """Headless Chromium on ``url`` with ``y4m`` as its camera; yields its DevTools port; killed on leaving."""
    args = [CHROMIUM, "--headless=new", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={y4m}", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--window-size=760,560", "--hide-scrollbars", "--disable-gpu", "--no-first-run", "--mute-audio",
            *(["--no-sandbox"] if os.geteuid() == 0 else []), url]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and port_file.read_text().strip() or proc.poll() is not None,
                 "Chromium's DevTools port", timeout=60)
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        yield int(port_file.read_text().split()[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and its renderer, GPU and utility processes
        proc.wait(30)
        proc.stderr.close()


class DevTools:
    """A minimal Chrome DevTools protocol client on one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive(timeout=30)).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str) -> Any:
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")


async def watch_page(port: int, screenshot: str) -> dict:
    """The page's ``window.live`` once it has shown ``WINDOWS`` windows (or an error, or 120 s passed)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            dt = DevTools(ws)
            stop = time.monotonic() + 120
            state: dict = {}
            while time.monotonic() < stop:
                state = json.loads(await dt.evaluate("JSON.stringify(window.live || {})") or "{}")
                if state.get("error") or len(state.get("results", ())) >= WINDOWS:
                    break
                await asyncio.sleep(0.5)
            state["shown_label"] = await dt.evaluate("document.getElementById('label').textContent")
            if screenshot:
                shot = await dt.call("Page.captureScreenshot", format="png")
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            await dt.evaluate("document.getElementById('stop').click()")  # the last slice, then {"end": true}
            stop = time.monotonic() + 60
            while time.monotonic() < stop and state.get("error") is None and state.get("state") != "ended":
                await asyncio.sleep(0.5)
                state.update(json.loads(await dt.evaluate("JSON.stringify(window.live)")))
            state["status"] = await dt.evaluate("document.getElementById('status').textContent")
            return state


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make chromium installs it)")
def test_the_page_shows_the_motion_labels_in_the_order_of_the_camera_clips(y4m, tmp_path):
    if not (REPO / "tasks" / "motion").is_dir():
        pytest.skip("the demo repository is not built")
    with ServerProcess(REPO, "--poll-interval-s", "0", "--max-batch-size", "8", "--decode-workers", "1") as srv:
        page = f"http://127.0.0.1:{srv.http_port}/live?task=motion&window_s=2&stride_s=2&start=1"
        with chromium(page, y4m, tmp_path / "profile") as port:
            state = asyncio.run(watch_page(port, os.environ.get("LIVE_PAGE_SCREENSHOT", "")))
        assert not state.get("error"), state["error"]
        results = state["results"][:WINDOWS]
        labels = [r["label"] for r in results]
        assert len(labels) == WINDOWS, state
        assert [r["start_s"] for r in results] == [0, 2, 4, 6, 8, 10]
        firsts = [x for i, x in enumerate(labels) if x not in labels[:i]]
        assert firsts == list(ORDER), labels  # each clip's label, in the clips' order
        assert state["shown_label"] in ORDER
        # Stop ended the stream: the server answered its last windows and closed normally
        assert state["state"] == "ended" and state["status"] == "ended (1000)", state
        assert len(state["results"]) >= WINDOWS
        assert metric(scrape(srv.metrics_url), "stadapter_requests_total", method="HTTP ClassifyLive",
                      task="motion", code="OK") == 1
        assert metric(scrape(srv.metrics_url), "stadapter_live_streams_open") == 0
