"""Each served version's residency over a real server, the same in every place that lists tasks: ``ListTasks`` and
``DescribeTask`` (``TaskInfo.residency``), the CLI's ``tasks`` table, and OIP's repository index (REST: a
``residency`` field tritonclient.http hands back as it is; gRPC: the entry's ``reason``, parsed by
tritonclient.grpc; the state stays ``READY``). A task is ``disk`` until its first request, ``device`` after it (its
weights in an adapter slot), and ``disk`` again once a tiny host budget and one device slot let another task take
its place; a pinned task is ``host`` before any request."""

from __future__ import annotations

import grpc
import media
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from serverproc import ServerProcess, make_repository

from clients import cli
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

ONE_SLOT = "12000"  # --cache-bytes for one device slot of the tiny tasks (tests/server/test_host_tiers.py)


@pytest.fixture(scope="module")
def clip():
    return media.make_clip(num_frames=12)


def everywhere(srv) -> dict[str, set[str]]:
    """Each task's residency as every listing tells it (one value per task when they agree)."""
    clf = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
    seen: dict[str, set[str]] = {}
    for t in clf.ListTasks(pb.ListTasksRequest(), timeout=30).tasks:
        seen.setdefault(t.name, set()).add(t.residency)
        seen[t.name].add(clf.DescribeTask(pb.DescribeTaskRequest(task=t.name), timeout=30).residency)
    rest = thttp.InferenceServerClient(srv.http_url.removeprefix("http://"))
    try:
        for m in rest.get_model_repository_index():
            assert m["state"] == "READY", m
            seen[m["name"]].add(m["residency"])
    finally:
        rest.close()
    with tgrpc.InferenceServerClient(srv.address) as triton:
        index = triton.get_model_repository_index()
        for m in index.models:
            assert m.state == "READY" and m.reason.startswith("residency="), m
            seen[m.name].add(m.reason.removeprefix("residency="))
        as_json = triton.get_model_repository_index(as_json=True)  # tritonclient's JSON form carries it too
        assert {m["name"]: m["reason"] for m in as_json["models"]} == {m.name: m.reason for m in index.models}
    return seen


def classify(srv, task: str, clip: bytes) -> None:
    clf = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
    assert clf.Classify(pb.ClassifyRequest(task=task, clip=clip), timeout=60).task == task


def test_residency_is_disk_before_the_first_request_device_after_and_disk_after_eviction(tmp_path, clip, capsys):
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--host-cache-bytes", "1", "--cache-bytes", ONE_SLOT, "--allow-insecure-admin",
                       "--max-queue-delay-ms", "20", env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        assert everywhere(srv) == {"alpha": {"disk"}, "beta": {"disk"}}  # the warm-up ran stand-ins: nothing read
        classify(srv, "alpha", clip)
        assert everywhere(srv) == {"alpha": {"device"}, "beta": {"disk"}}
        classify(srv, "beta", clip)  # takes the one slot; the host budget holds nothing idle
        assert everywhere(srv) == {"alpha": {"disk"}, "beta": {"device"}}
        assert cli.main(["tasks", "--address", srv.address]) == 0
        out = capsys.readouterr().out
        header, *rows = [line.split() for line in out.splitlines()[1:] if line.strip() and not line.startswith("-")]
        col = header.index("RESIDENCY")
        assert {r[0]: r[col] for r in rows} == {"alpha": "disk", "beta": "device"}, out


def test_a_pinned_task_is_host_resident_before_any_request(tmp_path, clip):
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--pin-tasks", "beta", "--no-warmup", "--allow-insecure-admin",
                       env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        assert everywhere(srv) == {"alpha": {"disk"}, "beta": {"host"}}
        classify(srv, "beta", clip)
        assert everywhere(srv)["beta"] == {"device"}
