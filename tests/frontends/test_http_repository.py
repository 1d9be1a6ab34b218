"""HTTP on ``--http-port``, against the real server: OIP's repository extension with tritonclient.http (index, load
re-reading the repository, unload of a task and of one pinned version), aiohttp's own 404 / 405 as JSON errors
that tritonclient.http decodes, the response cache's ``cached`` timing, and the request id of the upload form.
(The admin token on these routes, both protocols: test_probes.py.)
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import media
import pytest
import tritonclient.http as thttp
from factories import make_bundle
from http_calls import classify, counter, form, request
from serverproc import ServerProcess, make_repository
from tritonclient.utils import InferenceServerException

from server.errors import PermissionDenied, Unauthenticated
from server.frontends.auth import Auth
from stadapter import load_trunk

TASKS = (("alpha", 3), ("beta", 4), ("gamma", 2))
HEX_ID = 32  # a generated request id: uuid4().hex


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    return media.make_clip(tmp_path_factory.mktemp("http-repo-clip") / "c.mp4", num_frames=8).read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("http-repo") / "repo", tasks=TASKS)
    with ServerProcess(repo, "--allow-insecure-admin", "--log-format", "json", "--response-cache-bytes", "1000000",
                       "--poll-interval-s", "0", "--no-warmup", env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        yield srv


@pytest.fixture
def client(server):
    c = thttp.InferenceServerClient(server.http_url.removeprefix("http://"))
    yield c
    c.close()


def index(client) -> dict[str, str]:
    models = client.get_model_repository_index()
    assert all(m["state"] == "READY" for m in models), models
    return {m["name"]: m["version"] for m in models}


def access_lines(srv, method: str, timeout: float = 5.0) -> list[dict]:
    """The server's JSON access lines of ``method`` (waits up to ``timeout`` s for one)."""
    end = time.monotonic() + timeout
    while True:
        lines = [json.loads(x) for x in srv.log().splitlines() if x.startswith('{"ts"')]
        got = [d for d in lines if d["logger"] == "server.access" and d["method"] == method]
        if got or time.monotonic() > end:
            return got
        time.sleep(0.05)


def copy_in(srv, name: str, version: int, num_classes: int, seed: int) -> None:
    """A task version made on the server's trunk, moved into its repository in one rename (as a copy-in would)."""
    staging = srv.repository / f".staging-{name}-{version}"
    make_bundle(load_trunk(srv.repository / "trunk"), staging, name=name, version=version, seed=seed,
                labels=[f"{name}-{c}" for c in range(num_classes)])
    os.rename(staging, srv.repository / "tasks" / name / str(version))


# --- the repository extension ---------------------------------------------------------------------------------


def test_index_load_and_unload_with_tritonclient_http(server, client, clip):
    assert index(client) == {"alpha": "1", "beta": "1", "gamma": "1"}
    copy_in(server, "gamma", 2, 2, seed=40)  # --poll-interval-s 0: only a load re-reads the repository
    assert index(client)["gamma"] == "1"
    client.load_model("gamma")
    assert index(client)["gamma"] == "2" and client.get_model_metadata("gamma")["versions"] == ["2"]

    client.unload_model("gamma@2")  # one version: the one before is served again
    assert index(client)["gamma"] == "1" and client.is_model_ready("gamma")
    assert not (server.repository / "tasks" / "gamma" / "2").exists()
    client.unload_model("gamma")
    assert "gamma" not in index(client) and not client.is_model_ready("gamma")
    assert not (server.repository / "tasks" / "gamma").exists()

    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as e:
            call("nope")
        assert e.value.status() == "404" and "unknown task 'nope'" in e.value.message(), e.value
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("alpha@9")
    assert e.value.status() == "404" and "version 9 is not servable; servable versions: [1]" in e.value.message()
    assert index(client) == {"alpha": "1", "beta": "1"}
    status, got = classify(server, "alpha", clip)  # still serving
    assert status == 200 and got["task"] == "alpha"

    assert counter(server, "HTTP RepositoryModelLoad", "_other", "NOT_FOUND") == 1
    assert counter(server, "HTTP RepositoryModelUnload", "alpha", "NOT_FOUND") == 1
    assert counter(server, "HTTP RepositoryIndex", "", "OK") == 6
    [load] = [d for d in access_lines(server, "POST /v2/repository/models/{task}/load") if d["code"] == "OK"]
    assert load["tasks"] == ["gamma"] and load["http_status"] == 200
    unloads = access_lines(server, "POST /v2/repository/models/{task}/unload")
    assert [(d["tasks"], d["code"]) for d in unloads] == [
        (["gamma@2"], "OK"), (["gamma"], "OK"), (["nope"], "NOT_FOUND"), (["alpha@9"], "NOT_FOUND")]


