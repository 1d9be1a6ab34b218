"""What a device computes natively: the one rule for choosing bfloat16 (serving and training share it)."""

from __future__ import annotations

import torch

CPU_BF16_MATRIX_FEATURES = ("amx_bf16", "avx512_bf16")  # x86 instructions that multiply bf16 matrices in hardware


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware.

    * CUDA: compute capability 8.0 or newer, or ROCm. ``torch.cuda.is_bf16_supported()`` is not that: it also
      counts emulation (a V100 or T4 "supports" bf16, slowly) and asks about the current CUDA device, which
      need not be the one given.
    * CPU: an x86 CPU with AMX-BF16 tiles or AVX512-BF16 dot products (``torch.cpu.get_capabilities()``, torch's
      own cpuinfo reading), and oneDNN (``torch.backends.mkldnn``) on to use them. oneDNN's own bf16 check
      (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is not that either: it also counts plain AVX512, where
      bf16 is converted to fp32 and back around fp32 arithmetic, slower than fp32 alone. Other CPUs (ARM's bf16
      extensions included: not measured here) say no.
    """
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return False
        caps = torch.cpu.get_capabilities()
        return any(bool(caps.get(name, False)) for name in CPU_BF16_MATRIX_FEATURES)
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8
