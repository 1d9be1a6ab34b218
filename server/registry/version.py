"""One version of one task (:class:`TaskVersion`): what the registry publishes and a request captures."""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from stadapter.bank import AdapterStack
from stadapter.config import TaskSpec

PUBLISHED_LINES_MAX = 20  # versions published at once (by a sync, a register) that each get an INFO line


class WeightsSource(Protocol):
    """Where a version's weights come from when they are not in host memory (``server.registry.host_tier``)."""

    def load_now(self, tv: "TaskVersion") -> AdapterStack: ...


@dataclass(eq=False)
class TaskVersion:
    """One version of one task: its spec and, while it is in host memory, its adapter stack.

    ``stack`` is the host-memory adapter stack, or None while the weights are on disk only: the
    registry's scan reads no weights, and its :class:`~server.registry.host_tier.HostTier` (``source``)
    loads them on first use and may evict them again when no request holds the version.
    :attr:`host_stack` is the stack, loaded on the calling thread if it is not in memory (the server
    loads it off the event loop first, ``HostTier.ensure``, so the model thread finds it there).

    ``inflight`` counts admitted requests still running on this version; ``retired``
    is set when the version leaves the table (replaced or unregistered). ``uid`` is
    given once, at construction: it names this version (a task unregistered
    and registered again is another version) in the device slots and the host tier.
    """

    spec: TaskSpec
    stack: Optional[AdapterStack]
    path: Path
    nbytes: int
    digest: str = ""  # sha256 of the bundle's files as stored: replicas compare content, not only numbers
    source: Optional[WeightsSource] = None  # loads ``stack`` when it is None
    inflight: int = 0
    retired: bool = False
    _on_idle: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    uid: int = field(default_factory=lambda: _new_uid(), init=False)

    @property
    def key(self) -> tuple[str, int]:
        return (self.spec.name, self.spec.version)

    @property
    def host_stack(self) -> AdapterStack:
        """The adapter stack in host memory (loaded now, on this thread, if it is only on disk)."""
        stack = self.stack
        if stack is not None:
            return stack
        if self.source is None:
            raise RuntimeError(f"task {self.name} version {self.version} has no weights in memory and no source")
        return self.source.load_now(self)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.spec.version

    def acquire(self) -> None:
        with self._lock:
            self.inflight += 1

    def release(self) -> None:
        with self._lock:
            self.inflight -= 1
            run = self._take_idle_callbacks()
        for fn in run:
            fn()

    def when_idle(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once no request runs on this version (now, if none does)."""
        with self._lock:
            self._on_idle.append(fn)
            run = self._take_idle_callbacks()
        for f in run:
            f()

    def _take_idle_callbacks(self) -> list[Callable[[], None]]:
        if self.inflight > 0 or not self._on_idle:
            return []
        run, self._on_idle = self._on_idle, []
        return run


_uids = itertools.count(1)
_uid_lock = threading.Lock()


Seen = Callable[[TaskVersion], None]  # given each version a scan reads (``TaskRegistry.sync``)


def _new_uid() -> int:
    with _uid_lock:
        return next(_uids)


def log_published(log: logging.Logger, published: list[TaskVersion]) -> None:
    """An INFO line per version just published, or for more than :data:`PUBLISHED_LINES_MAX` at once (a first scan
    of a large repository) one line with their count and bytes, each version's own line at DEBUG."""
    bulk = len(published) > PUBLISHED_LINES_MAX
    if bulk:
        log.info("serving %d task versions (%d adapter bytes in all; each named at DEBUG)", len(published),
                 sum(tv.nbytes for tv in published))
    for tv in published:
        log.log(logging.DEBUG if bulk else logging.INFO, "serving task %s version %d (%d adapter bytes)", tv.name,
                tv.version, tv.nbytes)
