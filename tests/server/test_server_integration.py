"""Integration tests: the real server (``python -m server``) on 127.0.0.1, the generated stubs, real metrics.

Servers: one main server (admin token set), one small-queue server without a
token (queue full, deadlines, refusal, SIGTERM drain), and two replicas sharing
one repository plus a restart of it.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
import media
import pytest
from factories import make_bundle, make_trunk_dir
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serverproc import ServerProcess, code_of, make_repository, metric, scrape, self_signed_cert, wait_for

from stadapter import load_classifier, load_trunk
from stadapter.predict import predict_clip
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
TOKEN = "test-admin-token"
ADMIN_MD = (("authorization", f"Bearer {TOKEN}"),)


# --- helpers -------------------------------------------------------------------------------------



def bundle_chunks(bundle_dir: Path, size: int = 4096):
    for fname in ("task.json", "adapter.safetensors"):
        data = (bundle_dir / fname).read_bytes()
        for i in range(0, len(data), size):
            yield pb.RegisterTaskChunk(filename=fname, data=data[i:i + size])



def expected(repo: Path, task: str, version: int, clip: bytes, k: int = 5) -> list[dict]:
    clf = load_classifier(repo / "trunk", repo / "tasks" / task / str(version))
    return predict_clip(clf, clip, k)


def assert_matches(resp: pb.ClassifyResponse, want: list[dict]) -> None:
    assert [p.label for p in resp.predictions] == [w["label"] for w in want]
    for p, w in zip(resp.predictions, want, strict=True):
        assert abs(p.score - w["score"]) < 1e-4, (p.score, w["score"])


class Stubs:
    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.clf = pb_grpc.VideoClassifierStub(self.channel)
        self.admin = pb_grpc.TaskAdminStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def classify(self, task: str, clip: bytes, **kw) -> pb.ClassifyResponse:
        return self.clf.Classify(pb.ClassifyRequest(task=task, clip=clip, **kw), timeout=30)


@pytest.fixture(scope="module")
def clips():
    return [media.make_clip(num_frames=12), media.make_clip(num_frames=20, pattern="grey"),
            media.make_clip(num_frames=16, size=(80, 60), codec="mpeg4")]


@pytest.fixture(scope="module")
def main_repo(tmp_path_factory):
    return make_repository(tmp_path_factory.mktemp("main") / "repo")


@pytest.fixture(scope="module")
def main(main_repo):
    with ServerProcess(main_repo, "--max-queue-delay-ms", "100", "--max-batch-size", "16", "--poll-interval-s", "0.2",
                       "--max-clip-bytes", "2000000", "--cache-bytes", "12000",  # room for one tiny task's adapters
                       env={"STADAPTER_ADMIN_TOKEN": TOKEN}) as srv:
        srv.stubs = Stubs(srv.address)
        yield srv


# --- main server -----------------------------------------------------------------------------------


def test_classify_matches_offline_predict_whole_and_streamed(main, main_repo, clips):
    want = expected(main_repo, "alpha", 1, clips[0], k=3)
    resp = main.stubs.classify("alpha", clips[0], top_k=3, request_id="r-1")
    assert (resp.task, resp.task_version, resp.request_id) == ("alpha", 1, "r-1")
    assert_matches(resp, want)
    assert resp.timings.total_ms >= resp.timings.compute_ms > 0 and resp.timings.batch_size >= 1
    chunks = [pb.ClassifyChunk(task="alpha", top_k=3, data=clips[0][:1000])]
    chunks += [pb.ClassifyChunk(data=clips[0][i:i + 1000]) for i in range(1000, len(clips[0]), 1000)]
    assert_matches(main.stubs.clf.ClassifyStream(iter(chunks), timeout=30), want)
    # a sampling override reaches the decoder: 3 spatial views are averaged like the offline path
    clf = load_classifier(main_repo / "trunk", main_repo / "tasks" / "alpha" / "1")
    resp = main.stubs.classify("alpha", clips[1], top_k=3, sampling=pb.SamplingOverrides(spatial_views=3))
    assert_matches(resp, predict_clip(clf, clips[1], 3, spatial_views=3))


def test_two_tasks_in_flight_share_a_forward_and_get_their_own_answers(main, main_repo, clips):
    before = scrape(main.metrics_url)
    jobs = [("alpha" if i % 2 == 0 else "beta", clips[i % 3]) for i in range(8)]
    futures = [main.stubs.clf.Classify.future(pb.ClassifyRequest(task=t, clip=c), timeout=30) for t, c in jobs]
    resps = [f.result() for f in futures]
    for (task, clip), r in zip(jobs, resps, strict=True):
        assert r.task == task
        assert_matches(r, expected(main_repo, task, 1, clip))
    assert max(r.timings.batch_size for r in resps) >= 2
    after = scrape(main.metrics_url)
    # at least one forward held clips of two tasks
    mixed = lambda m: metric(m, "stadapter_batch_tasks_count") - metric(m, "stadapter_batch_tasks_bucket", le="1.0")  # noqa: E731
    assert mixed(after) - mixed(before) >= 1
    assert metric(after, "stadapter_clips_total", task="beta") - metric(before, "stadapter_clips_total", task="beta") == 4


def test_unknown_task_is_not_found(main, clips):
    with pytest.raises(grpc.RpcError) as e:
        main.stubs.classify("no-such-task", clips[0])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "alpha" in e.value.details()
    assert code_of(lambda: main.stubs.clf.DescribeTask(pb.DescribeTaskRequest(task="nope"))) == grpc.StatusCode.NOT_FOUND


def test_each_bad_clip_is_invalid_argument_and_the_server_keeps_serving(main, clips):
    good = clips[0]
    bad = {
        "empty": media.empty(),
        "garbage": media.garbage(3000),
        "truncated": media.truncated(good, 0.3),
        "audio-only": media.make_audio_only(),
        "oversized": b"\0" * 2_000_001,
    }
    for kind, data in bad.items():
        with pytest.raises(grpc.RpcError) as e:
            main.stubs.classify("alpha", data)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kind
        assert e.value.details(), kind
        assert main.stubs.classify("alpha", good).predictions, f"good request after {kind}"
    for kw in ({"top_k": 5000}, {"sampling": pb.SamplingOverrides(spatial_views=2)},
               {"sampling": pb.SamplingOverrides(mode="sideways")},
               {"sampling": pb.SamplingOverrides(num_frames=512, temporal_views=4_000_000_000, spatial_views=3)}):
        assert code_of(lambda kw=kw: main.stubs.classify("alpha", good, **kw)) == grpc.StatusCode.INVALID_ARGUMENT, kw
    assert code_of(lambda: main.stubs.classify("", good)) == grpc.StatusCode.INVALID_ARGUMENT


def test_batch_classify_gives_each_item_its_own_result(main, clips):
    reqs = [pb.ClassifyRequest(task="alpha", clip=clips[0]), pb.ClassifyRequest(task="nope", clip=clips[0]),
            pb.ClassifyRequest(task="beta", clip=b"junk")]
    res = main.stubs.clf.BatchClassify(pb.BatchClassifyRequest(requests=reqs), timeout=30).results
    assert res[0].WhichOneof("result") == "response" and res[0].response.task == "alpha"
    assert res[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert res[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_health_reflection_and_listing(main):
    for service in ("", "stadapter.v1.VideoClassifier", "stadapter.v1.TaskAdmin"):
        r = main.stubs.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(main.stubs.channel)
    (answer,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"stadapter.v1.VideoClassifier", "stadapter.v1.TaskAdmin", "grpc.health.v1.Health"} <= names
    listing = main.stubs.clf.ListTasks(pb.ListTasksRequest(), timeout=5)
    assert {t.name for t in listing.tasks} >= {"alpha", "beta"} and len(listing.trunk_fingerprint) == 64
    info = main.stubs.clf.DescribeTask(pb.DescribeTaskRequest(task="beta"), timeout=5)
    assert list(info.labels) == [f"beta-{i}" for i in range(4)] and info.adapter_bytes > 0 and info.state == "ready"


def test_register_needs_the_token(main, main_repo, tmp_path):
    trunk = load_trunk(main_repo / "trunk")
    src = make_bundle(trunk, tmp_path / "b", name="sneaky")
    for md in (None, (("authorization", "Bearer wrong"),)):
        assert code_of(lambda md=md: main.stubs.admin.RegisterTask(bundle_chunks(src), metadata=md, timeout=30)) \
            == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: main.stubs.admin.UnregisterTask(pb.UnregisterTaskRequest(task="alpha"), timeout=5)) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert not (main_repo / "tasks" / "sneaky").exists()


def test_bad_bundles_are_invalid_argument(main, tmp_path):
    before = scrape(main.metrics_url)
    other = load_trunk(make_trunk_dir(tmp_path / "other-trunk", seed=5))
    foreign = make_bundle(other, tmp_path / "foreign", name="foreign")
    with pytest.raises(grpc.RpcError) as e:
        main.stubs.admin.RegisterTask(bundle_chunks(foreign), metadata=ADMIN_MD, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "trunk" in e.value.details()
    stray = iter([pb.RegisterTaskChunk(filename="../evil.py", data=b"x")])
    assert code_of(lambda: main.stubs.admin.RegisterTask(stray, metadata=ADMIN_MD, timeout=30)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    only_json = iter([pb.RegisterTaskChunk(filename="task.json", data=(foreign / "task.json").read_bytes())])
    assert code_of(lambda: main.stubs.admin.RegisterTask(only_json, metadata=ADMIN_MD, timeout=30)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(main.metrics_url)
    moved = metric(after, "stadapter_registrations_total", result="invalid_argument") \
        - metric(before, "stadapter_registrations_total", result="invalid_argument")
    assert moved == 3


def test_register_reregister_unregister_under_load_loses_no_request(main, main_repo, clips, tmp_path):
    trunk = load_trunk(main_repo / "trunk")
    bundles = {v: make_bundle(trunk, tmp_path / f"g{v}", name="gamma", labels=[f"v{v}-{i}" for i in range(3)], seed=20 + v)
               for v in (1, 2, 3)}
    reg = lambda v: main.stubs.admin.RegisterTask(bundle_chunks(bundles[v]), metadata=ADMIN_MD, timeout=30)  # noqa: E731
    assert reg(1).task.version == 1
    stop = threading.Event()
    unregister_started = [float("inf")]
    log: list[tuple[float, float, grpc.StatusCode, int, str]] = []  # sent, answered, code, version, label/details

    def load(i: int) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = main.stubs.classify("gamma", clips[i % 3])
                log.append((sent, time.monotonic(), grpc.StatusCode.OK, r.task_version, r.predictions[0].label))
            except grpc.RpcError as e:
                log.append((sent, time.monotonic(), e.code(), 0, e.details()))

    with ThreadPoolExecutor(3) as pool:
        for i in range(3):
            pool.submit(load, i)
        def served(v: int) -> Callable[[], bool]:
            return lambda: any(x[2] == grpc.StatusCode.OK and x[3] == v for x in list(log))

        wait_for(served(1), "a request served by version 1")
        assert reg(2).task.version == 2
        wait_for(served(2), "a request served by version 2")
        assert reg(3).task.version == 3
        wait_for(served(3), "a request served by version 3")
        unregister_started[0] = time.monotonic()
        resp = main.stubs.admin.UnregisterTask(pb.UnregisterTaskRequest(task="gamma"), metadata=ADMIN_MD, timeout=10)
        unregister_done = time.monotonic()
        assert (resp.task, resp.version) == ("gamma", 3)
        wait_for(lambda: any(x[0] > unregister_done for x in list(log)), "a request sent after the unregister")
        stop.set()
    ok = [x for x in log if x[2] == grpc.StatusCode.OK]
    assert {x[3] for x in ok} == {1, 2, 3}
    for _, _, _, v, label in ok:
        assert label.startswith(f"v{v}-"), (v, label)  # each request ran entirely on one version
    for sent, answered, code, _, details in log:
        if code != grpc.StatusCode.OK:  # only NOT_FOUND, and only once the unregister had begun
            assert code == grpc.StatusCode.NOT_FOUND and answered >= unregister_started[0], (code, details)
        if sent > unregister_done:
            assert code == grpc.StatusCode.NOT_FOUND
    assert any(x[2] == grpc.StatusCode.NOT_FOUND for x in log)
    wait_for(lambda: not (main_repo / "tasks" / "gamma").exists(), "the unregistered folder to go", timeout=5)


def test_metrics_parse_and_counters_move(main, clips):
    before = scrape(main.metrics_url)
    main.stubs.classify("alpha", clips[2])
    code_of(lambda: main.stubs.classify("nope", clips[2]))
    after = scrape(main.metrics_url)
    d = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert d("stadapter_requests_total", method="Classify", task="alpha", code="OK") == 1
    assert d("stadapter_requests_total", method="Classify", task="_other", code="NOT_FOUND") == 1
    assert d("stadapter_clips_total", task="alpha") == 1
    assert d("stadapter_decode_seconds_count") == 1 and d("stadapter_compute_seconds_count") == 1
    assert d("stadapter_request_seconds_count", method="Classify") == 2
    assert d("stadapter_adapter_hits_total") + d("stadapter_adapter_activations_total") == 1
    assert metric(after, "stadapter_tasks_loaded") == 2
    assert metric(after, "stadapter_task_bytes", task="alpha") > 0
    assert metric(after, "stadapter_queue_depth") == 0
    assert metric(after, "stadapter_adapter_device_bytes") > 0
    assert metric(after, "stadapter_adapter_slots", state="used") + metric(after, "stadapter_adapter_slots", state="free") == 1
    assert metric(after, "process_resident_memory_bytes") > 0
    for name in ("stadapter_queue_wait_seconds_count", "stadapter_batch_size_count", "stadapter_stage_seconds_count"):
        assert d(name) == 1, name
    # the device budget holds one slot: alternating tasks activate and evict, repeating one hits
    before = scrape(main.metrics_url)
    for task in ("alpha", "beta", "alpha", "alpha"):
        main.stubs.classify(task, clips[0])
    after = scrape(main.metrics_url)
    assert d("stadapter_adapter_activations_total") >= 2 and d("stadapter_adapter_evictions_total") >= 2
    assert d("stadapter_adapter_hits_total") >= 1 and d("stadapter_adapter_activation_seconds_count") >= 2
    assert metric(after, "stadapter_adapter_device_bytes") <= 12000


# --- replicas and restart --------------------------------------------------------------------------


def test_replicas_share_a_repository_and_a_restart_keeps_registered_tasks(tmp_path, clips):
    repo = make_repository(tmp_path / "shared")
    env = {"STADAPTER_ADMIN_TOKEN": TOKEN}
    args = ("--poll-interval-s", "0.2", "--max-queue-delay-ms", "1")
    trunk = load_trunk(repo / "trunk")
    delta = make_bundle(trunk, tmp_path / "delta", name="delta", labels=["d0", "d1"], seed=30)
    with ServerProcess(repo, *args, env=env) as a, ServerProcess(repo, *args, env=env) as b:
        sa, sb = Stubs(a.address), Stubs(b.address)
        assert sa.admin.RegisterTask(bundle_chunks(delta), metadata=ADMIN_MD, timeout=30).task.version == 1
        sa.admin.UnregisterTask(pb.UnregisterTaskRequest(task="beta"), metadata=ADMIN_MD, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = {t.name for t in sb.clf.ListTasks(pb.ListTasksRequest(), timeout=5).tasks}
            if names == {"alpha", "delta"}:
                break
            time.sleep(0.1)
        assert names == {"alpha", "delta"}
        assert sb.classify("delta", clips[0]).task_version == 1
        assert code_of(lambda: sb.classify("beta", clips[0])) == grpc.StatusCode.NOT_FOUND
        assert a.stop() == 0 and b.stop() == 0
    with ServerProcess(repo, *args, env=env) as c:
        sc = Stubs(c.address)
        assert {t.name for t in sc.clf.ListTasks(pb.ListTasksRequest(), timeout=5).tasks} == {"alpha", "delta"}
        r = sc.classify("delta", clips[1], top_k=2)
        assert r.task_version == 1 and {p.label for p in r.predictions} == {"d0", "d1"}


# --- a small-queue server without an admin token ---------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("small") / "repo")
    srv = ServerProcess(repo, "--max-queue-size", "2", "--max-queue-delay-ms", "1000", "--max-batch-size", "64",
                        env={"STADAPTER_ADMIN_TOKEN": None})
    srv.stubs = Stubs(srv.address)
    srv.repo = repo
    yield srv
    srv.close()


def test_admin_refused_when_no_token_is_configured(small):
    src = small.repo / "tasks" / "alpha" / "1"
    with pytest.raises(grpc.RpcError) as e:
        small.stubs.admin.RegisterTask(bundle_chunks(src), metadata=ADMIN_MD, timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "STADAPTER_ADMIN_TOKEN" in e.value.details()


def test_full_queue_answers_resource_exhausted_at_once(small, clips):
    futures = [small.stubs.clf.Classify.future(pb.ClassifyRequest(task="alpha", clip=clips[0]), timeout=30)
               for _ in range(5)]
    codes, times = [], []
    for f in futures:
        t0 = time.monotonic()
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            times.append(time.monotonic() - t0)
    assert codes.count(grpc.StatusCode.OK) >= 1
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_expired_deadline_is_dropped_before_compute(small, clips):
    before = scrape(small.metrics_url)
    assert code_of(lambda: small.stubs.clf.Classify(pb.ClassifyRequest(task="alpha", clip=clips[0]), timeout=0.3)) \
        == grpc.StatusCode.DEADLINE_EXCEEDED
    dropped = ("stadapter_dropped_total", {"reason": "deadline"})
    wait_for(lambda: metric(scrape(small.metrics_url), dropped[0], **dropped[1]) > metric(before, dropped[0], **dropped[1]),
             "the batch (closing after 1 s) to drop the expired clip")
    after = scrape(small.metrics_url)
    assert metric(after, "stadapter_dropped_total", reason="deadline") \
        - metric(before, "stadapter_dropped_total", reason="deadline") == 1
    assert metric(after, "stadapter_requests_total", method="Classify", task="alpha", code="DEADLINE_EXCEEDED") == 1
    assert metric(after, "stadapter_compute_seconds_count") == metric(before, "stadapter_compute_seconds_count")


def test_sigterm_drains(small, clips):
    inflight = small.stubs.clf.Classify.future(pb.ClassifyRequest(task="beta", clip=clips[1]), timeout=30)
    wait_for(lambda: metric(scrape(small.metrics_url), "stadapter_queue_depth") >= 1,
             "the request to be admitted (the batcher then waits 1 s for more)")
    small.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: small.stubs.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
             == health_pb2.HealthCheckResponse.NOT_SERVING, "health to say NOT_SERVING after SIGTERM")
    assert code_of(lambda: small.stubs.classify("alpha", clips[0])) == grpc.StatusCode.UNAVAILABLE
    assert inflight.result().task == "beta"  # in-flight work finishes
    assert small.proc.wait(20) == 0


# --- TLS, a token file and a classify token ---------------------------------------------------------


def test_tls_with_token_files_and_a_classify_token(tmp_path, clips):
    cert, key = self_signed_cert(tmp_path)
    (tmp_path / "admin.txt").write_text("file-admin-token\n")
    (tmp_path / "classify.txt").write_text("classify-token\n")
    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--tls-cert", str(cert), "--tls-key", str(key), "--admin-token-file",
                       str(tmp_path / "admin.txt"), "--classify-token-file", str(tmp_path / "classify.txt"),
                       "--poll-interval-s", "0", env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel = grpc.secure_channel(srv.address, creds)
        clf, admin = pb_grpc.VideoClassifierStub(channel), pb_grpc.TaskAdminStub(channel)
        req = pb.ClassifyRequest(task="alpha", clip=clips[0])
        assert code_of(lambda: clf.Classify(req, timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
        ok = clf.Classify(req, metadata=(("authorization", "Bearer classify-token"),), timeout=30)
        assert ok.task == "alpha"
        md = (("authorization", "Bearer file-admin-token"),)
        assert admin.UnregisterTask(pb.UnregisterTaskRequest(task="beta"), metadata=md, timeout=10).task == "beta"
        plain = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
        assert code_of(lambda: plain.ListTasks(pb.ListTasksRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_clip_bytes_in_flight_are_bounded(tmp_path, clips):
    """A stream that is still arriving holds its bytes; a clip that would pass the budget is refused at once."""
    a = clips[0]
    budget = len(a) + 100
    held = len(a) - 10  # the stream sends all but its last 10 bytes, then waits
    release = threading.Event()

    def chunks():
        yield pb.ClassifyChunk(task="alpha", data=a[:held])
        release.wait(30)
        yield pb.ClassifyChunk(data=a[held:])

    repo = make_repository(tmp_path / "repo")
    with ServerProcess(repo, "--max-clip-bytes", str(budget), "--max-inflight-clip-bytes", str(budget)) as srv:
        stubs = Stubs(srv.address)
        stream = stubs.clf.ClassifyStream.future(chunks(), timeout=30)
        end = time.monotonic() + 20
        while metric(scrape(srv.metrics_url), "stadapter_clip_in_flight_bytes") != held:
            assert time.monotonic() < end, "the first chunk never arrived"
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stubs.classify("alpha", a)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in e.value.details()
        assert time.monotonic() - t0 < 5  # at once, not after the stream ends
        release.set()
        assert stream.result().task == "alpha"
        assert stubs.classify("alpha", a).predictions  # the budget is free again
        assert metric(scrape(srv.metrics_url), "stadapter_clip_in_flight_bytes") == 0
        two = pb.BatchClassifyRequest(requests=[pb.ClassifyRequest(task="alpha", clip=a)] * 2)
        assert code_of(lambda: stubs.clf.BatchClassify(two, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
