"""Version pinning in the registry: ``name@N`` serves version N while it is servable.

Servable: the newest ``keep_versions`` stored versions up to the served one. A pin on any
other version is NOT_FOUND and says which are servable; a malformed pin is INVALID_ARGUMENT.
Unregister removes the whole task or one version (the served one: the newest older version
is served instead; numbers are never given again).
"""

from __future__ import annotations

import pytest
from factories import make_bundle

from server.errors import BadRequest, TaskNotFound
from server.registry.registry import TaskRegistry


class Changes:
    def __init__(self):
        self.published: list = []
        self.retired: list = []

    def __call__(self, published, retired):
        self.published += published
        self.retired += retired


def register(reg: TaskRegistry, tiny_trunk, tmp_path, seed: int, name: str = "alpha"):
    src = make_bundle(tiny_trunk, tmp_path / f"src-{name}-{seed}", name=name, seed=seed)
    upload = reg.new_upload_dir()
    for f in src.iterdir():
        (upload / f.name).write_bytes(f.read_bytes())
    return reg.register_upload(upload)


@pytest.fixture()
def reg(two_task_repo, tiny_trunk):
    changes = Changes()
    r = TaskRegistry(two_task_repo, tiny_trunk, keep_versions=2, on_change=changes)
    r.sync()
    r.changes = changes
    return r


def test_a_pin_serves_an_older_servable_version(reg, tiny_trunk, tmp_path):
    v1 = reg.get("alpha")
    v2 = register(reg, tiny_trunk, tmp_path, seed=11)
    assert reg.get("alpha") is v2 and reg.get("alpha@2") is v2
    pinned = reg.acquire("alpha@1")
    pinned.release()
    assert pinned.version == 1 and pinned.spec.name == "alpha" and not pinned.retired
    assert pinned.uid not in (v1.uid, v2.uid)  # loaded again: its own id on the slot bank
    assert reg.get("alpha@1") is pinned  # loaded once, then kept
    assert reg.servable_versions("alpha") == [1, 2]
    assert reg.tasks["alpha"] is v2  # a pin never changes what unpinned requests get


@pytest.mark.parametrize("task, message", [("alpha@3", r"version 3 is not servable; servable versions: \[1\]"),
                                           ("nope@1", "unknown task")])
def test_a_pin_on_a_version_that_is_not_servable_is_not_found(reg, task, message):
    with pytest.raises(TaskNotFound, match=message):
        reg.get(task)


@pytest.mark.parametrize("task", ["alpha@", "alpha@x", "alpha@0", "alpha@-1", "alpha@1@1", "alpha@99999999999"])
def test_a_malformed_pin_is_a_bad_request(reg, task):
    with pytest.raises(BadRequest, match="a pin is name@N"):
        reg.get(task)


def test_a_pruned_version_retires_its_pin(reg, tiny_trunk, tmp_path):
    register(reg, tiny_trunk, tmp_path, seed=11)
    pinned = reg.get("alpha@1")
    register(reg, tiny_trunk, tmp_path, seed=12)  # keep_versions=2: version 1 is pruned
    assert pinned.retired and pinned in reg.changes.retired
    with pytest.raises(TaskNotFound, match=r"servable versions: \[2, 3\]"):
        reg.get("alpha@1")


def test_unregister_the_served_version_serves_the_one_before(reg, tiny_trunk, tmp_path):
    register(reg, tiny_trunk, tmp_path, seed=11)
    pinned = reg.get("alpha@1")
    v2 = reg.get("alpha")
    assert reg.unregister("alpha@2") == ("alpha", 2) and v2.retired
    served = reg.get("alpha")
    assert served.version == 1 and pinned.retired  # now the served version: the pin's copy is not needed
    with pytest.raises(TaskNotFound, match=r"servable versions: \[1\]"):
        reg.get("alpha@2")
    assert register(reg, tiny_trunk, tmp_path, seed=12).version == 3  # numbers are never given again
    assert TaskRegistry(reg.root, tiny_trunk).sync()[0][0].name in ("alpha", "beta")


