"""TensorRT settings, in one place, for the three places that build an engine.

onnxruntime's TensorRT execution provider (``export check --provider tensorrt``),
Triton's onnxruntime backend accelerator (config.pbtxt) and ``trtexec`` take the
same choices (precision, workspace, engine cache, one optimisation profile over
batch 1..max) under different spellings; :class:`TensorRTSettings` writes each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

Shapes = dict[str, tuple[int, ...]]  # input name -> shape without the batch axis


def _profile(input_shapes: Shapes, batch: int) -> str:
    return ",".join(f"{n}:{'x'.join(str(d) for d in (batch, *s))}" for n, s in input_shapes.items())


@dataclass(frozen=True)
class TensorRTSettings:
    """fp16: half-precision engine; cache_dir: where engines are kept across runs (None = no cache)."""

    fp16: bool = True
    cache_dir: Optional[str] = None
    workspace_bytes: int = 4 << 30

    def onnxruntime_options(self, input_shapes: Shapes, max_batch: int) -> dict[str, str]:
        """TensorrtExecutionProvider options with one profile over batch 1..max_batch."""
        opts = {
            "trt_fp16_enable": "True" if self.fp16 else "False",
            "trt_max_workspace_size": str(self.workspace_bytes),
            "trt_profile_min_shapes": _profile(input_shapes, 1),
            "trt_profile_opt_shapes": _profile(input_shapes, max_batch),
            "trt_profile_max_shapes": _profile(input_shapes, max_batch),
        }
        if self.cache_dir is not None:
            opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(self.cache_dir),
                         "trt_timing_cache_enable": "True"})
        return opts

    def triton_parameters(self) -> dict[str, str]:
        """Parameters of Triton's ``tensorrt`` gpu_execution_accelerator (onnxruntime backend)."""
        params = {
            "precision_mode": "FP16" if self.fp16 else "FP32",
            "max_workspace_size_bytes": str(self.workspace_bytes),
        }
        if self.cache_dir is not None:
            params.update({"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(self.cache_dir)})
        return params

    def trtexec_command(self, onnx_path: str | os.PathLike, input_shapes: Shapes, max_batch: int,
                        opt_batch: Optional[int] = None, engine: Optional[str | os.PathLike] = None) -> str:
        """The ``trtexec`` line that builds the engine with one profile over batch 1..max_batch."""
        engine = engine or Path(onnx_path).with_suffix(".plan")
        precision = " --fp16" if self.fp16 else ""
        return (
            f"trtexec --onnx={onnx_path} --saveEngine={engine}{precision} "
            f"--memPoolSize=workspace:{self.workspace_bytes >> 20} "
            f"--minShapes={_profile(input_shapes, 1)} --optShapes={_profile(input_shapes, opt_batch or max_batch)} "
            f"--maxShapes={_profile(input_shapes, max_batch)}"
        )


# What Triton models get: engines cached in the container's /tmp across model reloads.
TRITON_TENSORRT = TensorRTSettings(fp16=True, cache_dir="/tmp/stadapter_trt_cache")
