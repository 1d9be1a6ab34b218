"""Client pieces that need no inference server: request building, retries, deadlines, metadata, loadgen math.

Retries and deadlines run against a small in-process gRPC fake of ``VideoClassifier``.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from clients import Client, ClientError, RetryPolicy
from clients.core import (
    ClassifyResult,
    Prediction,
    classify_chunks,
    read_bundle_files,
    read_clip,
    register_chunks,
    sampling_overrides,
)
from clients.loadgen import LoadConfig, is_loopback, percentile, run_load
from clients.output import one_line, render_classify
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_sdk_cli_loadgen_and_demo_do_not_import_torch():
    code = ("import sys, clients, clients.cli, clients.loadgen, server.demo, server.process; "
            "bad = [m for m in ('torch', 'av', 'numpy', 'stadapter') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# --- requests ------------------------------------------------------------------------------------


def test_classify_chunks_reassemble_and_only_the_first_carries_the_header():
    data = bytes(random.Random(0).randrange(256) for _ in range(10_000))
    chunks = classify_chunks("motion", data, 3, {"num_frames": 8, "temporal_views": 2}, 4096, "rid")
    assert [len(c.data) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(c.data for c in chunks) == data
    first = chunks[0]
    assert (first.task, first.top_k, first.request_id) == ("motion", 3, "rid")
    assert first.sampling.num_frames == 8 and first.sampling.temporal_views == 2
    assert not first.sampling.HasField("stride")
    assert all(c.task == "" and not c.HasField("sampling") for c in chunks[1:])


def test_sampling_overrides_refuse_unknown_fields():
    assert sampling_overrides(None) is None
    assert sampling_overrides({"mode": "stride", "stride": None}).HasField("mode")
    with pytest.raises(ClientError, match="unknown sampling override") as e:
        sampling_overrides({"frames": 8})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.local


def test_read_clip_errors_name_the_file(tmp_path):
    with pytest.raises(ClientError, match="cannot read clip .*missing.mp4"):
        read_clip(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ClientError, match="empty"):
        read_clip(tmp_path / "empty.mp4")
    assert read_clip(bytearray(b"abc")) == b"abc"


def test_bundle_upload_needs_both_files_and_streams_them(tmp_path):
    with pytest.raises(ClientError, match="does not exist"):
        read_bundle_files(tmp_path / "nope")
    (tmp_path / "task.json").write_text("{}")
    with pytest.raises(ClientError, match="adapter.safetensors"):
        read_bundle_files(tmp_path)
    (tmp_path / "adapter.safetensors").write_bytes(b"x" * 2500)
    files = read_bundle_files(tmp_path)
    chunks = list(register_chunks(files, 1000))
    assert [(c.filename, len(c.data)) for c in chunks] == [
        ("task.json", 2), ("adapter.safetensors", 1000), ("adapter.safetensors", 1000), ("adapter.safetensors", 500)]


# --- retry policy --------------------------------------------------------------------------------


def test_retry_policy_retries_only_unavailable_and_bounds_backoff():
    p = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=0.25)
    assert p.should_retry(grpc.StatusCode.UNAVAILABLE, 1) and p.should_retry(grpc.StatusCode.UNAVAILABLE, 2)
    assert not p.should_retry(grpc.StatusCode.UNAVAILABLE, 3)
    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert not p.should_retry(code, 1)
    rng = random.Random(0)
    waits = [[p.backoff(a, rng) for _ in range(200)] for a in (1, 2, 3, 4)]
    assert all(0 <= w <= 0.1 for w in waits[0]) and max(waits[0]) > 0.05  # jittered up to the cap
    assert all(0 <= w <= 0.2 for w in waits[1])
    assert all(0 <= w <= 0.25 for w in waits[2] + waits[3])  # capped
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


# --- against an in-process fake server -----------------------------------------------------------


class _Fake(pb_grpc.VideoClassifierServicer):
    def __init__(self):
        self.calls = 0
        self.fail_first = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.sleep = 0.0
        self.metadata: list[tuple] = []
        self.lock = threading.Lock()

    def ListTasks(self, request, context):
        with self.lock:
            self.calls += 1
            n = self.calls
        self.metadata.append(tuple(context.invocation_metadata()))
        time.sleep(self.sleep)
        if n <= self.fail_first:
            context.abort(self.code, f"fake failure {n}")
        return pb.ListTasksResponse(trunk_model="fake", trunk_fingerprint="f" * 64)


@pytest.fixture()
def fake():
    servicer = _Fake()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_VideoClassifierServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_unavailable_is_retried_then_succeeds_and_token_is_sent(fake):
    servicer, address = fake
    servicer.fail_first = 2
    with Client(address, token="s3cret", retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as c:
        assert c.list_tasks().trunk_model == "fake"
    assert servicer.calls == 3
    assert all(("authorization", "Bearer s3cret") in md for md in servicer.metadata)


def test_retries_are_bounded(fake):
    servicer, address = fake
    servicer.fail_first = 100
    with Client(address, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as c:
        with pytest.raises(ClientError) as e:
            c.list_tasks()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "fake failure 3" in e.value.message
    assert servicer.calls == 3


def test_other_codes_are_not_retried(fake):
    servicer, address = fake
    servicer.fail_first, servicer.code = 100, grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(address, retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.01)) as c:
        with pytest.raises(ClientError) as e:
            c.list_tasks()
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and servicer.calls == 1


def test_deadline_is_enforced(fake):
    servicer, address = fake
    servicer.sleep = 1.0
    with Client(address) as c:
        t = time.monotonic()
        with pytest.raises(ClientError) as e:
            c.list_tasks(timeout=0.2)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t < 0.9


# --- CLI rendering and loadgen helpers -----------------------------------------------------------


def test_error_lines_are_single_lines_with_hints():
    down = ClientError(grpc.StatusCode.UNAVAILABLE, "failed to connect\n to all addresses")
    assert one_line(down, "127.0.0.1:1") == (
        "cannot reach the server at 127.0.0.1:1 (UNAVAILABLE): failed to connect to all addresses")
    assert "--token-file" in one_line(ClientError(grpc.StatusCode.UNAUTHENTICATED, "bad token"))
    assert one_line(ClientError(grpc.StatusCode.NOT_FOUND, "unknown task 'x'")) == "NOT_FOUND: unknown task 'x'"


def test_classify_table_and_json():
    r = ClassifyResult("motion", 2, (Prediction("left", 0.9, 0), Prediction("up", 0.1, 2)), {"total_ms": 12.5}, "id")
    err = ClientError(grpc.StatusCode.INVALID_ARGUMENT, "bad clip")
    text = render_classify([("a.mp4", r), ("b.mp4", err)], as_json=False).splitlines()
    assert text[0].split() == ["CLIP", "TASK", "VERSION", "TOP-1", "SCORE", "NEXT", "MS"]
    assert text[1].split() == ["a.mp4", "motion", "2", "left", "0.900", "up", "0.100", "12.5"]
    assert "INVALID_ARGUMENT" in text[2]
    import json

    out = json.loads(render_classify([("a.mp4", r), ("b.mp4", err)], as_json=True))
    assert out[0]["predictions"][0] == {"label": "left", "score": 0.9, "index": 0}
    assert out[1]["error"] == {"code": "INVALID_ARGUMENT", "message": "bad clip"}


def test_loadgen_is_loopback_only_unless_allowed_and_bounded(tmp_path):
    assert is_loopback("127.0.0.1:50051") and is_loopback("localhost:1") and is_loopback("[::1]:5")
    assert not is_loopback("10.0.0.2:50051") and not is_loopback("example.com:443")
    base = dict(tasks=("a",), clips=(tmp_path / "c.mp4",), concurrency=1, requests=1)
    with pytest.raises(ValueError, match="--allow-remote"):
        LoadConfig(address="10.0.0.2:50051", **base)
    LoadConfig(address="10.0.0.2:50051", allow_remote=True, **base)
    with pytest.raises(ValueError, match="exactly one of --concurrency"):
        LoadConfig(address="127.0.0.1:1", rate=5.0, **base)
    with pytest.raises(ValueError, match="--duration must be"):
        LoadConfig(address="127.0.0.1:1", tasks=("a",), clips=base["clips"], concurrency=1, duration_s=1e9)


@pytest.mark.parametrize("rate, duration, starts", [(20.0, 0.5, 10), (10.0, 0.3, 3), (7.0, 0.3, 3), (3.0, 1.0, 3)])
def test_open_loop_starts_rate_times_duration_requests(tmp_path, rate, duration, starts):
    """Start i happens at i / rate; summing the intervals instead (10 x 0.05 s < 0.5 s) started one too many."""
    with socket.socket() as s:  # a free port with nobody listening: each request fails fast with UNAVAILABLE
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "c.mp4").write_bytes(b"clip")
    cfg = LoadConfig(address=address, tasks=("a",), clips=(tmp_path / "c.mp4",), rate=rate, duration_s=duration,
                     timeout_s=2.0)
    summary = asyncio.run(run_load(cfg))
    assert summary["requests"] == starts and summary["ok"] == 0, summary


def test_percentile_nearest_rank():
    v = list(range(1, 101))
    assert (percentile(v, 50), percentile(v, 90), percentile(v, 99), percentile(v, 100)) == (50, 90, 99, 100)
    assert percentile([7.0], 99) == 7.0
