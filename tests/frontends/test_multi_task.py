"""Several tasks per clip (``ClassifyRequest.tasks``) over the real server, its /metrics, the SDK and the CLI.

One module-scoped server on a tiny repository: ``alpha`` and ``beta`` share a sampling
(4 frames, 32 px), ``gamma`` takes 8 frames, ``delta`` 3 spatial crops. A request for
several tasks is answered in ``ClassifyResponse.results`` (one per task, in order); a
request that names ``task`` alone gets the one-task response of before.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import media
import pytest
from factories import TINY_SAMPLING, make_bundle
from serverproc import ServerProcess, code_of, make_repository, metric, scrape

from clients import AsyncClient, Client, ClientError, cli
from stadapter import load_classifier, load_trunk
from stadapter.predict import predict_clip
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]



def decodes(srv) -> float:
    return metric(scrape(srv.metrics_url), "stadapter_decode_seconds_count")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = make_repository(tmp_path_factory.mktemp("multi") / "repo")
    trunk = load_trunk(root / "trunk")
    make_bundle(trunk, root / "tasks" / "gamma" / "1", name="gamma", labels=["g0", "g1"], seed=7,
                sampling=TINY_SAMPLING.replace(num_frames=8))
    make_bundle(trunk, root / "tasks" / "delta" / "1", name="delta", labels=["d0", "d1", "d2"], seed=8,
                sampling=TINY_SAMPLING.replace(spatial_views=3))
    return root


@pytest.fixture(scope="module")
def srv(repo):
    with ServerProcess(repo, "--max-queue-delay-ms", "100", "--max-batch-size", "16", "--poll-interval-s", "0",
                       "--allow-insecure-admin") as s:
        s.stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(s.address))
        yield s


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return media.make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", num_frames=20)


def classify(srv, clip: bytes, *tasks: str, task: str = "", **kw) -> pb.ClassifyResponse:
    return srv.stub.Classify(pb.ClassifyRequest(task=task, tasks=list(tasks), clip=clip, **kw), timeout=30)



def same_predictions(a, b) -> None:
    assert [p.label for p in a.predictions] == [p.label for p in b.predictions]
    for p, q in zip(a.predictions, b.predictions, strict=True):
        assert p.score == pytest.approx(q.score, abs=1e-5)


# --- the wire -------------------------------------------------------------------------------------


def test_two_tasks_one_decode_one_forward_same_answers_as_alone(srv, repo, clip):
    data = clip.read_bytes()
    alone = {t: classify(srv, data, task=t, top_k=3) for t in ("alpha", "beta")}
    before = scrape(srv.metrics_url)
    r = classify(srv, data, "alpha", "beta", top_k=3, request_id="m-1")
    after = scrape(srv.metrics_url)
    assert r.request_id == "m-1" and not r.task and not r.predictions  # the answer is in results
    assert [t.task for t in r.results] == ["alpha", "beta"] and all(not t.HasField("error") for t in r.results)
    for t in r.results:
        assert t.task_version == 1 and len(t.predictions) == 3
        same_predictions(t, alone[t.task])
        assert t.timings.batch_size == 2  # both rows in one forward
    offline = predict_clip(load_classifier(repo / "trunk", repo / "tasks" / "beta" / "1"), data, 3)
    assert [p.label for p in r.results[1].predictions] == [w["label"] for w in offline]
    # one decode for the request, one clip counted per task, each task counted as an item
    count = lambda n, **kw: metric(after, n, **kw) - metric(before, n, **kw)  # noqa: E731
    assert count("stadapter_decode_seconds_count") == 1
    assert count("stadapter_clips_total", task="alpha") == count("stadapter_clips_total", task="beta") == 1
    assert count("stadapter_requests_total", method="Classify.task", task="beta", code="OK") == 1
    assert count("stadapter_requests_total", method="Classify", task="", code="OK") == 1
    assert r.timings.decode_ms == pytest.approx(r.results[0].timings.decode_ms)
    assert r.timings.total_ms >= r.results[0].timings.compute_ms > 0


def test_one_decode_per_distinct_sampling(srv, clip):
    data = clip.read_bytes()
    n0 = decodes(srv)
    r = classify(srv, data, "alpha", "gamma", "beta")  # 4 frames, 8 frames, 4 frames
    assert [t.task for t in r.results] == ["alpha", "gamma", "beta"] and all(t.predictions for t in r.results)
    assert decodes(srv) - n0 == 2
    assert r.results[0].timings.decode_ms == r.results[2].timings.decode_ms != r.results[1].timings.decode_ms
    same_predictions(r.results[1], classify(srv, data, task="gamma"))
    # with num_frames=8 for all three, their samplings resolve equal: one decode
    n1 = decodes(srv)
    r = classify(srv, data, "alpha", "gamma", "beta", sampling=pb.SamplingOverrides(num_frames=8))
    assert all(t.predictions for t in r.results) and decodes(srv) - n1 == 1


def test_task_alone_gets_todays_response_and_task_with_tasks_comes_first(srv, clip):
    data = clip.read_bytes()
    old = classify(srv, data, task="alpha", top_k=2)
    assert old.task == "alpha" and old.task_version == 1 and len(old.predictions) == 2 and not old.results
    r = classify(srv, data, "beta", task="alpha", top_k=2)
    assert [t.task for t in r.results] == ["alpha", "beta"]
    same_predictions(r.results[0], old)
    one = classify(srv, data, "beta")  # a one-element list is still a list: answered in results
    assert [t.task for t in one.results] == ["beta"] and not one.predictions


def test_stream_and_batch_items_carry_task_lists(srv, clip):
    data = clip.read_bytes()
    chunks = [pb.ClassifyChunk(tasks=["beta", "alpha"], top_k=2, data=data[:500])]
    chunks += [pb.ClassifyChunk(data=data[i:i + 500]) for i in range(500, len(data), 500)]
    n0 = decodes(srv)
    r = srv.stub.ClassifyStream(iter(chunks), timeout=30)
    assert [t.task for t in r.results] == ["beta", "alpha"] and decodes(srv) - n0 == 1
    same_predictions(r.results[1], classify(srv, data, task="alpha", top_k=2))
    b = srv.stub.BatchClassify(pb.BatchClassifyRequest(requests=[
        pb.ClassifyRequest(tasks=["alpha", "nope"], clip=data), pb.ClassifyRequest(task="beta", clip=data)]),
        timeout=30).results
    assert [t.task for t in b[0].response.results] == ["alpha", "nope"]
    assert b[0].response.results[1].error.code == NOT_FOUND and b[1].response.task == "beta"


def test_an_unknown_task_or_a_bad_override_fails_its_item_only(srv, clip):
    data = clip.read_bytes()
    before = scrape(srv.metrics_url)
    r = classify(srv, data, "alpha", "no-such-task", "beta")
    after = scrape(srv.metrics_url)
    ok, missing, ok2 = r.results
    assert ok.predictions and ok2.predictions and not missing.predictions
    assert missing.task == "no-such-task" and missing.error.code == NOT_FOUND and "no-such-task" in missing.error.message
    assert metric(after, "stadapter_requests_total", method="Classify.task", task="_other", code="NOT_FOUND") - \
        metric(before, "stadapter_requests_total", method="Classify.task", task="_other", code="NOT_FOUND") == 1
    # 6 temporal views: 6 rows for alpha, 18 for delta (3 crops) - above --max-batch-size 16, for delta only
    r = classify(srv, data, "alpha", "delta", sampling=pb.SamplingOverrides(temporal_views=6))
    assert r.results[0].predictions and r.results[1].error.code == INVALID
    assert "18 rows" in r.results[1].error.message and "--max-batch-size" in r.results[1].error.message
    # an override no sampling takes fails every item, each with the reason
    r = classify(srv, data, "alpha", "beta", sampling=pb.SamplingOverrides(mode="sideways"))
    assert [t.error.code for t in r.results] == [INVALID, INVALID] and "sideways" in r.results[0].error.message


def test_a_clip_that_cannot_be_decoded_fails_every_item(srv, clip):
    r = classify(srv, media.garbage(3000), "alpha", "gamma", "beta")
    assert [t.error.code for t in r.results] == [INVALID] * 3 and all(t.error.message for t in r.results)
    assert [t.task for t in r.results] == ["alpha", "gamma", "beta"]
    assert classify(srv, clip.read_bytes(), "alpha", "beta").results[1].predictions  # still serving


def test_bad_task_lists_are_refused_whole(srv, clip):
    data = clip.read_bytes()
    cases = {
        "duplicate": dict(tasks=["alpha", "beta", "alpha"]),
        "task repeated in tasks": dict(task="alpha", tasks=["alpha"]),
        "empty name": dict(tasks=["alpha", ""]),
        "too many": dict(tasks=[f"t{i}" for i in range(33)]),
        "top_k": dict(tasks=["alpha"], top_k=5000),
    }
    words = {"duplicate": "named twice", "task repeated in tasks": "named twice", "empty name": "empty name",
             "too many": "32 tasks per request", "top_k": "top_k=5000"}
    for kind, kw in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            srv.stub.Classify(pb.ClassifyRequest(clip=data, **kw), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kind
        assert words[kind] in e.value.details(), (kind, e.value.details())
    assert code_of(lambda: classify(srv, b"", "alpha")) == grpc.StatusCode.INVALID_ARGUMENT
    m = scrape(srv.metrics_url)  # nothing left held
    assert metric(m, "stadapter_queue_depth") == 0 and metric(m, "stadapter_clip_in_flight_bytes") == 0
    assert metric(m, "stadapter_requests_in_flight") == 0
    assert classify(srv, data, "alpha", "beta").results[0].predictions


# --- SDK and CLI ----------------------------------------------------------------------------------


def test_sdk_task_list_returns_a_list_of_results_and_errors(srv, clip):
    with Client(srv.address) as c:
        one = c.classify(clip, "alpha", top_k=2)
        out = c.classify(clip, ["alpha", "nope", "beta"], top_k=2, request_id="sdk-1")
    with Client(srv.address, stream_threshold_bytes=256, chunk_bytes=300) as streamed:
        s = streamed.classify(clip, ["beta", "alpha"], top_k=2)
    assert type(one).__name__ == "ClassifyResult"
    assert [type(r).__name__ for r in out] == ["ClassifyResult", "ClientError", "ClassifyResult"]
    same_predictions(out[0], one)
    assert out[0].request_id == "sdk-1"
    assert out[1].code == grpc.StatusCode.NOT_FOUND and out[1].task == "nope" and not out[1].local
    assert [r.task for r in s] == ["beta", "alpha"]
    same_predictions(s[1], one)
    with pytest.raises(ClientError) as e, Client(srv.address) as c:
        c.classify(clip, [])
    assert e.value.local and e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_async_sdk_task_list(srv, clip):
    async def go():
        async with AsyncClient(srv.address) as c:
            return await c.classify(clip, ["gamma", "alpha"]), await c.classify(clip, "gamma")

    out, alone = asyncio.run(go())
    assert [r.task for r in out] == ["gamma", "alpha"]
    same_predictions(out[0], alone)


def test_cli_comma_list_and_repeated_task(srv, clip, capsys):
    a = ["--address", srv.address]
    assert cli.main(["classify", str(clip), "--task", "alpha,beta", "--json", *a]) == 0
    js = json.loads(capsys.readouterr().out)
    assert [(r["clip"], r["task"]) for r in js] == [(str(clip), "alpha"), (str(clip), "beta")]
    assert cli.main(["classify", str(clip), "--task", "alpha", "--task", "beta", "--json", *a]) == 0
    assert [r["task"] for r in json.loads(capsys.readouterr().out)] == ["alpha", "beta"]
    assert cli.main(["classify", str(clip), "--task", "alpha,nope", *a]) == 1
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert len(lines) == 3 and lines[1].split()[1] == "alpha" and lines[2].split()[1:4] == ["nope", "-", "ERROR"]
    assert cap.err.count("\n") == 1 and "(nope)" in cap.err and "NOT_FOUND" in cap.err
    for bad in (["--task", "alpha,alpha"], ["--task", "alpha,"], ["--task", "alpha,beta", "--batch"]):
        assert cli.main(["classify", str(clip), *bad, *a]) == 2, bad
        assert capsys.readouterr().err.startswith("error: ")


# --- admission: one queue slot per task, all or none ----------------------------------------------


def test_take_slots_takes_one_per_task_or_refuses_the_whole_request(two_task_repo, tiny_trunk):
    from server.config import ServerConfig
    from server.engine.admission import Admission
    from server.errors import Draining, QueueFull, TaskNotFound
    from server.registry.registry import TaskRegistry

    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    a = Admission(reg, ServerConfig(model_repository=two_task_repo, max_queue_size=3).limits)
    alpha = reg.tasks["alpha"]

    async def go():
        async with a.request() as t:
            slots = t.take_slots(["alpha", "nope", "beta"])
            assert isinstance(slots[1], TaskNotFound) and "nope" in str(slots[1])
            assert (a.pending, alpha.inflight) == (2, 1)  # an unknown task takes no slot
        assert (a.inflight, a.pending, alpha.inflight) == (0, 0, 0)
        async with a.request() as t1:
            t1.take_slot("alpha")
            with pytest.raises(QueueFull, match="no room for 3 tasks .*1 of 3 slots taken.*--max-queue-size"):
                async with a.request() as t2:
                    t2.take_slots(["alpha", "beta", "alpha"])
            assert (a.pending, alpha.inflight) == (1, 1)  # the refused request took nothing
        a.draining = True
        t = a.request()
        with pytest.raises(Draining):
            t.take_slots(["alpha"])
        assert (a.inflight, a.pending, alpha.inflight) == (0, 0, 0)

    asyncio.run(go())
