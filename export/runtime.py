"""onnxruntime sessions on a named provider (cpu, cuda, tensorrt), the PyTorch reference they are timed against, and a timer.

The GPU image installs ``onnxruntime-gpu`` (same API); where only the CPU build is
installed, ``cuda`` and ``tensorrt`` raise :class:`ProviderUnavailable` instead of
silently falling back to the CPU (onnxruntime's default behaviour).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

Provider = Literal["cpu", "cuda", "tensorrt"]
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ProviderUnavailable(RuntimeError):
    """The requested execution provider is not in this onnxruntime build or failed to start."""


# Parity tolerance (max abs logit difference against PyTorch fp32) by provider and graph precision:
# CUDA may use TF32 matmuls; float16 graphs round every activation; TensorRT builds fp16 engines.
PARITY_TOLERANCE: dict[tuple[str, bool], float] = {
    ("cpu", False): 1e-4,
    ("cpu", True): 2e-2,
    ("cuda", False): 1e-3,
    ("cuda", True): 2e-2,
    ("tensorrt", False): 5e-2,
    ("tensorrt", True): 5e-2,
}


def parity_tolerance(provider: str, fp16_graph: bool) -> float:
    return PARITY_TOLERANCE[(provider, bool(fp16_graph))]


def ensure_available(provider: str) -> str:
    """The onnxruntime name of ``provider``; raises ProviderUnavailable when this onnxruntime build lacks it."""
    import onnxruntime as ort

    if provider not in ORT_PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(ORT_PROVIDERS)}, got {provider!r}")
    name = ORT_PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ProviderUnavailable(
            f"{name} is not available in this onnxruntime ({ort.__version__}, providers {ort.get_available_providers()}); "
            "install onnxruntime-gpu on a GPU machine for cuda / tensorrt"
        )
    return name


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

    name = ensure_available(provider)
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


def torch_device(provider: str) -> str:
    """Where the PyTorch reference runs for an onnxruntime ``provider``: CUDA for a GPU provider if there is one."""
    import torch

    return "cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu"


def torch_runner(model: Any, inputs: Sequence[Any], device: str) -> Callable[[], Any]:
    """A call of ``model`` on ``inputs`` moved to ``device``, under ``no_grad``, that returns only once CUDA is done
    (so :func:`time_calls` times the compute, not the kernel launches). ``model`` must already be on ``device``."""
    import torch

    args = tuple(t.to(device) for t in inputs)

    def run() -> Any:
        with torch.no_grad():
            out = model(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run
