"""Calls the integration tests make to a real server's HTTP and metrics ports, and what they read back."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
import uuid
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

from server.decode.pool import HANG_MAGIC


def request(url: str, body: Optional[bytes] = None, headers: Optional[dict] = None, method: Optional[str] = None,
            context: Optional[ssl.SSLContext] = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def form(fields: dict[str, str], clip: Optional[bytes], name: str = "clip") -> tuple[bytes, dict]:
    """A multipart/form-data body as curl -F builds it (the test's client side)."""
    boundary = uuid.uuid4().hex
    out = b""
    for k, v in fields.items():
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
    if clip is not None:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"v.mp4\"\r\n"
                f"Content-Type: video/mp4\r\n\r\n").encode() + clip + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def classify(srv, task: str, clip: Optional[bytes], headers: Optional[dict] = None, base: str = "", **fields):
    body, h = form({k: str(v) for k, v in fields.items()}, clip)
    status, _, out = request(f"{base or srv.http_url}/v1/tasks/{task}:classify", body, {**h, **(headers or {})})
    return status, json.loads(out)


def counter(srv, method: str, task: str, code: str) -> float:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "stadapter_requests_total" and s.labels == {"method": method, "task": task, "code": code}:
                return s.value
    return 0.0


def decodes(metrics_url: str) -> float:
    """Clips the server has decoded (``stadapter_decode_seconds``' count)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "stadapter_decode_seconds_count")


def access_lines(srv, request_id: Optional[str] = None, timeout: float = 5.0) -> list[dict]:
    """The server's JSON access lines (for ``request_id``: waits up to ``timeout`` s for one)."""
    end = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith('{"ts"')]
        got = [d for d in lines if d["logger"] == "server.access" and request_id in (None, d["request_id"])]
        if got or request_id is None or time.monotonic() > end:
            return got
        time.sleep(0.05)


def http_call(srv, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None):
    """(status, headers, body) over http.client: header values go out as the bytes given."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    try:
        conn.putrequest(method, path)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def multipart(clip: bytes) -> tuple[bytes, str]:
    b = "b0undary"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n1\r\n--{b}\r\nContent-Disposition: form-data; "
            f"name=\"clip\"; filename=\"v.mp4\"\r\nContent-Type: video/mp4\r\n\r\n").encode() + clip + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


GAUGES = ("stadapter_requests_in_flight", "stadapter_queue_depth", "stadapter_clip_in_flight_bytes")


def gauges(url: str) -> dict[str, float]:
    """The three counters of what requests hold, as the server exposes them (a missing gauge fails)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    got = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name in GAUGES}
    missing = [g for g in GAUGES if g not in got]
    assert not missing, f"/metrics lacks {missing}"
    return got


HANG_CLIP = HANG_MAGIC + b"\0" * 4096
