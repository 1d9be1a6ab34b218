"""Parity and speed of an exported graph on one onnxruntime provider (cpu, cuda, tensorrt).

Meant to be run where the provider exists: ``python -m export check --onnx FILE
--provider tensorrt --trunk DIR --tasks B...`` on the GPU machine. The graph
carries its task manifest (ONNX metadata), so inputs of the right shape are
made without the bundles. The reference is the PyTorch model when ``--trunk``
and ``--tasks`` are given (on CUDA when the provider is a GPU one and torch sees
a GPU), else onnxruntime's CPU provider on the same file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .onnx_export import (
    METADATA_KEY,
    MULTI_INPUTS,
    SINGLE_INPUTS,
    ExportError,
    build_model,
    example_inputs,
    load_tasks,
)
from .runtime import Provider, ensure_available, make_session, parity_tolerance, time_calls, torch_device, torch_runner
from .tensorrt import TensorRTSettings, resolve_tensorrt_version, show


@dataclass(frozen=True)
class GraphInfo:
    multi: bool
    fp16: bool
    num_frames: int
    input_size: int
    manifest: dict[str, Any]

    @property
    def num_tasks(self) -> int:
        return len(self.manifest["tasks"])

    @property
    def input_names(self) -> tuple[str, ...]:
        return MULTI_INPUTS if self.multi else SINGLE_INPUTS


def graph_info(path: str | os.PathLike) -> GraphInfo:
    """Read the task manifest and graph kind that export wrote into the ONNX metadata."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in meta:
        raise ExportError(f"{path}: no {METADATA_KEY} metadata; was it written by python -m export?")
    manifest = json.loads(meta[METADATA_KEY])
    t0 = manifest["tasks"][0]
    return GraphInfo(
        multi=meta.get("stadapter.graph") == "multitask",
        fp16=meta.get("stadapter.precision") == "fp16",
        num_frames=int(t0["num_frames"]),
        input_size=int(t0["input_size"]),
        manifest=manifest,
    )


def input_shapes(info: GraphInfo) -> dict[str, tuple[int, ...]]:
    """The graph's inputs without the batch axis (what a TensorRT optimisation profile names)."""
    shapes: dict[str, tuple[int, ...]] = {"frames": (info.num_frames, 3, info.input_size, info.input_size)}
    if info.multi:
        shapes["task_index"] = ()
    return shapes


def check_graph(
    onnx_path: str | os.PathLike,
    provider: Provider = "cpu",
    trunk_dir: Optional[str | os.PathLike] = None,
    task_dirs: Sequence[str | os.PathLike] = (),
    batch: int = 4,
    repeats: int = 10,
    tolerance: Optional[float] = None,
    trt_fp16: Optional[bool] = None,
    trt_cache: Optional[str | os.PathLike] = None,
    threads: Optional[int] = None,
    trt_version: Optional[str] = None,
) -> dict[str, Any]:
    """Run parity and timing; returns a JSON-able dict with ``ok`` (parity within tolerance).

    ``trt_fp16``: None = the version's default, False = an fp32 engine (see :class:`TensorRTSettings`);
    ``trt_version``: the TensorRT onnxruntime loads (default: this machine's, see
    :func:`export.tensorrt.installed_tensorrt_version`).
    """
    path = Path(onnx_path)
    info = graph_info(path)
    inputs = example_inputs(batch, info.num_frames, info.input_size, info.num_tasks if info.multi else None, seed=2)
    feeds = {n: t.numpy() for n, t in zip(info.input_names, inputs, strict=True)}
    trt, engine = None, {}
    if provider == "tensorrt":
        ensure_available(provider)  # before the version checks: no onnxruntime-gpu is the first thing to say
        settings = TensorRTSettings(resolve_tensorrt_version(trt_version), graph_fp16=info.fp16, fp16=trt_fp16,
                                    cache_dir=None if trt_cache is None else str(trt_cache))
        trt = settings.onnxruntime_options(input_shapes(info), max_batch=batch)
        engine = {"tensorrt_version": show(settings.version), "engine_precision": settings.engine_precision("onnxruntime")}
    sess = make_session(path, provider, threads=threads, trt_options=trt, fp16_graph=info.fp16)
    got = sess.run(None, feeds)
    ort_time = time_calls(lambda: sess.run(None, feeds), repeats)
    result: dict[str, Any] = {
        "onnx": str(path), "provider": provider, "session_providers": sess.get_providers(), "batch": batch,
        "num_frames": info.num_frames, "input_size": info.input_size, "tasks": [t["name"] for t in info.manifest["tasks"]],
        "graph_fp16": info.fp16, **engine, "onnxruntime": {**ort_time, "clips_per_s": batch / ort_time["median_s"]},
    }
    if trunk_dir is not None:
        ref, torch_time, device = _torch_reference(info, trunk_dir, task_dirs, inputs, provider, repeats, threads)
        result["reference"] = f"pytorch-{device}"
        result["pytorch"] = {**torch_time, "clips_per_s": batch / torch_time["median_s"]}
        result["speedup_vs_pytorch"] = torch_time["median_s"] / ort_time["median_s"]
    elif provider != "cpu":
        cpu = make_session(path, "cpu", threads=threads, fp16_graph=info.fp16)
        ref = cpu.run(None, feeds)
        result["reference"] = "onnxruntime-cpu"
    else:
        ref = None
        result["reference"] = "none (give --trunk and --tasks for a PyTorch reference)"
    tol = tolerance if tolerance is not None else parity_tolerance(provider, info.fp16)
    if ref is not None:
        diff = max(float(np.abs(np.asarray(r, np.float64) - np.asarray(g, np.float64)).max())
                   for r, g in zip(ref, got, strict=True) if np.asarray(r).dtype.kind == "f")
        ints_equal = all(np.array_equal(r, g) for r, g in zip(ref, got, strict=True) if np.asarray(r).dtype.kind == "i")
        result.update(max_abs_diff=diff, tolerance=tol, ok=bool(diff <= tol and ints_equal))
    else:
        result.update(max_abs_diff=None, tolerance=tol, ok=True)
    return result


def _torch_reference(info: GraphInfo, trunk_dir, task_dirs, inputs, provider: str, repeats: int, threads=None):
    from stadapter import load_trunk

    device = torch_device(provider)
    if threads:
        torch.set_num_threads(threads)
    trunk = load_trunk(trunk_dir)
    if trunk.fingerprint != info.manifest["trunk_fingerprint"]:
        raise ExportError(
            f"trunk {trunk_dir} ({trunk.fingerprint[:12]}…) is not the trunk the graph was exported from "
            f"({info.manifest['trunk_fingerprint'][:12]}…)"
        )
    bundles = load_tasks(trunk, task_dirs)
    names, want = [b.spec.name for b in bundles], [t["name"] for t in info.manifest["tasks"]]
    if names != want:
        raise ExportError(f"--tasks {names} must be the graph's tasks in its order: {want}")
    run = torch_runner(build_model(trunk, bundles, info.multi, fp16=False).to(device), inputs, device)
    out = run()
    out = out if isinstance(out, tuple) else (out,)
    return [o.cpu().numpy() for o in out], time_calls(run, repeats), device
