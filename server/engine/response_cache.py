"""An optional cache of answers: the same clip, task version and sampling give the same probabilities.

Triton's response cache, for this server: a client that sends one clip again (a retry, a
re-upload, a dashboard polling one sample) gets its answer without a decode or a forward.
The key is the clip's sha256, the loaded task version's ``uid`` (a version replaced or
registered again is another uid, so a stale answer can never come back) and the resolved
:class:`SamplingConfig` (the task's, with the request's overrides applied). The value is the
full class-probability vector, so any ``top_k`` is answered from one entry.

Bounded in bytes (LRU beyond the budget); entries of a retired version are dropped when it
retires. Off unless the server is given a budget (``--response-cache-bytes``).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from stadapter.config import SamplingConfig

# What an entry costs beyond its probabilities: the key (digest, uid, sampling) and the LRU's bookkeeping.
# An estimate, kept on the high side so that the byte budget is an upper bound of what the cache holds.
ENTRY_OVERHEAD_BYTES = 512

# Hashing a clip this large runs in a thread (hashlib releases the GIL), not on the event loop.
HASH_IN_THREAD_BYTES = 1 << 20


@dataclass(frozen=True)
class CacheKey:
    clip_sha256: bytes
    version_uid: int
    sampling: SamplingConfig


async def clip_digest(clip: Union[bytes, bytearray, memoryview]) -> bytes:
    """sha256 of an encoded clip; large clips are hashed off the event loop."""
    if len(clip) >= HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(_sha256, clip)
    return _sha256(clip)


def _sha256(clip: Union[bytes, bytearray, memoryview]) -> bytes:
    return hashlib.sha256(clip).digest()


class ResponseCache:
    """Byte-bounded LRU of ``CacheKey -> probabilities`` (a float32 CPU vector per entry).

    ``on_event`` is told ``"hit"`` or ``"miss"`` for every lookup (the server's metrics).
    Thread-safe: the model thread never touches it, but the HTTP and gRPC handlers may run
    on other threads in tests and tools.
    """

    def __init__(self, max_bytes: int, on_event: Optional[Callable[[str], None]] = None):
        if max_bytes <= 0:
            raise ValueError(f"a response cache needs a positive byte budget, got {max_bytes}")
        self.max_bytes = max_bytes
        self._on_event = on_event
        self._entries: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> Optional[torch.Tensor]:
        with self._lock:
            probs = self._entries.get(key)
            if probs is not None:
                self._entries.move_to_end(key)
        if self._on_event is not None:
            self._on_event("miss" if probs is None else "hit")
        return probs

    def put(self, key: CacheKey, probs: torch.Tensor) -> None:
        """Store a copy of ``probs`` (1-D); an entry larger than the whole budget is not stored."""
        if probs.dim() != 1:
            raise ValueError(f"cached probabilities are one vector per clip, got shape {tuple(probs.shape)}")
        value = probs.detach().to("cpu", torch.float32).clone()
        cost = _cost(value)
        if cost > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _cost(old)
            self._entries[key] = value
            self._bytes += cost
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _cost(evicted)

    def drop_version(self, uid: int) -> int:
        """Forget every answer of one loaded version (it retired); returns how many were dropped."""
        with self._lock:
            dead = [k for k in self._entries if k.version_uid == uid]
            for k in dead:
                self._bytes -= _cost(self._entries.pop(k))
        return len(dead)


def _cost(probs: torch.Tensor) -> int:
    return probs.numel() * probs.element_size() + ENTRY_OVERHEAD_BYTES
