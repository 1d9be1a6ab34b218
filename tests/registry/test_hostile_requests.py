"""Hostile task.json files and names over a real server: INVALID_ARGUMENT / NOT_FOUND with short messages,
nothing left on disk, and the server still serving."""

from __future__ import annotations

import json

import grpc
import media
import pytest
from factories import make_bundle
from serverproc import ServerProcess, make_repository, wait_for

from stadapter import load_trunk
from stadapter.bundle import BundleError, read_spec
from stadapter.config import ConfigError, TaskSpec
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

TOKEN = "hostile-admin-token"
ADMIN_MD = (("authorization", f"Bearer {TOKEN}"),)


def _chunks(task_json: bytes, adapter: bytes):
    yield pb.RegisterTaskChunk(filename="task.json", data=task_json)
    yield pb.RegisterTaskChunk(filename="adapter.safetensors", data=adapter)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    repo = make_repository(root / "repo")
    src = make_bundle(load_trunk(repo / "trunk"), root / "src", name="gamma")
    return repo, json.loads((src / "task.json").read_text()), (src / "adapter.safetensors").read_bytes()


@pytest.fixture(scope="module")
def srv(bundle):
    """One server for the module's tests over gRPC: none of them registers a task (each hostile upload is refused,
    each cancelled one leaves nothing), and the admin token and --max-batch-size 8 are what they need."""
    repo, _, _ = bundle
    with ServerProcess(repo, "--max-batch-size", "8", env={"STADAPTER_ADMIN_TOKEN": TOKEN}) as s:
        yield s


def _spec_errors(tmp_path, text: str) -> str:
    (tmp_path / "task.json").write_text(text)
    with pytest.raises(BundleError) as e:
        read_spec(tmp_path)
    return str(e.value)


def test_malformed_task_json_is_a_bundle_error(tmp_path, bundle):
    _, spec, _ = bundle
    assert "too deeply" in _spec_errors(tmp_path, "[" * 100_000 + "]" * 100_000)
    huge = json.dumps({**spec, "version": 1}).replace('"version": 1', '"version": ' + "9" * 5000)
    message = _spec_errors(tmp_path, huge)
    assert "not valid JSON" in message and len(message) < 400


def test_task_names_must_match_whole_and_errors_quote_them_briefly(bundle):
    _, spec, _ = bundle
    with pytest.raises(ConfigError, match="is invalid"):
        TaskSpec.from_dict({**spec, "name": "evil\n"})
    with pytest.raises(ConfigError) as e:
        TaskSpec.from_dict({**spec, "name": "x" * 20_000})
    assert len(str(e.value)) < 300


@pytest.mark.integration
def test_hostile_registrations_and_names_over_grpc(bundle, srv):
    repo, spec, adapter = bundle
    channel = grpc.insecure_channel(srv.address)
    admin, clf = pb_grpc.TaskAdminStub(channel), pb_grpc.VideoClassifierStub(channel)
    bodies = {
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "huge-int": json.dumps(spec).replace('"version": 1', '"version": ' + "9" * 5000).encode(),
        "newline-name": json.dumps({**spec, "name": "evil\n"}).encode(),
    }
    for what, body in bodies.items():
        with pytest.raises(grpc.RpcError) as e:
            admin.RegisterTask(_chunks(body, adapter), metadata=ADMIN_MD, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e.value.details())
        assert len(e.value.details()) < 1000, what
    with pytest.raises(grpc.RpcError) as e:
        clf.Classify(pb.ClassifyRequest(task="x" * 20_000, clip=media.make_clip(None, 8)), timeout=30)
    # no task can have that name: INVALID_ARGUMENT saying the name rule (issue 22; NOT_FOUND before)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(e.value.details()) < 1000
    assert sorted(p.name for p in (repo / "tasks").iterdir()) == ["alpha", "beta"]
    ok = clf.Classify(pb.ClassifyRequest(task="alpha", clip=media.make_clip(None, 8), top_k=1), timeout=30)
    assert len(ok.predictions) == 1
    channel.close()