def test_unregister_an_older_version_keeps_the_served_one(reg, tiny_trunk, tmp_path):
    v2 = register(reg, tiny_trunk, tmp_path, seed=11)
    pinned = reg.get("alpha@1")
    assert reg.unregister("alpha@1") == ("alpha", 1)
    assert pinned.retired and reg.get("alpha") is v2 and not v2.retired
    assert reg.servable_versions("alpha") == [2]
    with pytest.raises(TaskNotFound):
        reg.get("alpha@1")


def test_unregister_an_older_version_not_yet_pinned(reg, tiny_trunk, tmp_path):
    v2 = register(reg, tiny_trunk, tmp_path, seed=11)
    reg.unregister("alpha@1")
    assert reg.get("alpha") is v2 and reg.servable_versions("alpha") == [2]


def test_unregister_the_task_retires_every_pin(reg, tiny_trunk, tmp_path):
    register(reg, tiny_trunk, tmp_path, seed=11)
    pinned = reg.get("alpha@1")
    reg.unregister("alpha")
    assert pinned.retired and "alpha" not in reg.tasks
    with pytest.raises(TaskNotFound, match="unknown task"):
        reg.get("alpha@1")


def test_another_replica_sees_a_removed_served_version(reg, tiny_trunk, tmp_path, two_task_repo):
    register(reg, tiny_trunk, tmp_path, seed=11)
    other = TaskRegistry(two_task_repo, tiny_trunk, keep_versions=2)
    other.sync()
    assert other.get("alpha").version == 2
    reg.unregister("alpha@2")
    other.sync()
    assert other.get("alpha").version == 1


# --- over a real server: gRPC, the CLI ------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned_srv(tmp_path_factory):
    import grpc
    from serverproc import ServerProcess, make_repository

    from stadapter import load_trunk
    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    # gamma: alpha's twin (versions 1 and 2) for the test that unregisters one, so alpha stays as the others need it
    root = make_repository(tmp_path_factory.mktemp("pinning") / "repo", tasks=(("alpha", 3), ("beta", 4), ("gamma", 3)))
    for name in ("alpha", "gamma"):
        make_bundle(load_trunk(root / "trunk"), root / "tasks" / name / "2", name=name, version=2, seed=21,
                    labels=[f"{name}-0", f"{name}-1", f"{name}-2"])
    with ServerProcess(root, "--allow-insecure-admin", "--poll-interval-s", "0", "--no-warmup") as s:
        channel = grpc.insecure_channel(s.address)
        s.stub, s.admin = pb_grpc.VideoClassifierStub(channel), pb_grpc.TaskAdminStub(channel)
        s.root = root
        yield s


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory) -> bytes:
    import media

    return media.make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", num_frames=12).read_bytes()


def offline_scores(root, version: int, clip: bytes) -> list[float]:
    from stadapter import load_classifier
    from stadapter.predict import predict_clip

    clf = load_classifier(root / "trunk", root / "tasks" / "alpha" / str(version))
    return [r["score"] for r in predict_clip(clf, clip, 3)]


def test_pinned_classify_over_grpc_answers_with_that_version(pinned_srv, clip_bytes):
    from stadapter_api.v1 import inference_pb2 as pb

    served = pinned_srv.stub.Classify(pb.ClassifyRequest(task="alpha", clip=clip_bytes, top_k=3), timeout=30)
    pinned = pinned_srv.stub.Classify(pb.ClassifyRequest(task="alpha@1", clip=clip_bytes, top_k=3), timeout=30)
    assert (served.task, served.task_version) == ("alpha", 2)
    assert (pinned.task, pinned.task_version) == ("alpha", 1)
    for resp, version in ((served, 2), (pinned, 1)):
        assert [p.score for p in resp.predictions] == pytest.approx(offline_scores(pinned_srv.root, version, clip_bytes),
                                                                    abs=1e-5)
    both = pinned_srv.stub.Classify(pb.ClassifyRequest(tasks=["alpha", "alpha@1"], clip=clip_bytes), timeout=30)
    assert [r.task_version for r in both.results] == [2, 1]


