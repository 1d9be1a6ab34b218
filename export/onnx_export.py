"""Trunk + adapters + heads as one ONNX graph (one task, or many with a per-clip task index).

Graph contracts (the Triton config and the Triton client rely on these names):

* single task: ``frames`` float32 ``[batch, T, 3, S, S]`` -> ``logits`` float32 ``[batch, C]``
* multi-task:  ``frames`` float32 ``[batch, T, 3, S, S]``, ``task_index`` int64 ``[batch]``
  -> ``logits`` float32 ``[batch, C_max]`` (zero-padded), ``num_classes`` int64 ``[batch]``

``batch`` is a named dynamic axis; T and S are fixed per graph (Triton batches
only equal shapes anyway). With ``fp16`` the weights and maths are float16 but
the graph's inputs and outputs stay float32, so clients and configs do not change.

Exporters (torch 2.14): ``dynamo`` (``torch.export`` + onnxscript, the default
path in torch >= 2.9) is used by default: its graph is ~5x smaller in nodes
(293 vs 1,472 on the tiny trunk). ``legacy`` (TorchScript tracing) exports in a
fraction of the time but needs PyTorch's fused multi-head-attention fast path
switched off while tracing (``aten::_native_multi_head_attention`` has no ONNX
symbolic); :func:`mha_fastpath_disabled` does that for either exporter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from stadapter.bank import AdapterStack
from stadapter.bundle import BundleError, TaskBundle, load_bundle
from stadapter.fsutil import atomic_file
from stadapter.trunk import VideoTrunk

from .modules import MultiTaskModel, SingleTaskModel
from .runtime import Provider, parity_tolerance

Exporter = Literal["dynamo", "legacy"]
DEFAULT_OPSET = {"dynamo": 20, "legacy": 17}
METADATA_KEY = "stadapter.tasks_json"

SINGLE_INPUTS, SINGLE_OUTPUTS = ("frames",), ("logits",)
MULTI_INPUTS, MULTI_OUTPUTS = ("frames", "task_index"), ("logits", "num_classes")


class ExportError(ValueError):
    """An export cannot be done (bad bundle, mismatched tasks, failed check)."""


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Args:
        num_frames: T of the graph; None = the tasks' ``sampling.num_frames``.
        opset: ONNX opset; None = 20 (dynamo) / 17 (legacy).
        fp16: float16 weights and maths inside, float32 inputs and outputs.
        exporter: ``dynamo`` (default) or ``legacy``.
        example_batch: batch size of the example input used while exporting (>= 2,
            so the exporter does not specialise the batch axis to 1).
        tolerance: parity tolerance (max abs diff of logits); None = 1e-4 fp32, 2e-2 fp16.
        check_batch: batch size of the parity check.
    """

    num_frames: Optional[int] = None
    opset: Optional[int] = None
    fp16: bool = False
    exporter: Exporter = "dynamo"
    example_batch: int = 2
    tolerance: Optional[float] = None
    check_batch: int = 3

    def __post_init__(self) -> None:
        if self.exporter not in DEFAULT_OPSET:
            raise ExportError(f"exporter must be 'dynamo' or 'legacy', got {self.exporter!r}")
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames < 1):
            raise ExportError(f"num_frames must be a positive int, got {self.num_frames!r}")
        if self.exporter == "dynamo" and self.opset is not None and self.opset < 18:
            raise ExportError(f"the dynamo exporter writes opset >= 18 (asked for {self.opset}); use --exporter legacy for older opsets")
        if self.example_batch < 2:
            raise ExportError(f"example_batch must be >= 2 (a batch of 1 gets baked in), got {self.example_batch}")
        if self.check_batch < 1:
            raise ExportError(f"check_batch must be >= 1, got {self.check_batch}")

    @property
    def opset_version(self) -> int:
        return self.opset or DEFAULT_OPSET[self.exporter]

    @property
    def tol(self) -> float:
        return self.tolerance if self.tolerance is not None else parity_tolerance("cpu", self.fp16)


