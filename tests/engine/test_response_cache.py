"""The optional response cache: keys, LRU byte bound, retirement, and its place in the server."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.response_cache import ENTRY_OVERHEAD_BYTES, HASH_IN_THREAD_BYTES, CacheKey, ResponseCache, clip_digest
from stadapter.config import SamplingConfig

SAMPLING = SamplingConfig(num_frames=4, input_size=32)


def key(clip: bytes = b"clip", uid: int = 1, sampling: SamplingConfig = SAMPLING) -> CacheKey:
    return CacheKey(asyncio.run(clip_digest(clip)), uid, sampling)


def entry_cost(classes: int) -> int:
    return 4 * classes + ENTRY_OVERHEAD_BYTES


def test_hit_returns_a_copy_of_what_was_stored_and_counts_events():
    events: list[str] = []
    cache = ResponseCache(1 << 20, on_event=events.append)
    probs = torch.tensor([0.1, 0.7, 0.2])
    assert cache.get(key()) is None
    cache.put(key(), probs)
    probs[0] = 5.0  # the caller's tensor is not the cached one
    got = cache.get(key())
    assert got is not None and torch.equal(got, torch.tensor([0.1, 0.7, 0.2]))
    assert events == ["miss", "hit"]
    assert cache.nbytes == entry_cost(3) and len(cache) == 1


@pytest.mark.parametrize("other", [
    key(clip=b"clip2"),
    key(uid=2),
    key(sampling=SAMPLING.replace(num_frames=8)),
    key(sampling=SAMPLING.replace(temporal_views=2)),
])
def test_another_clip_version_or_sampling_misses(other):
    cache = ResponseCache(1 << 20)
    cache.put(key(), torch.ones(3))
    assert cache.get(other) is None


def test_lru_keeps_within_the_byte_budget_and_evicts_the_least_recent():
    cache = ResponseCache(3 * entry_cost(10))
    for uid in (1, 2, 3):
        cache.put(key(uid=uid), torch.ones(10))
    assert cache.get(key(uid=1)) is not None  # 1 is now the most recent: 2 goes next
    cache.put(key(uid=4), torch.ones(10))
    assert cache.get(key(uid=2)) is None
    assert all(cache.get(key(uid=u)) is not None for u in (1, 3, 4))
    assert cache.nbytes == 3 * entry_cost(10) <= cache.max_bytes


def test_replacing_an_entry_does_not_count_it_twice():
    cache = ResponseCache(1 << 20)
    cache.put(key(), torch.ones(10))
    cache.put(key(), torch.zeros(10))
    assert len(cache) == 1 and cache.nbytes == entry_cost(10)
    assert torch.equal(cache.get(key()), torch.zeros(10))


def test_an_entry_larger_than_the_budget_is_not_stored():
    cache = ResponseCache(entry_cost(10))
    cache.put(key(), torch.ones(11))
    assert len(cache) == 0 and cache.nbytes == 0


def test_drop_version_forgets_only_that_version():
    cache = ResponseCache(1 << 20)
    cache.put(key(b"a", uid=1), torch.ones(3))
    cache.put(key(b"b", uid=1), torch.ones(3))
    cache.put(key(b"a", uid=2), torch.ones(3))
    assert cache.drop_version(1) == 2
    assert len(cache) == 1 and cache.nbytes == entry_cost(3)
    assert cache.get(key(b"a", uid=2)) is not None


def test_bad_budget_and_bad_shape_are_refused():
    with pytest.raises(ValueError, match="positive byte budget"):
        ResponseCache(0)
    with pytest.raises(ValueError, match="one vector per clip"):
        ResponseCache(1 << 20).put(key(), torch.ones(2, 3))


def test_digest_is_the_same_on_and_off_the_event_loop():
    big = bytes(range(256)) * (HASH_IN_THREAD_BYTES // 256 + 1)
    assert asyncio.run(clip_digest(big)) == asyncio.run(clip_digest(bytearray(big)))
    assert asyncio.run(clip_digest(big)) != asyncio.run(clip_digest(big[:-1]))


# --- over a real server: --response-cache-bytes --------------------------------------------------


@pytest.fixture(scope="module")
def cache_srv(tmp_path_factory):
    import grpc
    from serverproc import ServerProcess, make_repository

    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    root = make_repository(tmp_path_factory.mktemp("cache") / "repo")
    with ServerProcess(root, "--allow-insecure-admin", "--poll-interval-s", "0", "--no-warmup",
                       "--response-cache-bytes", "1000000") as s:
        channel = grpc.insecure_channel(s.address)
        s.stub, s.admin = pb_grpc.VideoClassifierStub(channel), pb_grpc.TaskAdminStub(channel)
        s.root = root
        yield s


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[bytes]:
    import media

    folder = tmp_path_factory.mktemp("clips")
    return [media.make_clip(folder / f"clip{i}.mp4", num_frames=10 + i).read_bytes() for i in range(2)]


def scrape(srv) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def classify(srv, clip: bytes, task: str = "alpha", **kw):
    from stadapter_api.v1 import inference_pb2 as pb

    return srv.stub.Classify(pb.ClassifyRequest(task=task, clip=clip, **kw), timeout=30)


def test_the_same_clip_again_is_answered_from_the_cache(cache_srv, clips):
    before = scrape(cache_srv)
    first = classify(cache_srv, clips[0], top_k=2)
    again = classify(cache_srv, clips[0], top_k=3)  # another top-k: the same entry
    after = scrape(cache_srv)
    assert not first.timings.cached and again.timings.cached
    assert again.timings.batch_size == 0 and again.timings.decode_ms == 0
    assert [(p.label, p.score) for p in again.predictions[:2]] == [(p.label, p.score) for p in first.predictions]
    assert len(again.predictions) == 3
    assert after["stadapter_response_cache_hits_total"] - before["stadapter_response_cache_hits_total"] == 1
    assert after["stadapter_response_cache_misses_total"] - before["stadapter_response_cache_misses_total"] == 1
    assert after["stadapter_decode_seconds_count"] - before["stadapter_decode_seconds_count"] == 1
    assert after["stadapter_response_cache_entries"] >= 1 and after["stadapter_response_cache_bytes"] > 0


def test_another_clip_sampling_or_task_is_computed(cache_srv, clips):
    from stadapter_api.v1 import inference_pb2 as pb

    classify(cache_srv, clips[1])
    assert not classify(cache_srv, clips[1], sampling=pb.SamplingOverrides(temporal_views=2)).timings.cached
    assert not classify(cache_srv, clips[1], task="beta").timings.cached
    both = cache_srv.stub.Classify(pb.ClassifyRequest(tasks=["alpha", "beta"], clip=clips[1]), timeout=30)
    assert [r.timings.cached for r in both.results] == [True, True]


def test_a_new_version_is_never_answered_from_the_old_ones_entries(cache_srv, clips, tmp_path):
    import shutil

    from factories import make_bundle

    from clients import Client
    from stadapter import load_trunk

    classify(cache_srv, clips[0])
    assert classify(cache_srv, clips[0]).timings.cached
    bundle = make_bundle(load_trunk(cache_srv.root / "trunk"), tmp_path / "alpha", name="alpha", seed=99,
                         labels=["alpha-0", "alpha-1", "alpha-2"])
    with Client(cache_srv.address) as c:
        assert c.register(bundle).version == 2
    fresh = classify(cache_srv, clips[0])
    assert fresh.task_version == 2 and not fresh.timings.cached
    assert classify(cache_srv, clips[0]).timings.cached
    shutil.rmtree(bundle)


def test_a_bad_clip_is_not_cached_and_the_server_serves_on(cache_srv, clips):
    import grpc

    for _ in range(2):
        with pytest.raises(grpc.RpcError) as e:
            classify(cache_srv, b"not a video" * 100)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert classify(cache_srv, clips[0]).predictions
