"""What a device computes natively: the one rule for choosing bfloat16 (serving and training share it)."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA GPU of compute capability 8.0 or newer, or ROCm.

    ``torch.cuda.is_bf16_supported()`` is not that: it also counts emulation (a V100 or T4 "supports" bf16, slowly)
    and asks about the current CUDA device, which need not be the one given.
    """
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8
