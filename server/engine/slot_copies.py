"""The stream order of the slot writes (CUDA): a cold task's weights copied into its device slot.

An activation is written on the staging side stream (``ModelRunner``'s, passed to
:meth:`server.engine.slots.AdapterSlots.lease`) from a pinned host copy, so it neither waits for
the forward in flight on the compute stream nor blocks the staging thread; CUDA events order it:

* the forward that reads a slot waits for the slot's last write (:meth:`SlotCopies.await_writes`);
* a slot is written only after the last forward that read it (an event recorded on the compute
  stream when a lease ends, :meth:`SlotCopies.record_use`), also once it was evicted or retired;
* a bank reallocation (grow, re-pad, shrink: on the compute stream) first waits for the bank's
  writes, and the next writes wait for it;
* the activation time is the copy's own: events around it on the side stream, read once they
  have completed (:meth:`SlotCopies.finished`), never by waiting.

The pinned host copy is made per activation, in the serving dtype, by torch's caching host
allocator (as the batch input is): its block is reused only once the copy from it has ended, so
the pinned bytes held are those of the activations in flight (one slot each, rounded up by the
allocator), not of every registered version, as pinning each version's host stack would be.

On a device without streams (CPU) every method is a no-op and a write is the plain synchronous
copy it always was, timed by the wall clock.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from stadapter.bank import AdapterStack, SlotBank

SlotKey = tuple[str, int]  # (adapter activation, slot)


def has_streams(device: torch.device) -> bool:
    """Whether copies to ``device`` run on streams ordered by events (CUDA); the one place that decides."""
    return device.type == "cuda"


def pinned_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host buffer from torch's caching host allocator."""
    return torch.empty(numel, dtype=dtype, pin_memory=True)


def pinned_copy(stack: AdapterStack, dtype: torch.dtype) -> AdapterStack:
    """``stack`` converted to ``dtype`` in one pinned buffer (its tensors are views of it)."""
    parts = [t for s in stack.slots.values() for t in s.tensors()] + [stack.head_w, stack.head_b]
    flat = pinned_empty(sum(t.numel() for t in parts), dtype)
    views, at = {}, 0
    for t in parts:
        views[id(t)] = flat[at:at + t.numel()].view(t.shape)
        views[id(t)].copy_(t)
        at += t.numel()
    return AdapterStack({k: s.map(lambda t: views[id(t)]) for k, s in stack.slots.items()}, views[id(stack.head_w)],
                        views[id(stack.head_b)], stack.num_classes, stack.activation)


class SlotCopies:
    """Events of one device's slot writes and uses (see the module docstring); the caller holds its lock."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.streams = has_streams(device)
        self._written: dict[SlotKey, Any] = {}  # the slot's last write (side stream)
        self._used: dict[SlotKey, Any] = {}  # the slot's last use (compute stream)
        self._last_write: dict[str, Any] = {}  # the bank's last write
        self._layout: dict[str, Any] = {}  # the bank's last reallocation (compute stream)
        self._timing: list[tuple[Any, Any]] = []  # (start, end) of the activation copies not yet reported

    def host_copy(self, stack: AdapterStack) -> AdapterStack:
        """What a write copies from: a pinned copy in the serving dtype (streams), else the host stack itself."""
        return pinned_copy(stack, self.dtype) if self.streams else stack

    def write(self, bank: SlotBank, slot: int, stack: AdapterStack, stream: Any = None) -> Optional[float]:
        """Write ``stack`` into ``slot`` on ``stream`` (default: the current one) after the slot's last use.

        Returns the wall seconds of the copy without streams; with streams None (:meth:`finished` tells)."""
        if not self.streams:
            t0 = time.perf_counter()
            bank.write(slot, stack)
            return time.perf_counter() - t0
        key = (bank.activation, slot)
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            for event in (self._layout.get(bank.activation), self._used.get(key)):
                if event is not None:
                    stream.wait_event(event)
            start.record(stream)
            bank.write(slot, stack)
            end.record(stream)
        self._written[key] = self._last_write[bank.activation] = end
        self._timing.append((start, end))
        return None

    def writes_of(self, act: str, slots: list[int]) -> list[Any]:
        """The events a forward over these slots waits for: their last writes and the bank's last reallocation."""
        if not self.streams:
            return []
        events = [self._written.get((act, s)) for s in slots] + [self._layout.get(act)]
        return list({id(e): e for e in events if e is not None}.values())

    def await_writes(self, events: list[Any]) -> Any:
        """The current stream (the reader's) waits for these writes; returns it (None without streams)."""
        if not self.streams:
            return None
        reader = torch.cuda.current_stream(self.device)
        for event in events:
            reader.wait_event(event)
        return reader

    def record_use(self, reader: Any, act: str, slots: list[int]) -> None:
        """A forward that read these slots was enqueued on ``reader``: their next writes wait for it."""
        if reader is None:
            return
        used = torch.cuda.Event()
        used.record(reader)
        for s in slots:
            self._used[(act, s)] = used

    def before_reshape(self, act: str) -> None:
        """The bank is about to be reallocated on the current stream: wait for its writes first."""
        if self.streams and act in self._last_write:
            torch.cuda.current_stream(self.device).wait_event(self._last_write[act])

    def after_reshape(self, act: str) -> None:
        """The bank was reallocated on the current stream: later writes wait for it (it follows every earlier
        use and, by :meth:`before_reshape`, every earlier write, so the per-slot events are done with)."""
        if not self.streams:
            return
        layout = torch.cuda.Event()
        layout.record(torch.cuda.current_stream(self.device))
        self._layout[act] = layout
        for table in (self._written, self._used):
            for key in [k for k in table if k[0] == act]:
                del table[key]
        self._last_write.pop(act, None)

    def finished(self) -> list[float]:
        """The seconds of the activation copies that have completed since the last call, oldest first."""
        done = []
        while self._timing and self._timing[0][1].query():
            start, end = self._timing.pop(0)
            done.append(start.elapsed_time(end) / 1e3)
        return done
