"""Task names from clients: one rule, checked at the registry's door, and nothing on disk for a name that is not a task.

A name reached paths unchecked: UnregisterTask of ``../../../pwned`` made an empty file three folders above
``tasks/`` (the lock path was built from it), ``../trunk`` made ``tasks/trunk``, and a 300-character name,
``motion/../shapes`` or ``x/y`` answered INTERNAL. Every bad name is now INVALID_ARGUMENT (HTTP 400) naming the
rule, over every entry point, before any file is made. Also here: a task folder that is a symlink is unregistered
by removing the link only, and the lock and high-water files stay bounded however many names come and go.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import grpc
import media
import pytest
from factories import make_bundle
from http_calls import request
from serverproc import ServerProcess, make_repository
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from server.errors import BadRequest, TaskNotFound, status_for
from server.registry.folders import HIGH_WATER_DIR, LOCKS_DIR
from server.registry.marks import FLOOR_FILE, LOCK_SHARDS, TaskMarks
from server.registry.registry import TaskRegistry
from stadapter.config import TASK_NAME_RULE, ConfigError, TaskSpec
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

TOKEN = "names-admin-token"
ADMIN_MD = (("authorization", f"Bearer {TOKEN}"),)
AUTH = {"Authorization": f"Bearer {TOKEN}"}

BAD_NAMES = ["../../../pwned", "../trunk", "x" * 300, "motion/../shapes", "x/y", "", ".hidden", "a\0b", "..", "Alpha"]
BAD_PINS = ["alpha@", "alpha@-1"]
PIN_RULE = "a pin is name@N"


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (files, folders, links), relative."""
    return {str(Path(d, n).relative_to(root)) for d, dirs, files in os.walk(root) for n in dirs + files}


def upload(reg: TaskRegistry, source: Path, name: str):
    """Register ``source``'s bundle under ``name``."""
    up = reg.new_upload_dir()
    shutil.copy(source / "adapter.safetensors", up)
    spec = json.loads((source / "task.json").read_text())
    (up / "task.json").write_text(json.dumps({**spec, "name": name}))
    return reg.register_upload(up)


@pytest.fixture()
def nested_repo(tiny_trunk, tiny_trunk_dir, tmp_path) -> Path:
    """A repository three folders below ``tmp_path``: ``../../../x`` from ``tasks/.locks`` is still inside it."""
    repo = tmp_path / "a" / "b" / "repo"
    shutil.copytree(tiny_trunk_dir, repo / "trunk")
    make_bundle(tiny_trunk, repo / "tasks" / "alpha" / "1", name="alpha", seed=1)
    return repo


# --- the registry: every door ----------------------------------------------------------------------------------


def test_task_spec_and_the_registry_share_one_rule(tiny_trunk, nested_repo):
    with pytest.raises(ConfigError, match="is invalid: use " + TASK_NAME_RULE):
        TaskSpec.from_dict({**json.loads((nested_repo / "tasks/alpha/1/task.json").read_text()), "name": "x/y"})
    reg = TaskRegistry(nested_repo, tiny_trunk)
    reg.sync()
    with pytest.raises(BadRequest, match="is invalid: use " + TASK_NAME_RULE):
        reg.get("x/y")


