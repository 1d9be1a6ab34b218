"""Activation copies (a cold task's weights written into its device slot) in CUDA stream order, checked on CPU.

torch's stream and event calls, and the pinned allocation, are replaced by fakes that log what is done on
which stream; the project's code and the copies themselves run as they are (on CPU tensors). On CUDA the
write must run on the staging side stream from pinned memory (not on the compute stream from pageable
memory, where it waits for the forward in flight), the forward must wait for it, a slot must not be
rewritten before the last forward that read it, and the activation time must be the copy's own.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from factories import task_versions

from server.engine import model as model_module
from server.engine import slot_copies
from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots
from stadapter import AdapterConfig
from stadapter.bank import SlotBank

CPU = torch.device("cpu")
CFG = AdapterConfig(width=8, pre_attn=True, pre_mlp=True)
WIDER = AdapterConfig(width=16, pre_attn=True, pre_mlp=True)


class _Stream:
    def __init__(self, name: str, log: list):
        self.name, self._log = name, log

    def wait_event(self, event) -> None:
        self._log.append(("wait", self.name, event))

    def __repr__(self) -> str:
        return self.name


class _Event:
    count = 0

    def __init__(self, log: list, enable_timing: bool = False):
        _Event.count += 1
        self.name, self._log, self.timing, self.done = f"e{_Event.count}", log, enable_timing, True

    def record(self, stream=None) -> None:
        self._log.append(("record", stream.name, self))

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: "_Event") -> float:
        return 12.5  # ms

    def __repr__(self) -> str:
        return self.name


class FakeCuda:
    """The CUDA calls the slots and the runner make, logged: ("wait"|"record", stream, event), ("pinned", ...),
    ("write", slot, stream, from_pinned), ("reserve", stream), ("forward", stream)."""

    def __init__(self, monkeypatch, slots_lock_probe=None):
        self.log: list[tuple] = []
        self.compute = _Stream("compute", self.log)
        self.current = self.compute
        self.pinned: list[torch.Tensor] = []
        self.lock_held_while_pinning: list[bool] = []
        self.lock_probe = slots_lock_probe
        for module in (slot_copies, model_module):
            monkeypatch.setattr(module, "has_streams", lambda device: True, raising=False)
        monkeypatch.setattr(slot_copies, "pinned_empty", self._pinned)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream("side", self.log))
        monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False: _Event(self.log, enable_timing))
        monkeypatch.setattr(torch.cuda, "stream", self._stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
        real_write = SlotBank.write

        def write(bank, slot, stack):
            ptrs = {t.untyped_storage().data_ptr() for s in stack.slots.values() for t in s.tensors()}
            ptrs |= {stack.head_w.untyped_storage().data_ptr(), stack.head_b.untyped_storage().data_ptr()}
            pinned = {p.untyped_storage().data_ptr() for p in self.pinned}
            self.log.append(("write", slot, self.current.name, ptrs <= pinned))
            real_write(bank, slot, stack)

        monkeypatch.setattr(SlotBank, "write", write)
        real_reserve = SlotBank.reserve

        def reserve(bank, *args, **kw):
            self.log.append(("reserve", self.current.name))
            real_reserve(bank, *args, **kw)

        monkeypatch.setattr(SlotBank, "reserve", reserve)

    def _pinned(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.lock_probe is not None:
            self.lock_held_while_pinning.append(self.lock_probe().locked())
        t = torch.empty(numel, dtype=dtype)
        self.pinned.append(t)
        self.log.append(("pinned", numel, dtype))
        return t

    @contextlib.contextmanager
    def _stream(self, stream):
        saved, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = saved

    def index(self, entry: tuple) -> int:
        return self.log.index(entry)

    def first(self, kind: str, *rest) -> tuple:
        return next(e for e in self.log if e[0] == kind and e[1:1 + len(rest)] == rest)


class _LoggedTrunk:
    """The trunk, logging each forward and the stream it is enqueued on."""

    def __init__(self, trunk, cuda: FakeCuda):
        self._trunk, self._cuda = trunk, cuda

    def __call__(self, *args, **kw):
        self._cuda.log.append(("forward", self._cuda.current.name))
        return self._trunk(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._trunk, name)


def _clip(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _alone(trunk, tv, views) -> torch.Tensor:
    with torch.no_grad():
        return trunk(views, tv.host_stack).softmax(-1).mean(0)


def _runner(trunk, cuda: FakeCuda, slots: AdapterSlots) -> ModelRunner:
    cuda.lock_probe = lambda: slots._lock
    return ModelRunner(_LoggedTrunk(trunk, cuda), slots)


def test_a_cold_task_is_written_on_the_side_stream_from_pinned_memory_and_the_forward_waits_for_it(
        tiny_trunk, tmp_path, monkeypatch):
    (tv,) = task_versions(tiny_trunk, tmp_path, [(CFG, 3)])
    cuda = FakeCuda(monkeypatch)
    runner = _runner(tiny_trunk, cuda, AdapterSlots(1 << 20, CPU, torch.float32))
    v = _clip(0)
    out = runner.forward([(tv, v)])
    torch.testing.assert_close(out.probs[0], _alone(tiny_trunk, tv, v), atol=1e-5, rtol=0)
    numel = sum(t.numel() for s in tv.host_stack.slots.values() for t in s.tensors()) + tv.host_stack.head_w.numel() \
        + tv.host_stack.head_b.numel()
    assert ("pinned", numel, torch.float32) in cuda.log  # one pinned buffer, in the bank's dtype
    assert cuda.lock_held_while_pinning == [False]  # the host copy is made outside the slots lock
    write = cuda.first("write")
    assert write[2:] == ("side", True), cuda.log  # on the side stream, every tensor from the pinned buffer
    written = next(e for e in cuda.log[cuda.index(write):] if e[:2] == ("record", "side"))[2]  # after the copies
    forward = cuda.index(("forward", "compute"))
    assert cuda.index(("wait", "compute", written)) < forward  # the forward waits for the write
    use = next(e for e in cuda.log[forward:] if e[:2] == ("record", "compute"))  # and its use is recorded after it
    assert not use[2].timing


@pytest.mark.parametrize("how", ["evicted", "retired"])
def test_a_slot_is_rewritten_only_after_the_last_forward_that_read_it(tiny_trunk, tmp_path, monkeypatch, how):
    a, b = task_versions(tiny_trunk, tmp_path, [(CFG, 3), (CFG, 3)])  # one shape: b's write re-pads nothing
    cuda = FakeCuda(monkeypatch)
    slots = AdapterSlots(0, CPU, torch.float32, slots=1)
    runner = _runner(tiny_trunk, cuda, slots)
    v = _clip(1)
    staged = runner.stage([(a, v)])
    if how == "retired":
        slots.discard(a)  # retired while its forward is staged: freed when the lease ends
    runner.run(staged)
    forward = cuda.index(("forward", "compute"))
    used = next(e for e in cuda.log[forward:] if e[:2] == ("record", "compute"))[2]
    assert not slots.is_resident(a) if how == "retired" else slots.is_resident(a)
    mark = len(cuda.log)
    out = runner.forward([(b, v)])  # the one slot again
    write_b = cuda.log.index(("write", 0, "side", True), mark)
    assert ("wait", "side", used) in cuda.log[mark:write_b], cuda.log[mark:]  # the side stream waits for a's use
    assert slots.evictions == (1 if how == "evicted" else 0)
    torch.testing.assert_close(out.probs[0], _alone(tiny_trunk, b, v), atol=1e-5, rtol=0)


def test_a_bank_reallocation_waits_for_its_writes_and_the_next_write_for_it(tiny_trunk, tmp_path, monkeypatch):
    """A wider task re-pads the bank on the compute stream: its copy of the slots must follow their writes on the
    side stream, and the wider task's own write must follow the re-padding (which allocates and zeroes)."""
    a, b = task_versions(tiny_trunk, tmp_path, [(CFG, 3), (WIDER, 4)])
    cuda = FakeCuda(monkeypatch)
    slots = AdapterSlots(1 << 20, CPU, torch.float32)
    side = _Stream("side", cuda.log)  # the leases' stream, as ModelRunner passes its side stream
    slots.lease([a], stream=side).end()
    written_a = next(e for e in cuda.log[cuda.index(cuda.first("write")):] if e[:2] == ("record", "side"))[2]
    mark = len(cuda.log)
    with slots.lease([b], stream=side):
        pass
    tail = cuda.log[mark:]
    wait_writes = tail.index(("wait", "compute", written_a))
    repad = tail.index(("reserve", "compute"))
    assert wait_writes < repad, tail  # the re-padding copies a's slot only once a's write is done
    layout = next(e for e in tail[repad:] if e[:2] == ("record", "compute"))[2]
    write_b = next(i for i, e in enumerate(tail) if e[0] == "write")
    assert tail.index(("wait", "side", layout)) < write_b, tail
    for tv in (a, b):
        assert slots.is_resident(tv)


