"""TensorRT settings, in one place, for the three places that build an engine.

onnxruntime's TensorRT execution provider (``export check --provider tensorrt``),
Triton's onnxruntime backend accelerator (config.pbtxt) and ``trtexec`` take the
same choices (precision, workspace, engine cache, one optimisation profile over
batch 1..max) under different spellings; :class:`TensorRTSettings` writes each.

Precision depends on the TensorRT version. Up to 10.x the builder was weakly typed:
``--fp16`` / ``BuilderFlag.FP16`` (onnxruntime's ``trt_fp16_enable``, Triton's
``precision_mode``) let it pick float16 kernels for a float32 graph. TensorRT 10
added strongly typed networks (``trtexec --stronglyTyped``: every tensor keeps the
graph's type) and TensorRT 11 removed the weak typing flags altogether: the engine
has the precision of the ONNX graph, so an fp16 engine is built from an fp16 export
(``python -m export ... --fp16``). onnxruntime's TensorRT provider runs TensorRT 11
only from onnxruntime 1.27. The version is passed in (``--trt-version``) or read
from the machine (:func:`installed_tensorrt_version`); what a version cannot do
raises :class:`TensorRTVersionError` naming the version found and the one needed.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .onnx_export import ExportError

Shapes = dict[str, tuple[int, ...]]  # input name -> shape without the batch axis
Version = tuple[int, ...]

STRONGLY_TYPED_TRTEXEC = (10, 0)  # trtexec --stronglyTyped: the engine keeps the graph's types
WEAK_TYPING_REMOVED = (11, 0)  # --fp16 / BuilderFlag.FP16 / trt_fp16_enable mean nothing any more
ORT_FOR_TENSORRT_11 = (1, 27)  # first onnxruntime whose TensorRT provider runs TensorRT 11
# A Triton config written without --trt-version: the weakly typed TensorRT (10.x or older) of the
# Triton releases this was first written for.
TRITON_DEFAULT_TENSORRT: Version = (10, 0)


class TensorRTVersionError(ExportError):
    """The TensorRT (or onnxruntime) version at hand cannot build what was asked, or cannot be told."""


def _profile(input_shapes: Shapes, batch: int) -> str:
    return ",".join(f"{n}:{'x'.join(str(d) for d in (batch, *s))}" for n, s in input_shapes.items())


def show(version: Version) -> str:
    return ".".join(str(v) for v in version)


def parse_version(text: str, what: str = "TensorRT") -> Version:
    """``11.3.0.99``, ``10.3.0``, or trtexec's banner ``[TensorRT v100300]`` / ``[TensorRT v8601]`` -> (major, minor, patch)."""
    banner = re.search(r"TensorRT v(\d{4,})\b", text)
    if banner:  # NV_TENSORRT_VERSION: major*1000+minor*100+patch up to 8.x, major*10000+minor*100+patch from 10
        code = int(banner.group(1))
        major, rest = divmod(code, 10000 if code >= 100000 else 1000)
        return major, rest // 100, rest % 100
    dotted = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not dotted:
        raise TensorRTVersionError(f"cannot read a {what} version from {text.strip()[:80]!r} (expected e.g. 10.3.0)")
    return tuple(int(g) for g in dotted.groups() if g is not None)


