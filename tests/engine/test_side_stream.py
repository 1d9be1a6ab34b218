"""The staging side stream (CUDA), checked on CPU: torch's stream calls are replaced, the project's code runs as is.

Tensors made on the side stream and read by the forward on the compute stream must be recorded on it
(``Tensor.record_stream``): otherwise the caching allocator may hand their blocks to the next staging copy
while the forward still reads them.
"""

from __future__ import annotations

import dataclasses

import torch
from factories import task_versions

from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots
from stadapter import AdapterConfig

CPU = torch.device("cpu")
LAST_BLOCK = AdapterConfig(width=8, pre_attn=True, pre_mlp=True, layers=1)  # the tiny trunk has 2 blocks


class _Stream:
    def __init__(self):
        self.waited: list[object] = []

    def wait_event(self, event) -> None:
        self.waited.append(event)


def test_every_side_stream_tensor_of_a_staged_batch_is_recorded_on_the_compute_stream(tiny_trunk, tmp_path,
                                                                                      monkeypatch):
    tvs = task_versions(tiny_trunk, tmp_path, [(LAST_BLOCK, 3), (LAST_BLOCK, 4)])
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, CPU, torch.float32))  # gather: the one mixed path
    views = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    staged = runner.stage([(tvs[0], views), (tvs[1], views)])  # one clip, two tasks: a mixed, shared-prefix batch
    assert staged.task_index is not None and staged.row_input is not None
    ready, compute = object(), _Stream()
    recorded: list[tuple[torch.Tensor, object]] = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append((self, stream)))
    out = runner.run(dataclasses.replace(staged, ready=ready))  # as if its copies ran on a side stream
    assert compute.waited == [ready]
    on_compute = {id(t) for t, stream in recorded if stream is compute}
    for name in ("frames", "task_index", "row_input"):
        assert id(getattr(staged, name)) in on_compute, f"{name} is not recorded on the compute stream"
    assert out.shared_rows == 1 and len(out.probs) == 2