@pytest.mark.parametrize("task, code, message", [
    ("alpha@7", "NOT_FOUND", "version 7 is not servable; servable versions: [1, 2]"),
    ("alpha@x", "INVALID_ARGUMENT", "a pin is name@N"),
])
def test_a_bad_pin_over_grpc_is_refused_and_the_server_serves_on(pinned_srv, clip_bytes, task, code, message):
    import grpc

    from stadapter_api.v1 import inference_pb2 as pb

    with pytest.raises(grpc.RpcError) as e:
        pinned_srv.stub.Classify(pb.ClassifyRequest(task=task, clip=clip_bytes), timeout=30)
    assert e.value.code().name == code and message in e.value.details()
    assert pinned_srv.stub.Classify(pb.ClassifyRequest(task="alpha@1", clip=clip_bytes), timeout=30).task_version == 1


def test_cli_pins_a_version(pinned_srv, clip_bytes, tmp_path, capsys):
    import json

    from clients import cli

    path = tmp_path / "clip.mp4"
    path.write_bytes(clip_bytes)
    assert cli.main(["classify", str(path), "--task", "alpha@1,alpha", "--json", "--address", pinned_srv.address]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["task_version"]) for r in rows] == [("alpha", 1), ("alpha", 2)]


def test_oip_model_version_pins_over_tritonclient_grpc(pinned_srv, clip_bytes):
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(pinned_srv.address)

    def infer(version: str):
        clip = tc.InferInput("CLIP", [1], "BYTES")
        clip.set_data_from_numpy(np.array([clip_bytes], dtype=object))
        return client.infer("alpha", [clip], model_version=version)

    assert infer("").get_response().model_version == "2"
    pinned = infer("1")
    assert pinned.get_response().model_version == "1"
    scores = sorted(pinned.as_numpy("SCORES")[0].tolist(), reverse=True)[:3]
    assert scores == pytest.approx(offline_scores(pinned_srv.root, 1, clip_bytes), abs=1e-5)
    assert client.is_model_ready("alpha", "1") and client.is_model_ready("alpha", "2")
    assert not client.is_model_ready("alpha", "7")
    with pytest.raises(InferenceServerException, match="not servable"):
        infer("7")


