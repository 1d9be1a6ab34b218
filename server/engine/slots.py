"""Which task version lives in which device slot: activation, LRU eviction, retirement.

The tensors are :class:`stadapter.bank.SlotBank`'s (one bank per adapter activation:
tasks of different activations never share a forward). This module is the policy:

* a version is *activated* by copying its host stack (:attr:`TaskVersion.host_stack`,
  kept for the life of the version) into a free slot; a version already in a slot is
  a hit. On CUDA the copy runs on the staging side stream from a pinned copy, ordered by
  events against the forwards that read the slot (:mod:`server.engine.slot_copies`);
* the bank's size limit has one owner: with ``slots`` (``--adapter-slots N``) it holds
  exactly that many slots, allocated when its first task arrives, whatever their bytes;
  without it (0) it grows in chunks of ``chunk`` slots up to what ``budget_bytes`` (the
  ``--cache-bytes`` budget) allows. Past the limit the least recently used version not
  needed by the batch being prepared is *evicted* (its slot is reused; the host copy
  stays). A batch that needs more distinct tasks than that still runs: the bank then
  grows past the limit by what it lacks, and shrinks back to it after that batch
  (least recently used evicted, residents moved down);
* a retired version (replaced or unregistered) leaves its slot when its last
  request ends (:meth:`retire`), also when a request admitted before the swap
  brought it back in after the registry retired it.

Leases are taken where a batch is staged (the batcher's staging thread, or the model
thread), are entered (``with lease:``) on the stream that computes, and end on the model
thread; two may be live at once, the computing batch's and the next one's, so a slot is
pinned by a count of leases. ``discard``/``retire`` and the metric reads may come from
other threads, so the bookkeeping is under one lock (on CUDA never across a copy: the
pinned host copies are made before it is taken, the writes only enqueued), and a version
in use by a live lease is discarded when its last lease ends. A bank grown past the
budget shrinks back when no lease is live (the model idle between batches).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Collection, Optional, Sequence

import torch

from server.engine.slot_copies import SlotCopies
from server.registry.registry import TaskVersion
from stadapter.bank import AdapterStack, SlotBank, TaskShape

DEFAULT_CHUNK = 8  # slots added per growth step
BANK_SHARE = 0.5  # of the device's free memory the slot banks may take at their peak; the rest is the forwards'


class SlotMemoryError(ValueError):
    """The requested slots cannot fit the device's free memory (refused at start, not inside every batch)."""


def free_device_bytes(device: torch.device) -> Optional[int]:
    """The free memory of a CUDA device (``torch.cuda.mem_get_info``); None elsewhere (nothing is checked there)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


@dataclass(frozen=True)
class Placement:
    activation: str
    slot: int


class Lease:
    """The slots of one forward's versions, pinned until the lease ends."""

    def __init__(self, owner: "AdapterSlots", bank: SlotBank, slots: dict[int, int], writes: Optional[list] = None):
        self._owner = owner
        self.bank = bank
        self.slots = slots  # version uid -> slot
        self._writes = writes or []  # the events of these slots' writes (CUDA)
        self._reader = None  # the stream that reads the slots, once entered (CUDA)

    def __enter__(self) -> "Lease":
        self.use()
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    def use(self) -> None:
        """The forward over these slots is about to be enqueued on the current stream: it waits for their writes."""
        self._reader = self._owner._copies.await_writes(self._writes)

    def end(self) -> None:
        """Unpin these slots (once per lease: a staged batch ends it when it runs or is released); once used, their
        next writes wait for the forward enqueued meanwhile."""
        self._owner._unpin(self.bank.activation, self.slots, self._reader)