@dataclass(frozen=True)
class ExportReport:
    """What one export produced and how it checked out."""

    path: Path
    tasks: tuple[str, ...]
    num_frames: int
    input_size: int
    exporter: str
    opset: int
    fp16: bool
    export_seconds: float
    onnx_bytes: int
    max_abs_diff: float
    tolerance: float
    parity_batch: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "tasks": list(self.tasks),
            "num_frames": self.num_frames,
            "input_size": self.input_size,
            "exporter": self.exporter,
            "opset": self.opset,
            "fp16": self.fp16,
            "export_seconds": round(self.export_seconds, 3),
            "onnx_bytes": self.onnx_bytes,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "parity_batch": self.parity_batch,
        }


# ----------------------------------------------------------------------------- tasks


def load_tasks(trunk: VideoTrunk, bundle_dirs: Sequence[str | os.PathLike]) -> list[TaskBundle]:
    """Load bundles and refuse any that do not fit ``trunk`` (fingerprint, shapes) or repeat a task name."""
    if not bundle_dirs:
        raise ExportError("no task bundles given")
    bundles = []
    for d in bundle_dirs:
        try:
            bundles.append(load_bundle(d, trunk))
        except BundleError as e:
            raise ExportError(f"cannot export task bundle {d}: {e}") from e
    names = [b.spec.name for b in bundles]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExportError(f"task {dupes[0]!r} is given more than once (one version per task in a graph)")
    return bundles


def common_shape(bundles: Sequence[TaskBundle], num_frames: Optional[int] = None) -> tuple[int, int]:
    """(T, S) shared by all tasks; a graph has one T and one input size."""
    sizes = {b.spec.sampling.input_size for b in bundles}
    if len(sizes) > 1:
        detail = ", ".join(f"{b.spec.name}={b.spec.sampling.input_size}" for b in bundles)
        raise ExportError(f"tasks differ in input size ({detail}); one graph needs one input size")
    if num_frames is None:
        frames = {b.spec.sampling.num_frames for b in bundles}
        if len(frames) > 1:
            detail = ", ".join(f"{b.spec.name}={b.spec.sampling.num_frames}" for b in bundles)
            raise ExportError(
                f"tasks differ in frames per clip ({detail}); export them in separate graphs or force one T with --frames"
            )
        num_frames = frames.pop()
    return num_frames, sizes.pop()


def tasks_manifest(trunk: VideoTrunk, bundles: Sequence[TaskBundle], num_frames: int) -> dict[str, Any]:
    """What a client needs to call the graph: task index, labels, sampling (the Triton ``tasks_json``)."""
    tasks = []
    for i, b in enumerate(bundles):
        s = b.spec
        tasks.append({
            "name": s.name,
            "index": i,
            "version": s.version,
            "labels": list(s.labels),
            "num_frames": num_frames,
            "input_size": s.sampling.input_size,
            "sampling": s.sampling.replace(num_frames=num_frames).to_dict(),
        })
    return {"trunk_fingerprint": trunk.fingerprint, "tasks": tasks}


# ----------------------------------------------------------------------------- modules