def test_the_repository_routes_answer_their_body_for_curl(server):
    status, _, body = request(server.http_url + "/v2/repository/index", b"", method="POST")
    assert status == 200
    beta = {e["name"]: e for e in json.loads(body)}["beta"]
    assert beta.pop("residency") in ("device", "host", "disk")  # where its weights are (tests/server/test_residency.py)
    assert beta == {"name": "beta", "version": "1", "state": "READY"}
    status, _, body = request(server.http_url + "/v2/repository/models/beta/load", b"{}", method="POST")
    assert status == 200 and json.loads(body) == {"name": "beta", "version": "1", "state": "READY"}


def test_the_header_admin_check():
    Auth(None, allow_insecure_admin=True).check_admin_header(None)
    with pytest.raises(PermissionDenied, match="admin requests are disabled: no admin token is configured.*header"):
        Auth(None).check_admin_header("Bearer t")
    Auth("t").check_admin_header("Bearer t")
    for value, text in ((None, "admin requests need 'authorization: Bearer <token>' header"),
                        ("Bearer u", "the admin bearer token is not valid"), ("Basic t", "not valid")):
        with pytest.raises(Unauthenticated, match=text):
            Auth("t").check_admin_header(value)


# --- aiohttp's own errors as JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, status, text, allow", [
    ("GET", "/no/such/path", 404, "no route for GET /no/such/path; the routes are ", None),
    ("POST", "/v2/repositoryy/index", 404, "/v2/repository/models/{task}/load", None),
    ("GET", "/v2/repository/index", 405, "GET is not allowed on /v2/repository/index; allowed: POST", "POST"),
    ("DELETE", "/v2/health/live", 405, "DELETE is not allowed on /v2/health/live; allowed: GET, HEAD", "GET,HEAD"),
])
def test_unknown_paths_and_methods_answer_json(server, method, path, status, text, allow):
    got, headers, body = request(server.http_url + path, b"" if method == "POST" else None,
                                 headers={"X-Request-Id": f"err-{method}-{status}"}, method=method)
    assert got == status and headers["Content-Type"].startswith("application/json")
    assert text in json.loads(body)["error"]
    assert headers.get("Allow") == allow and headers["X-Request-Id"] == f"err-{method}-{status}"
    assert request(server.http_url + "/v2/health/live")[0] == 200


def test_tritonclient_http_decodes_an_unknown_route(client):
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status()  # GET /v2/systemsharedmemory/status: not served here
    assert e.value.status() == "404" and "no route for GET /v2/systemsharedmemory/status" in e.value.message()
    assert client.is_server_live()


# --- the upload's timings and request id ----------------------------------------------------------------------


def test_a_response_cache_hit_says_cached(server, clip):
    first = classify(server, "beta", clip, top_k=2)[1]
    again = classify(server, "beta", clip, top_k=2)[1]
    assert first["timings"]["cached"] is False and again["timings"]["cached"] is True
    assert again["predictions"] == first["predictions"] and again["timings"]["decode_ms"] == 0


def upload(srv, clip: bytes, fields: dict[str, str], headers: Optional[dict] = None) -> tuple[str, dict]:
    body, h = form(fields, clip)
    status, got_headers, out = request(srv.http_url + "/v1/tasks/alpha:classify", body, {**h, **(headers or {})})
    assert status == 200, out
    return got_headers["X-Request-Id"], json.loads(out)


def test_the_form_request_id_is_logged_and_echoed(server, clip):
    echoed, got = upload(server, clip, {"request_id": "form-id-1"})
    assert echoed == "form-id-1" and got["request_id"] == "form-id-1"
    [line] = [d for d in access_lines(server, "POST /v1/tasks/{task}:classify") if d["request_id"] == "form-id-1"]
    assert line["tasks"] == ["alpha"] and line["code"] == "OK"

    echoed, got = upload(server, clip, {})  # no id: the one generated for the request, in the body and the header
    assert len(echoed) == HEX_ID and got["request_id"] == echoed
    echoed, got = upload(server, clip, {"request_id": "form-id-2"}, {"X-Request-Id": "header-id"})
    assert echoed == "header-id" and got["request_id"] == "form-id-2"  # the client's header names the request
    echoed, got = upload(server, clip, {"request_id": "not a token"})  # not loggable: the header gets a fresh id
    assert len(echoed) == HEX_ID and got["request_id"] == "not a token"