class AdapterSlots:
    """Device slots for task adapters, sized by a byte budget (see the module docstring).

    Args:
        budget_bytes: device bytes the banks may hold together (exceeded only by a batch that needs more tasks);
            not used when ``slots`` is set.
        device, dtype: where and in which dtype adapters are served.
        slots: the fixed number of slots of each bank (one bank per adapter activation); 0 = size by
            ``budget_bytes``.
        chunk: slots added per growth step.
        on_event: ``(event, seconds)`` with event ``hit`` | ``activation`` | ``eviction`` | ``discard``
            (seconds: the copy time for an activation, else 0; on CUDA the copy's time on the device, told
            once it has completed).
    """

    def __init__(self, budget_bytes: int, device: torch.device, dtype: torch.dtype, chunk: int = DEFAULT_CHUNK,
                 on_event: Optional[Callable[[str, float], None]] = None, slots: int = 0):
        if chunk < 1:
            raise ValueError(f"AdapterSlots: chunk must be >= 1, got {chunk}")
        if not isinstance(slots, int) or slots < 0:
            raise ValueError(f"AdapterSlots: slots must be an int >= 0 (0 = size by the byte budget), got {slots!r}")
        self.budget = int(budget_bytes)
        self.fixed_slots = slots
        self.device = device
        self.dtype = dtype
        self.chunk = chunk
        self.on_event = on_event
        self._banks: dict[str, SlotBank] = {}
        self._free: dict[str, list[int]] = {}
        self._where: "OrderedDict[int, Placement]" = OrderedDict()  # uid -> placement, least recently used first
        self._pinned: Counter[int] = Counter()  # uid -> leases holding it (a staged batch and the one computing)
        self._doomed: set[int] = set()  # discarded while pinned: freed when the lease ends
        self._lock = threading.Lock()
        self._copies = SlotCopies(device, dtype)  # the writes' stream order (CUDA; no-ops elsewhere)
        self.hits = self.activations = self.evictions = 0
        free = free_device_bytes(device)
        if free is not None and not slots:  # the budget's bank at its peak (old and new during a reserve) must fit
            self.budget = min(self.budget, int(free * BANK_SHARE) // 2)

    # --- reading (any thread) ---

    @property
    def bytes(self) -> int:
        """Device bytes of all banks' tensors (used and free slots)."""
        with self._lock:
            return sum(b.nbytes for b in self._banks.values())

    @property
    def used(self) -> int:
        with self._lock:
            return len(self._where)

    @property
    def free(self) -> int:
        with self._lock:
            return sum(len(f) for f in self._free.values())

    def resident(self) -> list[int]:
        """uids of the versions in a slot, least recently used first."""
        with self._lock:
            return list(self._where)

    def is_resident(self, tv: TaskVersion) -> bool:
        with self._lock:
            return tv.uid in self._where

    # --- leasing (the model thread) ---

    def lease(self, tvs: Sequence[TaskVersion], stream=None) -> Lease:
        """Activate these versions (all of one adapter activation) and pin their slots for one forward.

        ``stream``: where the activation copies run on CUDA (the staging side stream; default the current one).
        """
        acts = {tv.host_stack.activation for tv in tvs}
        if len(acts) != 1:
            raise ValueError(f"tasks with different adapter activations {sorted(acts)} cannot share a batch")
        (act,) = acts
        hosts: dict[int, AdapterStack] = {}
        if self._copies.streams:  # the pinned copies of the cold versions, made outside the lock
            with self._lock:
                self._bank(act, tvs[0])  # a bank that cannot fit is refused first
                cold = [tv for tv in tvs if tv.uid not in self._where]
            hosts = {tv.uid: self._copies.host_copy(tv.host_stack) for tv in cold}
        with self._lock:
            self._report_copies()
            bank = self._bank(act, tvs[0])
            need = {tv.uid: tv for tv in tvs}
            self._pinned.update(need.keys())
            try:
                missing = [tv for tv in need.values() if tv.uid not in self._where]
                shapes = [TaskShape.of(tv.host_stack) for tv in missing]
                if any(not bank.fits(s) for s in shapes):
                    self._copies.before_reshape(act)
                    bank.reserve(bank.capacity, also_fit=shapes)  # a wider task: re-pad every slot once
                    self._copies.after_reshape(act)
                for uid in need:
                    if uid in self._where:
                        self._where.move_to_end(uid)
                        self.hits += 1
                        self._emit("hit", 0.0)
                for left, tv in enumerate(reversed(missing), 1):
                    slot = self._take_slot(act, shortage=left)
                    host = hosts[tv.uid] if tv.uid in hosts else self._copies.host_copy(tv.host_stack)
                    seconds = self._copies.write(bank, slot, host, stream)
                    self._where[tv.uid] = Placement(act, slot)
                    self.activations += 1
                    if seconds is not None:  # else told by _report_copies once the copy has completed
                        self._emit("activation", seconds)
                slots = {uid: self._where[uid].slot for uid in need}
                writes = self._copies.writes_of(act, list(slots.values()))
            except BaseException:
                self._drop_pins(need.keys())
                raise
        return Lease(self, bank, slots, writes)

    def report_copies(self) -> None:
        """Tell ``on_event`` the activation copies that have completed (CUDA; after a batch's copy back, say)."""
        with self._lock:
            self._report_copies()

    def _report_copies(self) -> None:  # under the lock
        for seconds in self._copies.finished():
            self._emit("activation", seconds)

    def check_fits(self, tvs: Sequence[TaskVersion]) -> None:
        """Refuse a fixed slot count (``--adapter-slots``) whose banks for these tasks cannot fit the device's memory.

        Each bank (one per adapter activation) holds every slot padded to the widest of its tasks, and
        re-padding it for a wider task (:meth:`SlotBank.reserve`) holds the old and the new bank at once: the
        banks together plus the largest once more must fit in ``BANK_SHARE`` of the device's free memory (with
        the banks already held counted as free). Nothing is checked on CPU, or for a byte budget (capped by
        the free memory when these slots are made). Raises :class:`SlotMemoryError`.
        """
        with self._lock:
            self._check_fits(tvs)

    def _check_fits(self, tvs: Sequence[TaskVersion]) -> None:  # under the lock
        free = free_device_bytes(self.device)
        if not self.fixed_slots or free is None or not tvs:
            return
        shapes: dict[str, list[TaskShape]] = {}
        dims: dict[str, int] = {}
        for tv in tvs:
            act = tv.host_stack.activation
            shapes.setdefault(act, []).append(TaskShape.of(tv.host_stack))
            dims[act] = int(tv.host_stack.head_w.shape[2])  # [K, C, d]
        held = sum(b.nbytes for b in self._banks.values())
        per_slot = {act: b.slot_bytes() for act, b in self._banks.items()}  # every bank has the n slots
        per_slot.update({act: (self._banks[act] if act in self._banks else SlotBank(dims[act], "meta", self.dtype, act))
                         .slot_bytes(sh) for act, sh in shapes.items()})
        n, peak_slot = self.fixed_slots, sum(per_slot.values()) + max(per_slot.values())
        avail = int((free + held) * BANK_SHARE)
        if n * peak_slot > avail:
            sizes = ", ".join(f"{b} bytes (adapter activation {act!r})" for act, b in per_slot.items())
            raise SlotMemoryError(
                f"--adapter-slots {n} does not fit {self.device}: a slot takes {sizes}, and {n} slots need "
                f"{n * peak_slot} bytes counting a re-padded bank held twice for a moment, but {BANK_SHARE:.0%} of the "
                f"{free + held} free bytes is {avail}: at most {avail // peak_slot} slots fit. Lower --adapter-slots, "
                f"or size the bank by --cache-bytes instead")

    def _bank(self, act: str, tv: TaskVersion) -> SlotBank:
        bank = self._banks.get(act)
        if bank is None:
            self._check_fits([tv])  # a first task of this activation after start: refused clearly, before allocating
            dim = int(tv.host_stack.head_w.shape[2])  # [K, C, d]
            bank = self._banks[act] = SlotBank(dim, self.device, self.dtype, act)
            self._free[act] = []
            if self.fixed_slots:
                self._grow(act, self.fixed_slots)  # every slot at once; the first lease pads them to its tasks
        return bank

    def _limit(self, act: str) -> int:
        """This bank's slots: the fixed count, else those that fit the budget beside the other banks (at least one)."""
        if self.fixed_slots:
            return self.fixed_slots
        others = sum(b.nbytes for a, b in self._banks.items() if a != act)
        return max(1, (self.budget - others) // max(self._banks[act].slot_bytes(), 1))

    def _take_slot(self, act: str, shortage: int) -> int:
        """A free slot of this bank; ``shortage``: slots this batch still needs, this one included."""
        bank, free = self._banks[act], self._free[act]
        if not free:
            limit = self._limit(act)
            if bank.capacity < limit:
                self._grow(act, min(limit, bank.capacity + self.chunk))
            elif not self._evict_one(act):
                self._grow(act, bank.capacity + shortage)  # every slot is needed by this batch: past the budget
        return free.pop()

    def _grow(self, act: str, capacity: int) -> None:
        bank = self._banks[act]
        old = bank.capacity
        self._copies.before_reshape(act)
        bank.reserve(capacity)
        self._copies.after_reshape(act)
        self._free[act].extend(range(capacity - 1, old - 1, -1))  # pop() hands out the lowest first

    def _evict_one(self, act: str) -> bool:
        for uid, where in self._where.items():
            if where.activation == act and uid not in self._pinned:
                self._release(uid)
                self.evictions += 1
                self._emit("eviction", 0.0)
                return True
        return False

    def _release(self, uid: int) -> None:
        where = self._where.pop(uid)
        self._banks[where.activation].clear(where.slot)
        self._free[where.activation].append(where.slot)

    def _drop_pins(self, uids: Collection[int]) -> None:
        self._pinned.subtract(uids)
        for uid in [u for u in uids if self._pinned[u] <= 0]:
            del self._pinned[uid]

    def _unpin(self, act: str, slots: dict[int, int], reader=None) -> None:
        with self._lock:
            self._copies.record_use(reader, act, list(slots.values()))
            self._report_copies()
            self._drop_pins(slots.keys())
            for uid in self._doomed - self._pinned.keys():
                self._doomed.discard(uid)
                if uid in self._where:
                    self._release(uid)
                    self._emit("discard", 0.0)
            if not self._pinned:
                for act in self._banks:
                    self._fit_budget(act)

    def _fit_budget(self, act: str) -> None:
        """After a batch that grew the bank past the budget: evict LRU, then move residents down and shrink."""
        bank, limit = self._banks[act], self._limit(act)
        if bank.capacity <= limit:
            return
        mine = [uid for uid, w in self._where.items() if w.activation == act]
        for uid in mine[: max(0, len(mine) - limit)]:
            self._release(uid)
            self.evictions += 1
            self._emit("eviction", 0.0)
        keep = [(uid, w.slot) for uid, w in self._where.items() if w.activation == act]
        self._copies.before_reshape(act)
        remap = bank.shrink([slot for _, slot in keep], limit)
        self._copies.after_reshape(act)
        for uid, slot in keep:
            self._where[uid] = Placement(act, remap[slot])
        self._free[act] = list(range(limit - 1, len(keep) - 1, -1))

    # --- retirement (any thread) ---

    def discard(self, tv: TaskVersion) -> None:
        """Free this version's slot now, or when the forward using it ends (not counted as an eviction)."""
        with self._lock:
            if tv.uid in self._pinned:
                self._doomed.add(tv.uid)
            elif tv.uid in self._where:
                self._release(tv.uid)
                self._emit("discard", 0.0)

    def retire(self, tv: TaskVersion) -> None:
        """A retired version leaves the device when its last request ends (now, if none runs)."""
        tv.when_idle(lambda: self.discard(tv))

    def _emit(self, event: str, seconds: float) -> None:
        if self.on_event is not None:
            self.on_event(event, seconds)

