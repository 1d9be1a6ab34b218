"""One owner for what a request holds: its in-flight slot, queue slots, clip bytes and task versions.

Every RPC runs inside ``async with admission.request() as ticket``. Entering takes
the in-flight slot (or raises UNAVAILABLE while draining); the ticket then takes,
as the request gets to them, clip bytes (:meth:`Ticket.hold`) and queue slots with
their task version (:meth:`Ticket.take_slot`). Leaving the block, by any path
(answer, error, client cancel, deadline, closed channel: all raise through it),
gives back everything still held, in one place, and frees the clip buffers it owns
(:meth:`Ticket.own`). A slot may be given back earlier
(a computed clip leaves the queue while its request still runs); giving back twice
is a no-op, so no path counts anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Sequence, Union

from server.errors import BadRequest, Draining, QueueFull, TaskNotFound
from server.limits import ServerLimits
from server.registry.registry import TaskRegistry, TaskVersion


class Slot:
    """One queue slot and the task version captured with it (``tv``); :meth:`release` is idempotent."""

    def __init__(self, admission: "Admission", tv: TaskVersion):
        self._admission = admission
        self.tv = tv
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.pending -= 1
            self.tv.release()


class Ticket:
    """What one request holds; an async context manager (see the module docstring)."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._slots: list[Slot] = []
        self.bytes = 0  # clip bytes this request holds against the budget
        self._buffers: list[Union[bytearray, memoryview]] = []  # freed by close()
        self._entered = False

    async def __aenter__(self) -> "Ticket":
        a = self._admission
        if a.draining:
            raise Draining("server is draining (shutting down); retry on another replica")
        a.inflight += 1
        a.idle.clear()
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give back everything (the slots, then the bytes, then the in-flight slot); idempotent."""
        for s in self._slots:
            s.release()
        self._slots.clear()
        self.free(self.bytes)
        for buf in self._buffers:
            with contextlib.suppress(BufferError):  # still exported (a hash in a thread): its references free it
                buf.release() if isinstance(buf, memoryview) else buf.clear()
        self._buffers.clear()
        if self._entered:
            self._entered = False
            a = self._admission
            a.inflight -= 1
            if a.inflight == 0:
                a.idle.set()

    def hold(self, n: int) -> None:
        """Count ``n`` more clip bytes against the budget, or refuse them (then nothing more is held)."""
        a, limit = self._admission, self._admission.limits.max_inflight_clip_bytes
        if self.bytes + n > limit:
            raise BadRequest(f"one request carries {self.bytes + n} bytes of clips, above the server's "
                             f"--max-inflight-clip-bytes of {limit}; send fewer or smaller clips per call")
        if a.held_bytes + n > limit:
            raise QueueFull(f"clips in flight already hold {a.held_bytes} bytes; {n} more would pass the limit "
                            f"of {limit} (--max-inflight-clip-bytes); retry later")
        a.held_bytes += n
        self.bytes += n

    def own(self, clip: Union[bytes, bytearray, memoryview]) -> None:
        """Free ``clip``'s memory when the request ends (a view is released, a bytearray emptied), whatever
        still refers to it then; a ``bytes`` object cannot be freed early and is left to its references.

        A request that fails leaves its handler frames in reference cycles (gRPC's abort keeps its exception
        on the call's state, and the exception's traceback holds the frames, which hold the clip), which only
        the cycle collector frees. Megabyte-sized clips freed at such random times fragment the heap: the
        server's RSS crept with every refused input (``python -m bench.refused_rss``)."""
        if isinstance(clip, (bytearray, memoryview)):
            self._buffers.append(clip)

    def free(self, n: int) -> None:
        """Give back ``n`` of the bytes this request holds (e.g. a buffer dropped before the request ends)."""
        n = min(n, self.bytes)
        self.bytes -= n
        self._admission.held_bytes -= n

    def take_slot(self, task: str) -> Slot:
        """A queue slot and the task's current version (UNAVAILABLE, INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
        NOT_FOUND otherwise); held until :meth:`Slot.release` or the end of the request."""
        a = self._admission
        if a.draining:
            raise Draining("server is draining (shutting down); retry on another replica")
        if not task:
            raise BadRequest("the request names no task")
        if a.pending >= a.limits.max_queue_size:
            raise QueueFull(f"queue is full ({a.limits.max_queue_size} requests waiting, --max-queue-size); "
                            "retry later")
        tv = a.registry.acquire(task)
        a.pending += 1
        slot = Slot(a, tv)
        self._slots.append(slot)
        return slot

    def take_slots(self, tasks: Sequence[str]) -> list[Union[Slot, TaskNotFound]]:
        """One queue slot per task of a several-task request, all or none: a draining server or a queue
        without room for every task refuses the whole request; an unknown task is that item's NOT_FOUND
        (it takes no slot). The caller has checked the names (``ServerLimits.check_tasks``)."""
        a = self._admission
        if a.draining:
            raise Draining("server is draining (shutting down); retry on another replica")
        if a.pending + len(tasks) > a.limits.max_queue_size:
            raise QueueFull(f"queue has no room for {len(tasks)} tasks ({a.pending} of {a.limits.max_queue_size} "
                            "slots taken, --max-queue-size; each task of a request takes one); retry later")
        out: list[Union[Slot, TaskNotFound]] = []
        for task in tasks:
            try:
                out.append(self.take_slot(task))
            except TaskNotFound as e:
                out.append(e)
        return out


class Admission:
    """The counters all requests share: ``inflight`` RPCs, ``pending`` queue slots, ``held_bytes``."""

    def __init__(self, registry: TaskRegistry, limits: ServerLimits):
        self.registry = registry
        self.limits = limits
        self.inflight = 0  # every RPC in progress (drain waits for 0)
        self.pending = 0  # admitted, not yet computed
        self.held_bytes = 0  # encoded clip bytes held by requests in progress
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def request(self) -> Ticket:
        return Ticket(self)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
