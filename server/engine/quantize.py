"""``--quantize``: whether the trunk's block linears serve in int8, and the trunk prepared for it.

``auto`` (the default) serves them in int8 only where that is both faster and close: on a CPU in bfloat16 (the
dtype ``--dtype auto`` picks on a CPU with bf16 units, which all have int8 dot products), for a trunk at least
:data:`INT8_MIN_WIDTH` wide (below it the int8 linears' per-call passes cost more than their products save:
docs/benchmarks.md has the crossover), and only if the int8 trunk's pooled features on a fixed probe clip stay
within :data:`INT8_MAX_ERROR` of the trunk's own (a trunk whose activations int8 represents badly, such as one with
far-reaching outlier channels the LayerNorm fold cannot even out, keeps bfloat16). ``int8`` forces it (refused where
it cannot run), ``none`` never.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from server.config import INT8_MAX_ERROR, INT8_MIN_WIDTH
from server.engine.model import cpu_rows_hint, dtype_name, prepare_trunk
from stadapter import VideoTrunk
from stadapter.config import CLIP_MEAN, CLIP_STD
from stadapter.trunk.packed import packable, packing_available
from stadapter.video.preprocess import normalise_views
from stadapter.video.synthetic import frame_image

PROBE_PATTERNS = ((0, "texture"), (5, "texture"), (0, "pan"), (40, "pan"))  # the probe clip's frames


@dataclass(frozen=True)
class Prepared:
    """The trunk as it serves: ``packed`` for oneDNN (a bf16 CPU trunk), ``int8`` block linears, and ``note``, what
    the startup log says of ``--quantize`` (empty when there is nothing to say)."""

    packed: bool
    int8: bool
    note: str


def probe_clip(trunk: VideoTrunk) -> torch.Tensor:
    """One clip [1, 4, 3, S, S] of the trunk's image size, normalised with CLIP's statistics, the same on every
    start: moving colour gradients with fresh noise and a panned noisy scene (stadapter.video.synthetic)."""
    size = (trunk.image_size, trunk.image_size)
    frames = np.stack([frame_image(i, size, pattern) for i, pattern in PROBE_PATTERNS])  # [T, S, S, 3] uint8
    views = torch.from_numpy(frames).permute(0, 3, 1, 2).unsqueeze(0)
    return normalise_views(views, CLIP_MEAN, CLIP_STD)


def why_not_int8(trunk: VideoTrunk, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``auto`` serves this trunk without int8 (None: it may, subject to the probe)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return f"int8 serves on a CPU in bfloat16, this is {device.type} in {dtype_name(dtype)}"
    if trunk.dim < INT8_MIN_WIDTH:
        return f"int8 pays from a trunk width of {INT8_MIN_WIDTH}, this trunk's is {trunk.dim}"
    if not packing_available(int8=True) or not all(packable(b) for b in trunk.blocks):
        return "this torch has no oneDNN int8 linear, or the trunk's blocks are not plain attention-and-MLP blocks"
    return None


def prepare_served_trunk(trunk: VideoTrunk, device: torch.device, dtype: torch.dtype, cpu_chunk_bytes: int,
                         quantize: str) -> Prepared:
    """The loaded trunk prepared as ``--quantize`` asks (``prepare_trunk`` for ``none`` and ``int8``, whose refusals
    it raises as ValueError)."""
    if quantize != "auto":
        int8 = quantize == "int8"
        packed = prepare_trunk(trunk, device, dtype, cpu_chunk_bytes, int8=int8)
        return Prepared(packed, int8, "block linears in int8 (--quantize int8)" if int8 else "")
    why_not = why_not_int8(trunk, device, dtype)
    if why_not is not None:
        packed = prepare_trunk(trunk, device, dtype, cpu_chunk_bytes)
        return Prepared(packed, False, f"block linears in {dtype_name(dtype)} (--quantize auto: {why_not})")
    trunk.chunk_bytes = cpu_chunk_bytes
    t0 = time.monotonic()
    error = trunk.pack_int8_within(cpu_rows_hint(trunk, dtype, cpu_chunk_bytes), probe_clip(trunk).to(dtype),
                                   INT8_MAX_ERROR)
    measured = (f"the probe clip's features {100 * error:.2f}% from bfloat16's (limit {100 * INT8_MAX_ERROR:g}%), "
                f"measured in {time.monotonic() - t0:.2f} s")
    if trunk.int8:
        return Prepared(True, True, f"block linears in int8 (--quantize auto: {measured})")
    return Prepared(True, False, f"block linears in bfloat16 (--quantize auto: {measured}; --quantize int8 forces it)")
