"""``stadapter_task_bytes{task}`` / ``stadapter_task_version{task}``: one series per served task while at most
``--max-task-series`` tasks are served, none above it (a repository of 10,000 tasks made 20,000 series); and
``stadapter_requests_total`` / ``stadapter_clips_total`` name a served task only under the same bound (a Zipf mix over
10,000 tasks named thousands of them), counting every served task's requests under ``task="_all"`` above it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import grpc
import media
import pytest
import torch
from serverproc import ServerProcess, make_repository, metric, scrape, wait_for

from server.config import ALL_TASKS, ServerConfig
from server.observability.metrics import Metrics
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc


@dataclass
class Version:
    name: str
    version: int = 1
    nbytes: int = 100


def series(m: Metrics) -> dict[str, tuple[float, float]]:
    """task -> (bytes, version) as exported."""
    out: dict[str, list[float]] = {}
    for i, gauge in enumerate((m.task_bytes, m.task_version)):
        for fam in gauge.collect():
            for s in fam.samples:
                out.setdefault(s.labels["task"], [0.0, 0.0])[i] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_per_task_series_under_the_bound_as_before_and_none_above_it():
    m = Metrics(torch.device("cpu"))
    a, b, c = Version("a"), Version("b", 2, 200), Version("c")
    m.show_tasks({"a": a, "b": b}, [a, b], [], bound=2)
    assert series(m) == {"a": (100, 1), "b": (200, 2)}
    m.show_tasks({"a": a, "b": b, "c": c}, [c], [], bound=2)  # over the bound: every series goes
    assert series(m) == {}
    b3 = Version("b", 3, 300)
    m.show_tasks({"a": a, "b": b3, "c": c}, [b3], [b], bound=2)
    assert series(m) == {}
    m.show_tasks({"a": a, "b": b3}, [], [c], bound=2)  # back under it: all the served tasks again
    assert series(m) == {"a": (100, 1), "b": (300, 3)}
    m.show_tasks({"b": b3}, [], [a], bound=2)  # under it, a retired task's series goes, as before
    assert series(m) == {"b": (300, 3)}


def test_request_and_clip_labels_name_a_task_only_under_the_bound():
    m = Metrics(torch.device("cpu"))
    a, b, c = Version("a"), Version("b"), Version("c")
    m.show_tasks({"a": a, "b": b}, [a, b], [], bound=2)
    assert m.task_label("a") == "a"
    m.show_tasks({"a": a, "b": b, "c": c}, [c], [], bound=2)
    assert m.task_label("a") == m.task_label("c") == ALL_TASKS == "_all"
    m.show_tasks({"a": a, "b": b}, [], [c], bound=2)
    assert m.task_label("a") == "a"


def test_a_bound_of_zero_exports_none():
    m = Metrics(torch.device("cpu"))
    a = Version("a")
    m.show_tasks({"a": a}, [a], [], bound=0)
    assert series(m) == {}


def test_a_negative_bound_is_refused():
    with pytest.raises(ValueError, match="max_task_series must be >= 0"):
        ServerConfig(model_repository="x", max_task_series=-1)


@pytest.mark.integration
def test_a_server_with_more_tasks_than_the_bound_exports_no_per_task_series(tmp_path):
    clip = media.make_clip(num_frames=12)
    repo = make_repository(tmp_path / "repo", tasks=(("alpha", 3), ("beta", 4), ("gamma", 3)))
    with ServerProcess(repo, "--max-task-series", "2", "--poll-interval-s", "0.2", "--no-warmup") as srv:
        m = scrape(srv.metrics_url)
        assert metric(m, "stadapter_tasks_loaded") == 3
        assert not [k for k in m if k[0] in ("stadapter_task_bytes", "stadapter_task_version")]
        classify(srv, "alpha", clip)  # over the bound: counted, but not under its name
        m = scrape(srv.metrics_url)
        assert metric(m, "stadapter_requests_total", method="Classify", task="_all", code="OK") == 1
        assert metric(m, "stadapter_clips_total", task="_all") == 1
        assert not [k for k in m if k[0] in ("stadapter_requests_total", "stadapter_clips_total")
                    and dict(k[1]).get("task") == "alpha"]
        shutil.rmtree(repo / "tasks" / "gamma")  # another replica unregistered it: 2 tasks, under the bound
        wait_for(lambda: metric(scrape(srv.metrics_url), "stadapter_tasks_loaded") == 2, "the poll to drop gamma")
        m = scrape(srv.metrics_url)
        assert metric(m, "stadapter_task_version", task="alpha") == 1 and metric(m, "stadapter_task_bytes", task="beta") > 0
        assert metric(m, "stadapter_task_bytes", task="gamma") == 0
        classify(srv, "alpha", clip)  # under the bound again: named
        m = scrape(srv.metrics_url)
        assert metric(m, "stadapter_requests_total", method="Classify", task="alpha", code="OK") == 1
        assert metric(m, "stadapter_clips_total", task="alpha") == 1
        assert metric(m, "stadapter_clips_total", task="_all") == 1  # what was counted before keeps its count


def classify(srv, task: str, clip: bytes) -> None:
    stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
    assert stub.Classify(pb.ClassifyRequest(task=task, clip=clip), timeout=60).task == task
