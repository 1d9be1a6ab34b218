"""Device and dtype choices on CUDA, checked on CPU: the CUDA calls are replaced at torch's lowest layer (the
driver call, the device properties), so the project's own code and torch's argument handling run as they would."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.engine.model import resolve_dtype
from training.distributed import amp_dtype, setup_dist


def _fake_cuda(monkeypatch, current: int = 0, emulated: bool = True) -> list[int]:
    """Two GPUs: 0 a T4-like card (compute capability 7.5: bf16 only emulated, if ``emulated``), 1 an Ampere one
    (8.0); ``current`` is the current device. Returns the indices torch.cuda.set_device hands to the driver."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    set_to: list[int] = []
    majors = {0: 7, 1: 8}

    def properties(d=None):
        index = getattr(d, "index", d)
        return SimpleNamespace(major=majors[current if index is None else index])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", set_to.append, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: emulated, raising=False)
    return set_to


def test_a_plain_cuda_device_is_given_an_index_before_set_device(monkeypatch):
    """``--device cuda`` in one process: torch.cuda.set_device refuses a device without an index (ValueError, before
    any GPU work), so `python -m training.train --device cuda` exited 2."""
    fake_cuda = _fake_cuda(monkeypatch)
    d = setup_dist("cuda")
    assert d.device == torch.device("cuda", 0) and fake_cuda == [0]
    assert setup_dist("cuda:1").device == torch.device("cuda", 1) and fake_cuda == [0, 1]


@pytest.mark.parametrize("current, device, emulated, want", [
    (0, 0, True, torch.float16),  # a T4: emulated bf16 counted as support before
    (1, 0, False, torch.float16),  # serving on the T4 while the current device is the Ampere card
    (0, 1, False, torch.bfloat16),  # serving on the Ampere card while the current device is the T4
])
def test_bf16_only_where_the_serving_device_has_it_natively(monkeypatch, current, device, emulated, want):
    """bf16 on compute capability 8.0 and newer; fp16 on a card that only emulates bf16 (slowly); asked of the
    device that serves or trains, not of the current one."""
    _fake_cuda(monkeypatch, current, emulated)
    dev = torch.device("cuda", device)
    assert resolve_dtype("auto", dev) == want
    assert amp_dtype(dev) == want


def test_cpu_keeps_float32_and_no_autocast():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32 and amp_dtype(torch.device("cpu")) is None
