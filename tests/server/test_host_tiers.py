"""The disk and host tiers over a real server: start-up reads no weights, a task's are read on its first request
(one read for all the requests that wait for it), a bad bundle fails its own requests with FAILED_PRECONDITION and
nothing else, and ``--host-cache-bytes`` / ``--pin-tasks`` bound and pin what stays in host memory."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import media
import pytest
from factories import make_bundle
from serverproc import ServerProcess, make_repository, metric, scrape

from stadapter import load_trunk
from stadapter.bundle import ADAPTER_FILE
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clip():
    return media.make_clip(num_frames=12)


def stub(srv) -> pb_grpc.VideoClassifierStub:
    return pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))


def loads(srv, result: str = "ok") -> float:
    return metric(scrape(srv.metrics_url), "stadapter_task_loads_total", result=result)


def classify(clf, task: str, clip: bytes) -> pb.ClassifyResponse:
    return clf.Classify(pb.ClassifyRequest(task=task, clip=clip), timeout=60)


def test_start_up_reads_no_weights_and_a_bundle_broken_before_start_fails_only_its_requests(tmp_path, clip):
    repo = make_repository(tmp_path / "repo", tasks=(("alpha", 3), ("beta", 4), ("gamma", 3)))
    (repo / "tasks" / "gamma" / "1" / ADAPTER_FILE).write_bytes(b"\0" * 64)  # broken before the server starts
    with ServerProcess(repo, "--poll-interval-s", "0.2") as srv:  # the warm-up on: it runs stand-ins, reads nothing
        m = scrape(srv.metrics_url)
        assert metric(m, "stadapter_tasks_loaded") == 3 and metric(m, "stadapter_tasks_host_resident") == 0
        assert loads(srv) == 0 and loads(srv, "failed") == 0
        clf = stub(srv)
        assert classify(clf, "alpha", clip).task == "alpha"  # a cold first request
        assert loads(srv) == 1 and metric(scrape(srv.metrics_url), "stadapter_tasks_host_resident") == 1
        with pytest.raises(grpc.RpcError) as e:
            classify(clf, "gamma", clip)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert "task gamma version 1 cannot be served" in e.value.details()
        assert "register the task again" in e.value.details()
        assert loads(srv, "failed") == 1
        assert classify(clf, "beta", clip).task == "beta"  # the next request, another task: served
        assert classify(clf, "alpha", clip).task == "alpha"
        with pytest.raises(grpc.RpcError) as e:  # out of service now, nothing older to serve: it is not found
            classify(clf, "gamma", clip)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "cannot be served" in e.value.details()
        assert loads(srv) == 2 and loads(srv, "failed") == 1  # the bad bundle was read once


def test_concurrent_first_requests_share_one_load(tmp_path, clip):
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--max-queue-delay-ms", "50", "--no-warmup") as srv:
        clf = stub(srv)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: classify(clf, "alpha", clip), range(8)))
        assert {a.task for a in answers} == {"alpha"}
        assert loads(srv) == 1
        m = scrape(srv.metrics_url)
        assert metric(m, "stadapter_task_load_seconds_count") == 1 and metric(m, "stadapter_host_bytes") > 0


def test_a_bundle_broken_after_start_falls_back_to_the_previous_version_and_others_are_served(tmp_path, clip):
    repo = make_repository(tmp_path / "repo")
    make_bundle(load_trunk(repo / "trunk"), repo / "tasks" / "alpha" / "2", name="alpha", version=2, seed=7)
    with ServerProcess(repo, "--no-warmup", "--poll-interval-s", "0.2") as srv:
        clf = stub(srv)
        (repo / "tasks" / "alpha" / "2" / ADAPTER_FILE).write_bytes(b"garbage")  # the disk goes bad after start
        with pytest.raises(grpc.RpcError) as e:
            classify(clf, "alpha", clip)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "alpha version 2" in e.value.details()
        assert classify(clf, "beta", clip).task == "beta"
        again = classify(clf, "alpha", clip)  # the previous good version serves the next request
        assert (again.task, again.task_version) == ("alpha", 1)
        assert loads(srv, "failed") == 1 and loads(srv) == 2


def test_a_loaded_tasks_weights_file_overwritten_in_place_does_not_take_the_server_down(tmp_path, clip):
    """The weights are copied into the server's memory when read: the file was mapped, and overwriting it in place
    killed the server (SIGBUS) on the task's next request."""
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--no-warmup", "--poll-interval-s", "0",
                       "--cache-bytes", "12000") as srv:  # one device slot: alpha is activated again from host memory
        clf = stub(srv)
        first = classify(clf, "alpha", clip)
        assert classify(clf, "beta", clip).task == "beta"  # takes the device slot
        (repo / "tasks" / "alpha" / "1" / ADAPTER_FILE).write_bytes(b"garbage")
        again = classify(clf, "alpha", clip)
        assert [(p.label, p.score) for p in again.predictions] == [(p.label, p.score) for p in first.predictions]
        assert srv.proc.poll() is None and loads(srv) == 2  # alpha came from host memory, not the file


def test_a_tiny_host_budget_evicts_idle_tasks_and_requests_in_flight_finish(tmp_path, clip):
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--host-cache-bytes", "1", "--no-warmup", "--max-queue-delay-ms", "50") as srv:
        clf = stub(srv)
        for task in ("alpha", "beta", "alpha", "beta"):  # each load evicts the other (idle) task
            assert classify(clf, task, clip).task == task
        assert loads(srv) == 4
        assert metric(scrape(srv.metrics_url), "stadapter_host_evictions_total") == 3
        with ThreadPoolExecutor(8) as pool:  # both tasks in flight at once: neither is dropped under its requests
            answers = list(pool.map(lambda i: classify(clf, ("alpha", "beta")[i % 2], clip), range(8)))
        assert [a.task for a in answers] == ["alpha", "beta"] * 4


def test_a_pinned_task_is_read_at_start_and_never_evicted(tmp_path, clip):
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--host-cache-bytes", "1", "--pin-tasks", "alpha", "--no-warmup") as srv:
        assert loads(srv) == 1  # alpha, at start
        clf = stub(srv)
        for task in ("alpha", "beta", "alpha", "beta", "alpha"):
            assert classify(clf, task, clip).task == task
        assert loads(srv) == 3  # beta twice (evicted in between); alpha never again