@pytest.mark.parametrize("name", BAD_NAMES + BAD_PINS)
def test_a_bad_name_is_invalid_argument_at_every_registry_door_and_touches_no_file(tiny_trunk, nested_repo, tmp_path,
                                                                                    name):
    reg = TaskRegistry(nested_repo, tiny_trunk)
    reg.sync()
    before = tree(tmp_path)
    for door in (reg.get, reg.acquire, reg.unregister):
        with pytest.raises(BadRequest) as e:
            door(name)
        code, message = status_for(e.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (door.__name__, message)
        assert (PIN_RULE if name in BAD_PINS else TASK_NAME_RULE) in message and len(message) < 300, message
    import asyncio

    asyncio.run(reg.preload(name))  # leaves the error to get; makes nothing
    assert tree(tmp_path) == before
    assert reg.get("alpha").version == 1 and reg.unregister("alpha") == ("alpha", 1)  # still serving, then unserving


def test_unregistering_a_name_that_is_not_served_makes_no_file(tiny_trunk, nested_repo, tmp_path):
    reg = TaskRegistry(nested_repo, tiny_trunk)
    reg.sync()
    before = tree(tmp_path)
    for task in ("nope", "nope@2", "trunk"):
        with pytest.raises(TaskNotFound):
            reg.unregister(task)
    assert tree(tmp_path) == before


# --- a task folder that is a symlink -----------------------------------------------------------------------------


def test_unregistering_a_symlinked_task_removes_the_link_and_keeps_its_target(tiny_trunk, nested_repo, tmp_path):
    target = tmp_path / "elsewhere" / "gamma"
    make_bundle(tiny_trunk, target / "1", name="gamma", seed=3)
    (nested_repo / "tasks" / "gamma").symlink_to(target, target_is_directory=True)
    reg = TaskRegistry(nested_repo, tiny_trunk)
    reg.sync()
    assert reg.get("gamma").version == 1
    kept = tree(target)
    reg.unregister("gamma")
    tombs = lambda: [p.name for p in (nested_repo / "tasks").iterdir() if p.name.startswith(".deleted-")]  # noqa: E731
    deadline = time.monotonic() + 10
    while tombs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not tombs(), "the tombstoned link was never removed"
    assert tree(target) == kept, "the link's target was touched"
    assert "gamma" not in TaskRegistry(nested_repo, tiny_trunk).scan()


def test_the_sweeper_removes_leftover_links_without_entering_them(tiny_trunk, nested_repo, tmp_path):
    target = tmp_path / "elsewhere" / "delta"
    make_bundle(tiny_trunk, target / "1", name="delta", seed=4)
    tasks = nested_repo / "tasks"
    (tasks / ".deleted-delta-0badc0de").symlink_to(target, target_is_directory=True)  # a delete cut short by an exit
    (tasks / ".deleted-gone-0badc0de").symlink_to(tmp_path / "no-such-folder")  # dangling
    (tasks / ".upload-0badc0de").write_bytes(b"a file, not a folder")
    kept = tree(target)
    TaskRegistry(nested_repo, tiny_trunk).cleanup_temp(idle_s=-1)
    assert sorted(p.name for p in tasks.iterdir()) == ["alpha"]
    assert tree(target) == kept


# --- bounded lock and high-water files ---------------------------------------------------------------------------


def test_lock_and_mark_files_stay_bounded_and_versions_are_still_never_reused(tiny_trunk, nested_repo):
    """Every name ever registered left a lock file and a high-water file behind."""
    reg = TaskRegistry(nested_repo, tiny_trunk, keep_versions=1)
    reg.sync()
    source = nested_repo / "tasks" / "alpha" / "1"
    cycles, kept = LOCK_SHARDS + 6, 4
    first = {}
    for i in range(cycles):
        name = f"t{i:03d}"
        first[name] = upload(reg, source, name).version
        upload(reg, source, name)  # version 2
        reg.unregister(name)
    reg.cleanup_temp(marks_kept=kept)
    tasks = nested_repo / "tasks"
    locks = sorted(p.name for p in (tasks / LOCKS_DIR).iterdir())
    marks = sorted(p.name for p in (tasks / HIGH_WATER_DIR).iterdir())
    assert len(locks) <= LOCK_SHARDS + 1, f"{len(locks)} lock files after {cycles} names"
    assert not set(locks) & set(first), "lock files are named after tasks"
    assert len(marks) == kept + 1 and FLOOR_FILE in marks, marks
    assert set(marks) - {FLOOR_FILE} <= set(first)
    assert {p.name for p in tasks.iterdir() if not p.name.startswith(".deleted-")} == {HIGH_WATER_DIR, LOCKS_DIR, "alpha"}
    folded, marked = sorted(set(first) - set(marks)), sorted(set(marks) - {FLOOR_FILE})
    for name in (folded[0], marked[0]):
        assert upload(reg, source, name).version == 3, name  # 1 and 2 were given before the unregister
    restarted = TaskRegistry(nested_repo, tiny_trunk)
    restarted.sync()
    assert upload(restarted, source, folded[1]).version == 3


def test_the_sweep_skips_a_name_being_changed_and_never_lowers_the_floor(tmp_path):
    tasks = tmp_path / "tasks"
    (tasks / HIGH_WATER_DIR).mkdir(parents=True)
    (tasks / HIGH_WATER_DIR / FLOOR_FILE).write_text("9\n")
    for i, mark in enumerate((3, 12, 5)):
        (tasks / HIGH_WATER_DIR / f"n{i}").write_text(f"{mark}\n")
    (tasks / "n2").mkdir()  # n2 has a task folder: its mark is not retired
    marks = TaskMarks(tasks)
    with marks.lock("n1"):  # a register of n1 under way (the sweep's flock is another open file: it conflicts)
        assert marks.sweep(keep=0) == 1
    assert sorted(p.name for p in (tasks / HIGH_WATER_DIR).iterdir()) == [FLOOR_FILE, "n1", "n2"]
    assert marks.high_water("n0") == 9 and marks.high_water("brand-new") == 9  # n0's 3 did not lower the floor
    assert marks.sweep(keep=0) == 1 and marks.high_water("n1") == 12 and marks.high_water("n2") == 5


# --- over a real server: gRPC, OIP gRPC, HTTP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    repo = make_repository(root / "a" / "b" / "repo")
    with ServerProcess(repo, "--http-port", "0", "--poll-interval-s", "0", "--no-warmup",
                       env={"STADAPTER_ADMIN_TOKEN": TOKEN}) as server:
        server.root = root
        yield server


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> bytes:
    return media.make_clip(tmp_path_factory.mktemp("names-clip") / "c.mp4", num_frames=8).read_bytes()


def grpc_calls(channel: grpc.Channel, name: str, clip: bytes) -> dict:
    admin, clf = pb_grpc.TaskAdminStub(channel), pb_grpc.VideoClassifierStub(channel)
    oipc = oip_grpc.GRPCInferenceServiceStub(channel)
    return {
        "UnregisterTask": lambda: admin.UnregisterTask(pb.UnregisterTaskRequest(task=name), metadata=ADMIN_MD, timeout=30),
        "DescribeTask": lambda: clf.DescribeTask(pb.DescribeTaskRequest(task=name), timeout=30),
        "Classify": lambda: clf.Classify(pb.ClassifyRequest(task=name, clip=clip), timeout=30),
        "RepositoryModelLoad": lambda: oipc.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=name),
                                                                metadata=ADMIN_MD, timeout=30),
        "RepositoryModelUnload": lambda: oipc.RepositoryModelUnload(
            oip.RepositoryModelUnloadRequest(model_name=name), metadata=ADMIN_MD, timeout=30),
        "ModelMetadata": lambda: oipc.ModelMetadata(oip.ModelMetadataRequest(name=name), timeout=30),
    }