class _CastIO(nn.Module):
    """Run ``inner`` in ``dtype`` with float32 graph inputs and outputs."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner.to(dtype=dtype)
        self.dtype = dtype

    def forward(self, frames: Tensor, task_index: Optional[Tensor] = None):
        rest = () if task_index is None else (task_index,)
        out = self.inner(frames.to(self.dtype), *rest)
        if isinstance(out, tuple):
            return tuple(o.float() if o.is_floating_point() else o for o in out)
        return out.float()


def build_model(trunk: VideoTrunk, bundles: Sequence[TaskBundle], multi: bool, fp16: bool = False) -> nn.Module:
    """The module that gets exported (eval mode, CPU); fp32 unless ``fp16``."""
    stacks = [b.stack(trunk.num_blocks) for b in bundles]
    if multi:
        model: nn.Module = MultiTaskModel(trunk, AdapterStack.concat(stacks))
    else:
        if len(stacks) != 1:
            raise ExportError(f"a single-task graph takes one bundle, got {len(stacks)}")
        model = SingleTaskModel(trunk, stacks[0])
    if fp16:
        import copy

        model = _CastIO(copy.deepcopy(model), torch.float16)
    return model.eval()


def example_inputs(
    batch: int, num_frames: int, size: int, num_tasks: Optional[int] = None, seed: int = 0
) -> tuple[Tensor, ...]:
    """Random normalised frames (+ a task index cycling over all tasks when ``num_tasks``)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, num_frames, 3, size, size, generator=g)  # [B, T, 3, S, S]
    if num_tasks is None:
        return (frames,)
    task_index = torch.arange(batch, dtype=torch.long) % num_tasks  # [B]
    return frames, task_index


# ----------------------------------------------------------------------------- export


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Route nn.MultiheadAttention through its decomposed path (exportable ops) while exporting."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def export_graph(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    out: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str],
    options: ExportOptions,
    metadata: Optional[dict[str, str]] = None,
) -> tuple[Path, int]:
    """torch -> ONNX file at ``out``, batch axis named ``batch``, then onnx.checker.

    ``out`` is written in place (a failure can leave part of a file there): callers stage it,
    as :func:`export_single` and :func:`export_multitask` do. Returns the path and the opset
    the file really has.
    """
    import onnx

    out = Path(out)
    if options.exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401  (torch's dynamo exporter is built on it)
        except ImportError:
            raise ExportError("the dynamo exporter needs onnxscript (pip install onnxscript); or use --exporter legacy") from None
    try:
        with torch.no_grad(), mha_fastpath_disabled(), warnings.catch_warnings():
            # The tracer warns about every Python-level shape check in the trunk; they guard
            # inputs and are constant for a given T and S, which the graph fixes anyway.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding")
            warnings.filterwarnings("ignore", message="# The axis name")
            if options.exporter == "dynamo":
                from torch.export import Dim

                batch = Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    model, inputs, str(out), input_names=list(input_names), output_names=list(output_names),
                    opset_version=options.opset_version, dynamo=True, external_data=False, optimize=True,
                    dynamic_shapes=tuple({0: batch} for _ in input_names), verbose=False,
                )
            else:
                torch.onnx.export(
                    model, inputs, str(out), input_names=list(input_names), output_names=list(output_names),
                    opset_version=options.opset_version, dynamo=False,
                    dynamic_axes={n: {0: "batch"} for n in (*input_names, *output_names)},
                )
        proto = onnx.load(str(out))
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        _name_batch_axis(proto, input_names, output_names)
        for k, v in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(out))
        onnx.checker.check_model(str(out), full_check=True)
    except ExportError:
        raise
    except Exception as e:  # exporter and checker errors come in many types
        raise ExportError(f"ONNX export to {out} failed ({options.exporter} exporter): {type(e).__name__}: {e}") from e
    return out, opset