def test_the_activation_time_is_the_copy_between_its_events_told_once_it_completed(tiny_trunk, tmp_path, monkeypatch):
    (tv,) = task_versions(tiny_trunk, tmp_path, [(CFG, 3)])
    cuda = FakeCuda(monkeypatch)
    told: list[tuple[str, float]] = []
    slots = AdapterSlots(1 << 20, CPU, torch.float32, on_event=lambda e, s: told.append((e, s)))
    lease = slots.lease([tv])
    start, end = (e[2] for e in cuda.log if e[0] == "record" and e[2].timing)
    write = cuda.index(cuda.first("write"))
    assert cuda.index(("record", "compute", start)) < write < cuda.index(("record", "compute", end))
    end.done = False  # the copy is still running: nothing is told, nothing waits for it
    slots.report_copies()
    assert slots.activations == 1 and told == []
    end.done = True
    lease.end()
    assert told == [("activation", 0.0125)]  # the events' elapsed 12.5 ms


def test_on_cpu_a_write_is_the_plain_copy_timed_by_the_wall_clock(tiny_trunk, tmp_path, monkeypatch):
    """No streams on a CPU: nothing is pinned, no event is made, the activation is told at once."""
    (tv,) = task_versions(tiny_trunk, tmp_path, [(CFG, 3)])

    def refuse(*a, **k):
        raise AssertionError("a CUDA call on CPU")

    monkeypatch.setattr(slot_copies, "pinned_empty", refuse)
    monkeypatch.setattr(torch.cuda, "Event", refuse)
    monkeypatch.setattr(torch.cuda, "current_stream", refuse)
    told: list[tuple[str, float]] = []
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32, on_event=lambda e, s: told.append((e, s))))
    lease = runner.slots.lease([tv])
    assert [e for e, _ in told] == ["activation"] and told[0][1] > 0
    lease.end()
    v = _clip(2)
    torch.testing.assert_close(runner.forward([(tv, v)]).probs[0], _alone(tiny_trunk, tv, v), atol=1e-5, rtol=0)
