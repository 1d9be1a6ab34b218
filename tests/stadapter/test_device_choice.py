"""Device and dtype choices on CUDA, checked on CPU: the CUDA calls are replaced at torch's lowest layer (the
driver call, the device properties), so the project's own code and torch's argument handling run as they would.
The CPU's features are replaced where torch reports them (``torch.cpu.get_capabilities``, its cpuinfo reading)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.config import parse_args
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


def _fake_cpu(monkeypatch, *features: str) -> None:
    """An x86 CPU whose capabilities are the AVX512 basics plus ``features`` (e.g. ``amx_bf16``)."""
    caps = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bw": True, "avx512_vl": True,
            **{f: True for f in features}}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


def test_cpu_keeps_float32_and_no_autocast(monkeypatch):
    """On a CPU without bf16 matrix instructions."""
    _fake_cpu(monkeypatch)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32 and amp_dtype(torch.device("cpu")) is None


@pytest.mark.parametrize("features, want", [
    (("amx_tile", "amx_bf16", "avx512_bf16"), torch.bfloat16),  # a Xeon with AMX
    (("avx512_bf16",), torch.bfloat16),  # bf16 dot products without AMX (e.g. AMD Zen 4)
    (("amx_tile", "amx_int8"), torch.float32),  # AMX tiles for int8 only
    ((), torch.float32),  # plain AVX512: oneDNN would emulate bf16 (slower than fp32)
])
def test_cpu_serves_bf16_where_it_multiplies_bf16_natively(monkeypatch, features, want):
    _fake_cpu(monkeypatch, *features)
    assert resolve_dtype("auto", torch.device("cpu")) == want
    assert amp_dtype(torch.device("cpu")) is None  # training on a CPU: no autocast, as before


def test_cpu_bf16_needs_onednn_on(monkeypatch):
    _fake_cpu(monkeypatch, "amx_bf16", "avx512_bf16")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # restored after the test
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("features", [("amx_bf16", "avx512_bf16"), ()])
def test_an_explicit_dtype_wins_over_the_cpu(monkeypatch, features, tmp_path):
    _fake_cpu(monkeypatch, *features)
    for name, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        cfg = parse_args(["--model-repository", str(tmp_path), "--device", "cpu", "--dtype", name])
        assert resolve_dtype(cfg.dtype, torch.device(cfg.device)) == want