def installed_tensorrt_version(
    import_module: Callable[[str], Any] = importlib.import_module,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> Optional[str]:
    """This machine's TensorRT: ``tensorrt.__version__``, else what ``trtexec --version`` prints; None if neither."""
    try:
        return str(import_module("tensorrt").__version__)
    except (ImportError, AttributeError):
        pass
    try:
        done = run(["trtexec", "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = f"{done.stdout}\n{done.stderr}"
    return text if re.search(r"TensorRT v\d{4,}", text) else None


def resolve_tensorrt_version(given: Optional[str], detect: Optional[Callable[[], Optional[str]]] = None) -> Version:
    """``given`` (``--trt-version``) if any, else this machine's TensorRT (``detect``, default
    :func:`installed_tensorrt_version`); refuses when there is neither."""
    text = given if given is not None else (detect or installed_tensorrt_version)()
    if text is None:
        raise TensorRTVersionError(
            "cannot tell which TensorRT builds the engine: no tensorrt Python package and no trtexec here; "
            "pass --trt-version (e.g. 10.3 or 11.0)"
        )
    return parse_version(text)


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def check_onnxruntime_runs(trt: Version, ort_version: str) -> None:
    """onnxruntime's TensorRT provider runs TensorRT 11 only from onnxruntime 1.27."""
    ort = parse_version(ort_version, "onnxruntime")
    if trt >= WEAK_TYPING_REMOVED and ort < ORT_FOR_TENSORRT_11:
        raise TensorRTVersionError(
            f"onnxruntime {ort_version}'s TensorRT execution provider does not run TensorRT {show(trt)}: "
            f"TensorRT {WEAK_TYPING_REMOVED[0]} needs onnxruntime >= {show(ORT_FOR_TENSORRT_11)} (onnxruntime-gpu)"
        )


@dataclass(frozen=True)
class TensorRTSettings:
    """How one engine is built.

    Args:
        version: the TensorRT that builds it (decides which spelling of precision exists).
        graph_fp16: the ONNX graph is float16 inside (``export --fp16``; ``stadapter.precision`` metadata).
        fp16: None = the default (weakly typed TensorRT may pick fp16 kernels; strongly typed TensorRT
            keeps the graph's precision); True = an fp16 engine, False = an fp32 engine, refused where
            the version cannot give it from this graph.
        cache_dir: where engines are kept across runs (None = no cache).
    """

    version: Version
    graph_fp16: bool = False
    fp16: Optional[bool] = None
    cache_dir: Optional[str] = None
    workspace_bytes: int = 4 << 30

    def _engine_fp16(self, strongly_typed: bool) -> bool:
        """fp16 engine or not; refuses what a strongly typed build cannot do with this graph."""
        if not strongly_typed:
            return self.fp16 is not False
        graph = "fp16" if self.graph_fp16 else "fp32"
        if self.fp16 is not None and self.fp16 != self.graph_fp16:
            want = "fp16" if self.fp16 else "fp32"
            fix = "export the graph with --fp16" if self.fp16 else "export the graph without --fp16"
            raise TensorRTVersionError(
                f"TensorRT {show(self.version)} builds strongly typed engines: the engine has the graph's precision "
                f"({graph}), so it cannot build an {want} engine from it; {fix}, or use TensorRT < "
                f"{show(WEAK_TYPING_REMOVED if self.version >= WEAK_TYPING_REMOVED else STRONGLY_TYPED_TRTEXEC)}"
            )
        return self.graph_fp16

    def engine_precision(self, tool: str = "trtexec") -> str:
        """``fp16`` or ``fp32``: what the engine computes in (fp32 graphs may still get fp16 kernels when weakly typed)."""
        strong = self.version >= (STRONGLY_TYPED_TRTEXEC if tool == "trtexec" else WEAK_TYPING_REMOVED)
        return "fp16" if self._engine_fp16(strong) else "fp32"

    def onnxruntime_options(self, input_shapes: Shapes, max_batch: int, ort_version: Optional[str] = None) -> dict[str, str]:
        """TensorrtExecutionProvider options with one profile over batch 1..max_batch.

        ``ort_version``: the onnxruntime that will run them (default: the installed one).
        """
        check_onnxruntime_runs(self.version, ort_version if ort_version is not None else onnxruntime_version())
        opts = {
            "trt_max_workspace_size": str(self.workspace_bytes),
            "trt_profile_min_shapes": _profile(input_shapes, 1),
            "trt_profile_opt_shapes": _profile(input_shapes, max_batch),
            "trt_profile_max_shapes": _profile(input_shapes, max_batch),
        }
        fp16 = self._engine_fp16(self.version >= WEAK_TYPING_REMOVED)
        if self.version < WEAK_TYPING_REMOVED:
            opts["trt_fp16_enable"] = "True" if fp16 else "False"
        if self.cache_dir is not None:
            opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(self.cache_dir),
                         "trt_timing_cache_enable": "True"})
        return opts

    def triton_parameters(self) -> dict[str, str]:
        """Parameters of Triton's ``tensorrt`` gpu_execution_accelerator (onnxruntime backend).

        ``precision_mode`` is onnxruntime's ``trt_fp16_enable``: written for TensorRT < 11 only.
        """
        params = {"max_workspace_size_bytes": str(self.workspace_bytes)}
        fp16 = self._engine_fp16(self.version >= WEAK_TYPING_REMOVED)
        if self.version < WEAK_TYPING_REMOVED:
            params["precision_mode"] = "FP16" if fp16 else "FP32"
        if self.cache_dir is not None:
            params.update({"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(self.cache_dir)})
        return params

    def trtexec_command(self, onnx_path: str | os.PathLike, input_shapes: Shapes, max_batch: int,
                        opt_batch: Optional[int] = None, engine: Optional[str | os.PathLike] = None) -> str:
        """The ``trtexec`` line that builds the engine with one profile over batch 1..max_batch.

        TensorRT < 10: ``--fp16`` (weak typing); 10.x: ``--stronglyTyped``; 11 and later: no precision
        flag at all (strong typing is always on and ``--fp16`` is gone).
        """
        engine = engine or Path(onnx_path).with_suffix(".plan")
        fp16 = self._engine_fp16(self.version >= STRONGLY_TYPED_TRTEXEC)
        if self.version >= WEAK_TYPING_REMOVED:
            precision = ""
        elif self.version >= STRONGLY_TYPED_TRTEXEC:
            precision = " --stronglyTyped"
        else:
            precision = " --fp16" if fp16 else ""
        return (
            f"trtexec --onnx={onnx_path} --saveEngine={engine}{precision} "
            f"--memPoolSize=workspace:{self.workspace_bytes >> 20} "
            f"--minShapes={_profile(input_shapes, 1)} --optShapes={_profile(input_shapes, opt_batch or max_batch)} "
            f"--maxShapes={_profile(input_shapes, max_batch)}"
        )


# What Triton models get: engines cached in the container's /tmp across model reloads.
TRITON_TRT_CACHE = "/tmp/stadapter_trt_cache"