def http_calls(srv, name: str, clip: bytes) -> dict:
    from http_calls import form

    quoted = urllib.parse.quote(name, safe="")
    body, headers = form({}, clip)
    return {
        "unload": lambda: request(f"{srv.http_url}/v2/repository/models/{quoted}/unload", b"", AUTH, "POST"),
        "load": lambda: request(f"{srv.http_url}/v2/repository/models/{quoted}/load", b"", AUTH, "POST"),
        "metadata": lambda: request(f"{srv.http_url}/v2/models/{quoted}"),
        "classify": lambda: request(f"{srv.http_url}/v1/tasks/{quoted}:classify", body, headers),
    }


@pytest.mark.integration
def test_bad_names_over_every_protocol_are_refused_and_nothing_lands_on_disk(srv, clip):
    before = tree(srv.root)
    channel = grpc.insecure_channel(srv.address)
    for name in BAD_NAMES + BAD_PINS:
        rule = PIN_RULE if name in BAD_PINS else TASK_NAME_RULE
        for call_name, call in grpc_calls(channel, name, clip).items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name[:20], call_name, e.value.details())
            said = e.value.details()
            assert (rule in said or (not name and "names no" in said)) and len(said) < 300, (call_name, said)
        if not name:
            continue  # an empty path segment names no route
        for call_name, call in http_calls(srv, name, clip).items():
            status, _, out = call()
            message = json.loads(out)["error"]
            assert status == 400 and rule in message and len(message) < 300, (name[:20], call_name, status, message)
    assert tree(srv.root) == before
    assert "Traceback" not in srv.log() and "internal error" not in srv.log()
    ok = pb_grpc.VideoClassifierStub(channel).Classify(pb.ClassifyRequest(task="alpha", clip=clip, top_k=1), timeout=30)
    assert ok.task == "alpha" and len(ok.predictions) == 1
    channel.close()
