"""onnxruntime sessions on a named provider (cpu, cuda, tensorrt), and a timing helper.

The GPU image installs ``onnxruntime-gpu`` (same API); this machine has the CPU
build, so ``cuda`` and ``tensorrt`` raise :class:`ProviderUnavailable` here
instead of silently falling back to the CPU (onnxruntime's default behaviour).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, Literal, Optional

Provider = Literal["cpu", "cuda", "tensorrt"]
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ProviderUnavailable(RuntimeError):
    """The requested execution provider is not in this onnxruntime build or failed to start."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return [k for k, v in ORT_PROVIDERS.items() if v in ort.get_available_providers()]


def tensorrt_options(
    input_shapes: dict[str, tuple[int, ...]],
    max_batch: int,
    fp16: bool = True,
    cache_dir: Optional[str | os.PathLike] = None,
) -> dict[str, str]:
    """TensorRT EP options: fp16, an engine cache, one optimisation profile over batch 1..max_batch.

    ``input_shapes`` maps input names to their shape without the batch axis.
    """
    def profile(b: int) -> str:
        return ",".join(f"{n}:{'x'.join(str(d) for d in (b, *s))}" for n, s in input_shapes.items())

    opts = {
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_profile_min_shapes": profile(1),
        "trt_profile_opt_shapes": profile(max_batch),
        "trt_profile_max_shapes": profile(max_batch),
    }
    if cache_dir is not None:
        opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
                     "trt_timing_cache_enable": "True"})
    return opts


def make_session(
    path: str | os.PathLike,
    provider: Provider = "cpu",
    threads: Optional[int] = None,
    trt_options: Optional[dict[str, str]] = None,
    fp16_graph: bool = False,
):
    """An InferenceSession that really runs on ``provider`` (raises ProviderUnavailable otherwise).

    ``fp16_graph``: onnxruntime 1.32's CPU provider crashes (SIGSEGV) while applying its
    level-3 (layout) optimisations to our float16 graphs, so those get level 2 on the CPU.
    """
    import onnxruntime as ort

    if provider not in ORT_PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(ORT_PROVIDERS)}, got {provider!r}")
    name = ORT_PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ProviderUnavailable(
            f"{name} is not available in this onnxruntime ({ort.__version__}, providers {ort.get_available_providers()}); "
            "install onnxruntime-gpu on a GPU machine for cuda / tensorrt"
        )
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if fp16_graph and provider == "cpu":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers: list = [(name, trt_options or {})] if provider == "tensorrt" else [name]
    if provider == "tensorrt":  # nodes TensorRT cannot take run on CUDA, not the CPU
        providers.append("CUDAExecutionProvider")
    if provider != "cpu":
        providers.append("CPUExecutionProvider")
    sess = ort.InferenceSession(str(Path(path)), sess_options=so, providers=providers)
    if sess.get_providers()[0] != name:
        raise ProviderUnavailable(f"{name} failed to start (session runs on {sess.get_providers()})")
    return sess


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Run ``fn`` warmup + repeats times; seconds per call (median, min, mean)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times)}


def trtexec_command(
    onnx_path: str | os.PathLike,
    input_shapes: dict[str, tuple[int, ...]],
    max_batch: int,
    opt_batch: Optional[int] = None,
    engine: Optional[str | os.PathLike] = None,
) -> str:
    """The ``trtexec`` line that builds an fp16 engine with one profile over batch 1..max_batch."""
    def shapes(b: int) -> str:
        return ",".join(f"{n}:{'x'.join(str(d) for d in (b, *s))}" for n, s in input_shapes.items())

    engine = engine or Path(onnx_path).with_suffix(".plan")
    return (
        f"trtexec --onnx={onnx_path} --saveEngine={engine} --fp16 "
        f"--minShapes={shapes(1)} --optShapes={shapes(opt_batch or max_batch)} --maxShapes={shapes(max_batch)}"
    )