def _name_batch_axis(proto, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Make the leading axis of every graph input/output the named dynamic ``batch`` axis; check names."""
    ins = [i.name for i in proto.graph.input]
    outs = [o.name for o in proto.graph.output]
    if ins != list(input_names) or outs != list(output_names):
        raise ExportError(f"exported graph has inputs {ins} and outputs {outs}; expected {list(input_names)} / {list(output_names)}")
    for v in (*proto.graph.input, *proto.graph.output):
        dim0 = v.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_value"):
            raise ExportError(f"graph {v.name!r}: the batch axis was exported as the constant {dim0.dim_value}")
        dim0.dim_param = "batch"


def run_parity(
    path: Path,
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    input_names: Sequence[str],
    provider: Provider = "cpu",
    fp16_graph: bool = False,
) -> tuple[float, list]:
    """Max abs diff between PyTorch (fp32 reference) and onnxruntime on the same inputs; also the ORT outputs."""
    from .runtime import make_session

    with torch.no_grad():
        ref = model(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    sess = make_session(path, provider, fp16_graph=fp16_graph)
    got = sess.run(None, {n: t.numpy() for n, t in zip(input_names, inputs, strict=True)})
    diff = 0.0
    for r, g in zip(ref, got, strict=True):
        r = r.numpy()
        if r.shape != g.shape:
            raise ExportError(f"{path}: onnxruntime output shape {g.shape} differs from PyTorch {r.shape}")
        if r.dtype.kind == "i":
            if not (r == g).all():
                raise ExportError(f"{path}: integer outputs differ between onnxruntime and PyTorch: {g} vs {r}")
        else:
            diff = max(diff, float(abs(r.astype("float64") - g.astype("float64")).max()))
    return diff, got


def _export_checked(
    trunk: VideoTrunk, bundles: Sequence[TaskBundle], out: str | os.PathLike, options: ExportOptions, multi: bool
) -> ExportReport:
    """Export to a staging folder beside ``out``, check the graph there, and only then write it to ``out``.

    A graph that fails the checker or the parity check leaves nothing at ``out`` (an older
    file there stays as it was); one that passes reaches ``out`` through
    :func:`stadapter.fsutil.atomic_file` (fsynced, one rename).
    """
    T, S = common_shape(bundles, options.num_frames)
    names_in, names_out = (MULTI_INPUTS, MULTI_OUTPUTS) if multi else (SINGLE_INPUTS, SINGLE_OUTPUTS)
    k = len(bundles) if multi else None
    model = build_model(trunk, bundles, multi, options.fp16)
    manifest = tasks_manifest(trunk, bundles, T)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".staged-{out.name}-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        t0 = time.perf_counter()
        _, opset = export_graph(
            model, example_inputs(options.example_batch, T, S, k), staged, names_in, names_out, options,
            metadata={METADATA_KEY: json.dumps(manifest), "stadapter.graph": "multitask" if multi else "single",
                      "stadapter.precision": "fp16" if options.fp16 else "fp32"},
        )
        seconds = time.perf_counter() - t0
        # Parity against the fp32 PyTorch model, on a batch size the export did not see.
        reference = build_model(trunk, bundles, multi, fp16=False) if options.fp16 else model
        check_in = example_inputs(options.check_batch, T, S, k, seed=1)
        diff, _ = run_parity(staged, reference, check_in, names_in, fp16_graph=options.fp16)
        if not diff <= options.tol:  # also catches NaN
            raise ExportError(f"{out}: onnxruntime and PyTorch differ by {diff:.3g} (tolerance {options.tol:g}); "
                              "the graph is not trustworthy and was not written")
        onnx_bytes = staged.stat().st_size
        with open(staged, "rb") as src, atomic_file(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    return ExportReport(
        path=out, tasks=tuple(b.spec.name for b in bundles), num_frames=T, input_size=S, exporter=options.exporter,
        opset=opset, fp16=options.fp16, export_seconds=seconds, onnx_bytes=onnx_bytes,
        max_abs_diff=diff, tolerance=options.tol, parity_batch=options.check_batch,
    )


def export_single(
    trunk: VideoTrunk, bundle: TaskBundle, out: str | os.PathLike, options: ExportOptions = ExportOptions()
) -> ExportReport:
    """One task's graph: ``frames`` -> ``logits``; checked and compared with PyTorch (raises ExportError)."""
    return _export_checked(trunk, [bundle], out, options, multi=False)


def export_multitask(
    trunk: VideoTrunk, bundles: Sequence[TaskBundle], out: str | os.PathLike, options: ExportOptions = ExportOptions()
) -> ExportReport:
    """Several tasks in one graph: (``frames``, ``task_index``) -> (``logits``, ``num_classes``); task i = bundles[i]."""
    return _export_checked(trunk, bundles, out, options, multi=True)