def test_unregister_one_version_over_grpc(pinned_srv, clip_bytes):
    """On gamma, the task of its own in the module's repository (alpha's twin)."""
    import grpc

    from stadapter_api.v1 import inference_pb2 as pb

    stub, admin, root = pinned_srv.stub, pinned_srv.admin, pinned_srv.root
    resp = admin.UnregisterTask(pb.UnregisterTaskRequest(task="gamma@2"), timeout=30)
    assert (resp.task, resp.version) == ("gamma", 2)
    assert stub.Classify(pb.ClassifyRequest(task="gamma", clip=clip_bytes), timeout=30).task_version == 1
    with pytest.raises(grpc.RpcError) as e:
        admin.UnregisterTask(pb.UnregisterTaskRequest(task="gamma@2"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "servable versions: [1]" in e.value.details()
    assert sorted(p.name for p in (root / "tasks" / "gamma").iterdir()) == ["1"]


def test_list_and_describe_show_the_servable_versions(pinned_srv, capsys):
    from clients import Client, cli

    with Client(pinned_srv.address) as c:
        alpha = {t.name: t for t in c.list_tasks().tasks}["alpha"]
        assert (alpha.version, alpha.servable_versions) == (2, (1, 2))
        assert c.describe_task("alpha@1").version == 1 and c.describe_task("alpha@1").servable_versions == (1, 2)
    assert cli.main(["tasks", "--address", pinned_srv.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["TASK", "VERSION", "SERVABLE"]
    assert next(line for line in lines if line.startswith("alpha")).split()[:3] == ["alpha", "2", "1,2"]


def test_http_upload_and_oip_rest_pin_a_version(pinned_srv, clip_bytes):
    from http_calls import classify as http_classify
    from http_calls import request

    status, body = http_classify(pinned_srv, "alpha@1", clip_bytes)
    assert status == 200 and (body["task"], body["task_version"]) == ("alpha", 1)
    status, body = http_classify(pinned_srv, "alpha@1,alpha", clip_bytes)
    assert status == 200 and [r["task_version"] for r in body["results"]] == [1, 2]
    status, body = http_classify(pinned_srv, "alpha@7", clip_bytes)
    assert status == 404 and "servable versions: [1, 2]" in body["error"]
    status, _, _ = request(f"{pinned_srv.http_url}/v2/models/alpha/versions/1/ready")
    assert status == 200
    status, _, _ = request(f"{pinned_srv.http_url}/v2/models/alpha/versions/7/ready")
    assert status == 404  # not servable: NOT_FOUND, as an unknown model


def test_an_older_versions_first_pin_loads_off_the_event_loop(reg, tiny_trunk, tmp_path):
    """The first request pinning alpha@1 reads its bundle on a worker thread, not on the event loop that serves
    every other request; later pins find it loaded; a pin that cannot be served is get()'s NOT_FOUND, as before."""
    import asyncio
    import threading

    register(reg, tiny_trunk, tmp_path, seed=11)
    threads: list[str] = []
    load = reg.load_version

    def recording(path):
        threads.append(threading.current_thread().name)
        return load(path)

    reg.load_version = recording

    async def go():
        loop_thread = threading.current_thread().name
        await reg.preload("alpha@1")
        first = reg.get("alpha@1")
        await reg.preload("alpha@1")  # loaded: nothing read again
        await reg.preload("alpha@2")  # the served version: nothing to load
        await reg.preload("alpha@9")  # not servable: left to get()
        with pytest.raises(TaskNotFound, match="version 9 is not servable"):
            reg.get("alpha@9")
        return loop_thread, first

    loop_thread, first = asyncio.run(go())
    assert first.version == 1 and reg.get("alpha@1") is first
    assert len(threads) == 1 and threads[0] != loop_thread


def test_a_pinned_classify_loads_the_version_off_the_event_loop(reg, tiny_trunk, tmp_path):
    """Through the pipeline (admission, decode, batcher, model): the pinned request's bundle is read off the loop."""
    import asyncio
    import threading

    import media
    import torch

    from server.config import ServerConfig
    from server.engine.batcher import Batcher
    from server.engine.model import ModelRunner
    from server.engine.pipeline import Pipeline
    from server.engine.slots import AdapterSlots

    register(reg, tiny_trunk, tmp_path, seed=11)
    threads: list[str] = []
    load = reg.load_version
    reg.load_version = lambda path: (threads.append(threading.current_thread().name), load(path))[1]
    limits = ServerConfig(model_repository=tmp_path, max_batch_size=4).limits
    clip = media.make_clip(num_frames=12, size=(48, 40))

    async def go():
        batcher = Batcher(ModelRunner(tiny_trunk, AdapterSlots(1 << 20, torch.device("cpu"), torch.float32)), limits, 0.01)
        batcher.start()
        p = Pipeline(reg, batcher, None, limits)
        try:
            async with p.admission.request() as ticket:
                got = await p.classify(ticket, "alpha@1", clip)
            async with p.admission.request() as ticket:
                both = await p.classify_tasks(ticket, ["alpha@1", "alpha"], clip)
            return threading.current_thread().name, got, both
        finally:
            await batcher.close()
            p.close()

    loop_thread, got, both = asyncio.run(go())
    assert got.tv.version == 1 and [o.tv.version for o in both.items] == [1, 2]
    assert len(threads) == 1 and threads[0] != loop_thread
