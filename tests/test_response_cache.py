"""The optional response cache: keys, LRU byte bound, retirement, and its place in the server."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.response_cache import ENTRY_OVERHEAD_BYTES, HASH_IN_THREAD_BYTES, CacheKey, ResponseCache, clip_digest
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
