"""Device cache of task adapters: K=1 stacks on the device up to a byte budget, LRU beyond it.

Evicting only drops the device copy: every served version keeps its host copy
(:attr:`TaskVersion.host_stack`), which is loaded back on the next use. Entries
that the batch being prepared needs are pinned and never evicted for it, so a
batch with more tasks than the budget holds still runs (the cache then shrinks
back under the budget after it).

Used from the model thread; a lock keeps ``discard`` (registry changes) and
metric reads safe from other threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch

from stadapter.bank import AdapterStack

Key = tuple[str, int]


class DeviceCache:
    def __init__(self, budget_bytes: int, device: torch.device, dtype: torch.dtype,
                 on_event: Optional[Callable[[str, int], None]] = None):
        self.budget = int(budget_bytes)
        self.device = device
        self.dtype = dtype
        self.on_event = on_event  # ("hit" | "miss" | "eviction", bytes resident after)
        self._entries: "OrderedDict[Key, AdapterStack]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._entries)

    def get_many(self, items: Iterable[tuple[Key, AdapterStack]]) -> list[AdapterStack]:
        """Device stacks for these (key, host stack) pairs, loading misses; all are pinned for this call."""
        items = list(items)
        out = []
        with self._lock:
            for key, host in items:
                dev = self._entries.get(key)
                if dev is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    self._emit("hit")
                else:
                    dev = host.to(device=self.device, dtype=self.dtype)
                    self._entries[key] = dev
                    self._bytes += dev.nbytes
                    self.misses += 1
                    self._emit("miss")
                out.append(dev)
            self._evict(pinned={k for k, _ in items})
        return out

    def _evict(self, pinned: set[Key]) -> None:
        for key in list(self._entries):
            if self._bytes <= self.budget:
                break
            if key in pinned:
                continue
            dev = self._entries.pop(key)
            self._bytes -= dev.nbytes
            self.evictions += 1
            self._emit("eviction")

    def discard(self, key: Key) -> None:
        """Drop a retired version's device copy (not counted as an eviction)."""
        with self._lock:
            dev = self._entries.pop(key, None)
            if dev is not None:
                self._bytes -= dev.nbytes
                self._emit("discard")

    def _emit(self, event: str) -> None:
        if self.on_event is not None:
            self.on_event(event, self._bytes)
