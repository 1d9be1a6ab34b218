"""What Kubernetes and OIP clients rely on, against the real server: probes and the repository extension's tokens.

- The probes of deploy/ (HTTP ``/v2/health/{live,ready}``; gRPC health for the image's HEALTHCHECK) answer 200 /
  SERVING within the manifest's ``timeoutSeconds`` while the server is saturated and refusing work
  (RESOURCE_EXHAUSTED): a busy pod is neither restarted nor taken out of the endpoints. (Health during a drain is
  tested in test_http.py and test_server_integration.py.)
- The OIP repository extension (index, load, unload) behind the admin token, with tritonclient over gRPC and over
  HTTP: no token and a wrong token are UNAUTHENTICATED (HTTP 401), a server with no admin token configured answers
  PERMISSION_DENIED (403), a refused unload leaves the task served, the right token succeeds.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import media
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from serverproc import SHARED_TASKS, ServerProcess, make_repository
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration
TOKEN = "probe-test-admin-token"
DEPLOYMENT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "deployment.yaml"


def probe_timeouts() -> dict[str, int]:
    """``timeoutSeconds`` of each probe of the Deployment's server container."""
    [container] = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["containers"]
    return {name: container[name]["timeoutSeconds"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}


def get(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def gauge(srv, name: str) -> float:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name), 0.0)


def infer(client, model: str, clip: bytes, **kw):
    x = client_module(client).InferInput("CLIP", [1], "BYTES")
    x.set_data_from_numpy(np.array([clip], dtype=np.object_))
    return client.infer(model, [x], **kw)


def client_module(client):
    return tgrpc if isinstance(client, tgrpc.InferenceServerClient) else thttp


def code(e: InferenceServerException) -> str:
    """The gRPC code name (tritonclient.grpc: 'StatusCode.X') or the HTTP status ('401') of a tritonclient error."""
    return (e.status() or "").rsplit(".", 1)[-1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    return media.make_clip(tmp_path_factory.mktemp("probe-clip") / "c.mp4", num_frames=10).read_bytes()


# --- probes while saturated -----------------------------------------------------------------------------------


def test_probes_answer_in_time_while_the_queue_is_full(tmp_path, clip):
    timeouts = probe_timeouts()
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--max-queue-size", "1", "--max-queue-delay-ms", "3000", "--max-batch-size", "64",
                       "--poll-interval-s", "0", env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        client = tgrpc.InferenceServerClient(srv.address)
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(out=infer(client, "alpha", clip, client_timeout=60)))
        t.start()
        end = time.monotonic() + 20
        while gauge(srv, "stadapter_queue_depth") < 1:  # admitted, waiting 3 s in the batcher for company
            assert time.monotonic() < end, "the first request never reached the queue"
            time.sleep(0.05)
        with pytest.raises(InferenceServerException) as refused:
            infer(client, "beta", clip, client_timeout=30)
        assert code(refused.value) == "RESOURCE_EXHAUSTED", refused.value.message()
        for probe, path in (("livenessProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready")):
            t0 = time.monotonic()
            assert get(srv.http_url + path, timeouts[probe]) == 200, f"{path} while the queue is full"
            assert time.monotonic() - t0 < timeouts[probe]
        assert gauge(srv, "stadapter_queue_depth") >= 1, "the queue emptied before the probes were checked"
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.address))
        check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeouts["livenessProbe"])
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        t.join(60)
        assert first["out"].as_numpy("SCORES").shape == (1, 3)
        assert infer(client, "beta", clip, client_timeout=30).as_numpy("SCORES").shape == (1, 4)  # room again
        client.close()


# --- the repository extension's tokens, on both protocols -----------------------------------------------------

# each protocol unloads a task of its own, so the two runs do not depend on their order
TASK_OF = {"grpc": "gamma", "http": "delta"}
TASKS = (("alpha", 3), ("beta", 4), ("gamma", 2), ("delta", 2))
REFUSED = {"grpc": ("UNAUTHENTICATED", "PERMISSION_DENIED"), "http": ("401", "403")}
BAD_HEADERS = {
    "no token": (None, "need 'authorization: Bearer <token>'"),
    "wrong token": ("Bearer not-the-token", "the admin bearer token is not valid"),
    "another scheme": (f"Basic {TOKEN}", "the admin bearer token is not valid"),
}
PROTOCOLS = ["grpc", "http"]


def repository_calls(task: str) -> dict:
    return {"index": lambda c, h: c.get_model_repository_index(headers=h),
            "load": lambda c, h: c.load_model(task, headers=h),
            "unload": lambda c, h: c.unload_model(task, headers=h)}


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("probe-auth") / "repo", tasks=TASKS)
    with ServerProcess(repo, "--poll-interval-s", "0", "--no-warmup", env={"STADAPTER_ADMIN_TOKEN": TOKEN}) as srv:
        yield srv


@pytest.fixture(scope="module")
def no_admin_server(shared_server):
    """The session's shared server: it has no admin token, and these tasks."""
    assert SHARED_TASKS == TASKS
    return shared_server


def client_of(srv, protocol: str):
    """(tritonclient for ``protocol``, the name its auth header goes by)."""
    if protocol == "grpc":
        return tgrpc.InferenceServerClient(srv.address), "authorization"
    return thttp.InferenceServerClient(srv.http_url.removeprefix("http://")), "Authorization"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repository_extension_refuses_a_missing_or_wrong_token(admin_server, protocol):
    client, key = client_of(admin_server, protocol)
    task = TASK_OF[protocol]
    for call_name, call in repository_calls(task).items():
        for case, (value, text) in BAD_HEADERS.items():
            with pytest.raises(InferenceServerException) as e:
                call(client, {key: value} if value is not None else None)
            assert code(e.value) == REFUSED[protocol][0], (call_name, case, str(e.value))
            assert text in e.value.message(), (call_name, case, e.value.message())
    assert client.is_model_ready(task), "a refused unload must leave the task served"
    assert (admin_server.repository / "tasks" / task / "1").is_dir(), "a refused unload must leave its files"
    client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repository_extension_with_the_token(admin_server, clip, protocol):
    client, key = client_of(admin_server, protocol)
    task, auth = TASK_OF[protocol], {key: f"Bearer {TOKEN}"}
    index = client.get_model_repository_index(headers=auth)
    names = [m.name for m in index.models] if protocol == "grpc" else [m["name"] for m in index]
    assert {"alpha", "beta", task} <= set(names), names
    client.load_model(task, headers=auth)  # served: load succeeds
    assert client.is_model_ready(task)
    client.unload_model(task, headers=auth)
    assert not client.is_model_ready(task)
    assert not (admin_server.repository / "tasks" / task).exists(), "unload unregisters: the files go"
    with pytest.raises(InferenceServerException) as e:
        client.load_model("nope", headers=auth)
    assert code(e.value) == {"grpc": "NOT_FOUND", "http": "404"}[protocol], str(e.value)
    assert infer(client, "alpha", clip).as_numpy("SCORES").shape == (1, 3)  # still serving
    client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repository_extension_is_disabled_without_an_admin_token(no_admin_server, protocol):
    client, key = client_of(no_admin_server, protocol)
    task = TASK_OF[protocol]
    for call_name, call in repository_calls(task).items():
        with pytest.raises(InferenceServerException) as e:
            call(client, {key: f"Bearer {TOKEN}"})
        assert code(e.value) == REFUSED[protocol][1], (call_name, str(e.value))
        assert "no admin token is configured" in e.value.message(), e.value.message()
    assert client.is_model_ready(task)
    client.close()