def _uploads(repo) -> list[str]:
    return [p.name for p in (repo / "tasks").iterdir() if p.name.startswith(".upload-")]


def _written(repo) -> set[str]:
    """The files in the repository's upload folders."""
    return {f.name for u in _uploads(repo) for f in (repo / "tasks" / u).iterdir()}


@pytest.mark.integration
def test_a_cancelled_upload_leaves_no_folder(bundle, srv):
    import threading
    import time

    repo, spec, adapter = bundle
    channel = grpc.insecure_channel(srv.address)
    admin = pb_grpc.TaskAdminStub(channel)
    for _ in range(3):
        release = threading.Event()

        def chunks(release=release):
            yield pb.RegisterTaskChunk(filename="task.json", data=json.dumps(spec).encode())
            yield pb.RegisterTaskChunk(filename="adapter.safetensors", data=adapter[:1000])
            release.wait(10)  # the client hangs up before sending the rest

        call = admin.RegisterTask.future(chunks(), metadata=ADMIN_MD, timeout=30)
        wait_for(lambda: _uploads(repo), "the server to start the upload", 10)
        # both chunks taken in: each of the bundle's files is open in the upload folder
        wait_for(lambda: _written(repo) >= {"task.json", "adapter.safetensors"}, "the first chunks to be written", 10)
        call.cancel()
        release.set()
        deadline = time.monotonic() + 10
        while _uploads(repo) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [sorted(p.name for p in (repo / "tasks" / u).iterdir()) for u in _uploads(repo)]
        assert not left, f"a cancelled upload left its folder behind: {left}\n{srv.log()[-3000:]}"
    listing = pb_grpc.VideoClassifierStub(channel).ListTasks(pb.ListTasksRequest(), timeout=5)
    assert {t.name for t in listing.tasks} == {"alpha", "beta"}
    channel.close()


def test_the_sweeper_removes_idle_leftovers_only(bundle, tmp_path):
    import os
    import shutil
    import time

    from server.registry.registry import LEFTOVER_IDLE_S, TaskRegistry

    repo_src, _, _ = bundle
    repo = tmp_path / "repo"
    shutil.copytree(repo_src, repo)
    old, fresh = repo / "tasks" / ".upload-old", repo / "tasks" / ".upload-fresh"
    for d in (old, fresh):
        d.mkdir()
        (d / "task.json").write_text("{}")
    past = time.time() - LEFTOVER_IDLE_S - 60
    for p in (old / "task.json", old):
        os.utime(p, (past, past))
    os.utime(fresh, (past, past))  # an old folder whose file is still being written is in use
    registry = TaskRegistry(repo, load_trunk(repo / "trunk"))
    registry.sync()
    assert not old.exists() and fresh.exists()
    assert set(registry.tasks) == {"alpha", "beta"}


@pytest.mark.integration
def test_one_request_cannot_fill_a_forward(srv):
    """temporal_views=1024, num_frames=1 put 1,024 rows in one forward despite --max-batch-size 32."""
    channel = grpc.insecure_channel(srv.address)
    clf = pb_grpc.VideoClassifierStub(channel)
    clip = media.make_clip(None, 16)
    for views in (1024, 9):
        request = pb.ClassifyRequest(task="alpha", clip=clip, sampling=pb.SamplingOverrides(
            temporal_views=views, num_frames=1))
        with pytest.raises(grpc.RpcError) as e:
            clf.Classify(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-batch-size of 8" in e.value.details()
    fits = pb.ClassifyRequest(task="alpha", clip=clip, top_k=1,
                              sampling=pb.SamplingOverrides(temporal_views=8, num_frames=1))
    assert len(clf.Classify(fits, timeout=30).predictions) == 1
    channel.close()
