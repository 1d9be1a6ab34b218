"""The host tier: task weights in host memory, loaded from disk on first use and kept in a byte-bounded LRU.

The registry's scan reads every version's metadata and no weights; a version's adapter stack
(:attr:`TaskVersion.stack`) comes into memory here, the first time a request needs it:

* one load per version at a time (single flight): requests that find the same version loading wait for
  that load, on whatever thread or event loop they run; the load runs off the event loop
  (:meth:`HostTier.ensure`) or on the caller's thread (:meth:`HostTier.load_now`);
* the load is the registry's own reader and validator (``load``); the stack is published on the version
  only once it passed, so a version is never half-loaded. A load that fails is remembered for that
  version (its later requests fail at once, no second read) and reported to ``on_broken``, which takes
  the version out of service;
* a version counts the bytes its stack holds (``dtype``: the one the loader keeps it in, ``--host-dtype``; None
  as stored); past ``budget_bytes`` the least recently used versions leave host memory, except those a queued or
  running request holds (``TaskVersion.inflight``: the admission ticket's slots count it) and those of
  ``pinned`` task names. With every resident version held the tier stays over its budget until a later
  load or release lets it shrink. Device slots copy from here when they activate a version.

Residency changes happen under one lock, so a version a request acquired before asking is never evicted
under it. Events go to ``on_event(event, seconds)``: ``load`` (with the load time), ``load_failed``,
``eviction``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Collection, Optional

import torch

from server.config import DEFAULT_HOST_CACHE_BYTES
from server.registry.version import TaskVersion
from stadapter.bank import AdapterStack

log = logging.getLogger("server.registry.host_tier")

Loader = Callable[[TaskVersion], AdapterStack]  # reads and validates a version's weights; raises on a bad bundle


class HostTier:
    """Task weights in host memory (see the module docstring)."""

    def __init__(self, load: Loader, budget_bytes: int = DEFAULT_HOST_CACHE_BYTES, pinned: Collection[str] = (),
                 on_event: Optional[Callable[[str, float], None]] = None,
                 on_broken: Optional[Callable[[TaskVersion, Exception], None]] = None,
                 dtype: Optional[torch.dtype] = None):
        if budget_bytes < 0:
            raise ValueError(f"HostTier: budget_bytes must be >= 0, got {budget_bytes}")
        self._load = load
        self.budget = budget_bytes
        self.pinned = frozenset(pinned)
        self.on_event = on_event
        self.on_broken = on_broken
        self.dtype = dtype  # what the registry's loads keep weights in (None: as stored)
        self._lock = threading.Lock()
        self._resident: "OrderedDict[int, TaskVersion]" = OrderedDict()  # uid -> version, least recently used first
        self._sizes: dict[int, int] = {}  # uid -> the bytes its stack holds (counted in ``bytes``)
        self._flights: dict[int, concurrent.futures.Future] = {}  # uid -> the load in progress
        self._broken: dict[int, Exception] = {}  # uid -> why its load failed (never read again)
        self.bytes = 0
        self.loads = self.evictions = 0

    # --- reading (any thread) ---

    @property
    def resident_count(self) -> int:
        with self._lock:
            return len(self._resident)

    def is_resident(self, tv: TaskVersion) -> bool:
        with self._lock:
            return tv.uid in self._resident

    # --- loading ---

    def adopt(self, tv: TaskVersion) -> None:
        """Count a version whose stack was made elsewhere (a register validated it) as resident."""
        if tv.stack is None:
            raise ValueError(f"HostTier.adopt: task {tv.name} version {tv.version} has no stack")
        with self._lock:
            self._add(tv)
            self._trim(keep=tv.uid)

    async def ensure(self, tv: TaskVersion) -> None:
        """``tv``'s weights in host memory, loaded on a worker thread if they are not (the caller holds ``tv``)."""
        fut, mine = self._join(tv)
        if fut is None:
            return
        if mine:
            asyncio.get_running_loop().run_in_executor(None, self._run, tv, fut)
        await asyncio.wrap_future(fut)

    def load_now(self, tv: TaskVersion) -> AdapterStack:
        """``tv``'s stack, loaded on this thread if it is not in memory (or waiting for the load in progress)."""
        fut, mine = self._join(tv)
        if fut is None:
            stack = tv.stack
            if stack is not None:
                return stack
            fut, mine = self._join(tv)  # evicted between the two looks: join a load
        if fut is not None:
            if mine:
                self._run(tv, fut)
            fut.result()
        stack = tv.stack
        if stack is None:  # evicted the moment it loaded (no request holds it and the budget is 0): hand it over
            raise RuntimeError(f"task {tv.name} version {tv.version} left host memory while being read")
        return stack

    def _join(self, tv: TaskVersion) -> tuple[Optional[concurrent.futures.Future], bool]:
        """(None, False) when resident (touched as used); else the load's future and whether this caller runs it."""
        with self._lock:
            if tv.stack is not None:
                if tv.uid in self._resident:
                    self._resident.move_to_end(tv.uid)
                    self._trim(keep=tv.uid)  # what a load left over the budget (held then) may go now
                return None, False
            broken = self._broken.get(tv.uid)
            if broken is not None:
                failed: concurrent.futures.Future = concurrent.futures.Future()
                failed.set_exception(broken)
                return failed, False
            flight = self._flights.get(tv.uid)
            if flight is not None:
                return flight, False
            fut = self._flights[tv.uid] = concurrent.futures.Future()
            fut.set_running_or_notify_cancel()  # a waiter's cancel must not cancel the load the others wait for
            return fut, True

    def _run(self, tv: TaskVersion, fut: concurrent.futures.Future) -> None:
        t0 = time.perf_counter()
        try:
            stack = self._load(tv)
        except Exception as e:  # noqa: BLE001 - every waiter gets it; the version leaves service
            with self._lock:
                self._broken[tv.uid] = e
                del self._flights[tv.uid]
            self._emit("load_failed", time.perf_counter() - t0)
            if self.on_broken is not None:
                try:
                    self.on_broken(tv, e)
                except Exception:  # noqa: BLE001 - the waiters still get the load's error
                    log.exception("taking task %s version %d out of service failed", tv.name, tv.version)
            fut.set_exception(e)
            return
        with self._lock:
            tv.stack = stack
            self._add(tv)
            self.loads += 1
            del self._flights[tv.uid]
            self._trim(keep=tv.uid)
        self._emit("load", time.perf_counter() - t0)
        fut.set_result(None)

    # --- eviction ---

    def trim(self) -> None:
        """Evict least recently used versions no request holds until the tier fits its budget again."""
        with self._lock:
            self._trim(keep=None)

    def discard(self, tv: TaskVersion) -> None:
        """Drop a retired version's weights (the caller waits until no request holds it); not an eviction."""
        with self._lock:
            if self._resident.pop(tv.uid, None) is not None:
                self.bytes -= self._sizes.pop(tv.uid)
            self._broken.pop(tv.uid, None)
            if tv.source is not None:
                tv.stack = None

    def _add(self, tv: TaskVersion) -> None:  # under the lock
        if tv.uid not in self._resident:
            assert tv.stack is not None
            self._sizes[tv.uid] = tv.stack.nbytes
            self.bytes += self._sizes[tv.uid]
        self._resident[tv.uid] = tv
        self._resident.move_to_end(tv.uid)

    def _trim(self, keep: Optional[int]) -> None:  # under the lock
        if self.bytes <= self.budget:
            return
        for uid, tv in list(self._resident.items()):
            if self.bytes <= self.budget:
                break
            if uid == keep or tv.inflight > 0 or tv.name in self.pinned or tv.source is None:
                continue  # just loaded for its caller, held by a request, pinned, or with no disk copy to reload
            del self._resident[uid]
            self.bytes -= self._sizes.pop(uid)
            tv.stack = None
            self.evictions += 1
            self._emit("eviction", 0.0)

    def _emit(self, event: str, seconds: float) -> None:
        if self.on_event is not None:
            self.on_event(event, seconds)
