"""A Triton Inference Server model repository for the exported graphs.

Layout written under ``out`` (one folder per model, each replaced atomically)::

    stadapter_multitask/
        config.pbtxt            platform onnxruntime_onnx, dynamic batching, tasks_json
        1/model.onnx            the multi-task graph (frames, task_index -> logits, num_classes)
        labels/<task>.txt       one label per line, per task (tasks_json holds them too)
    <task>/                     with --single-task-models: one graph per task
        config.pbtxt            logits carries label_filename (Triton's classification extension)
        1/model.onnx
        labels.txt

Shapes in the config leave out the batch axis (``max_batch_size > 0``). A
per-clip scalar such as ``task_index`` is ``[batch]`` in the graph, so Triton's
API shape is ``dims: [1]`` with ``reshape: { shape: [ ] }`` (clients send
``[batch, 1]``; the backend hands the model ``[batch]``), and likewise for the
``num_classes`` output. Every config is built as Triton's ModelConfig protobuf
(shipped with tritonclient), printed in text format, then read back and checked
against its ONNX graph.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from stadapter.bundle import TaskBundle
from stadapter.fsutil import atomic_dir
from stadapter.trunk import VideoTrunk

from .onnx_export import (
    ExportError,
    ExportOptions,
    ExportReport,
    common_shape,
    export_multitask,
    export_single,
    tasks_manifest,
)
from .tensorrt import TRITON_DEFAULT_TENSORRT, TRITON_TRT_CACHE, TensorRTSettings, Version, parse_version

MULTITASK_MODEL = "stadapter_multitask"
TASKS_PARAM = "tasks_json"
MODEL_FILE = "model.onnx"
Kind = Literal["auto", "gpu", "cpu"]
KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}


@dataclass(frozen=True)
class TritonOptions:
    """Serving settings written into every config.pbtxt.

    Args:
        max_batch_size: largest batch Triton forms (clips, across requests and tasks).
        instances: model instances per device (instance_group count).
        kind: ``auto`` (GPU if present), ``gpu`` or ``cpu``.
        tensorrt: add the onnxruntime TensorRT accelerator and a warm-up at max batch so the
            engine is built at load time, not on the first request.
        trt_version: the TensorRT inside the Triton that will serve it; None = 10.x or older
            (weakly typed: ``precision_mode`` FP16). From 11 the engine has the graph's precision
            (export with ``--fp16`` for an fp16 engine) and no ``precision_mode`` is written.
        single_task_models: also write one model per task, named by the task.
        max_queue_delay_us: how long the dynamic batcher waits to fill a batch.
        preferred_batch_sizes: None = powers of two from 4 up to max_batch_size (and it).
    """

    max_batch_size: int = 32
    instances: int = 1
    kind: Kind = "auto"
    tensorrt: bool = False
    trt_version: Optional[str] = None
    single_task_models: bool = False
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ExportError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.instances, int) or self.instances < 1:
            raise ExportError(f"instances must be an int >= 1, got {self.instances!r}")
        if self.kind not in KINDS:
            raise ExportError(f"kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.tensorrt and self.kind == "cpu":
            raise ExportError("the TensorRT accelerator needs GPU instances; use --kind gpu or auto")
        if self.trt_version is not None:
            parse_version(self.trt_version)  # refuses what is not a version
        if self.max_queue_delay_us < 0:
            raise ExportError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        bad = [b for b in self.batch_sizes() if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ExportError(f"preferred batch sizes {bad} are outside 1..max_batch_size={self.max_batch_size}")

    @property
    def tensorrt_version(self) -> Version:
        return TRITON_DEFAULT_TENSORRT if self.trt_version is None else parse_version(self.trt_version)

    def batch_sizes(self) -> tuple[int, ...]:
        if self.preferred_batch_sizes is not None:
            return tuple(sorted(set(self.preferred_batch_sizes)))
        sizes, b = [], 4
        while b < self.max_batch_size:
            sizes.append(b)
            b *= 2
        return tuple(sizes + [self.max_batch_size])


@dataclass(frozen=True)
class TensorSpec:
    """One config input/output: name, Triton type, dims without batch, and whether it is reshaped to [batch]."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    batch_only: bool = False  # graph shape [batch]: API dims [1] + reshape { shape: [ ] }
    label_filename: str = ""


def multitask_tensors(num_frames: int, size: int, c_max: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    frames = TensorSpec("frames", "TYPE_FP32", (num_frames, 3, size, size))
    return (
        [frames, TensorSpec("task_index", "TYPE_INT64", (1,), batch_only=True)],
        [TensorSpec("logits", "TYPE_FP32", (c_max,)), TensorSpec("num_classes", "TYPE_INT64", (1,), batch_only=True)],
    )


def single_tensors(num_frames: int, size: int, num_classes: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [TensorSpec("frames", "TYPE_FP32", (num_frames, 3, size, size))],
        [TensorSpec("logits", "TYPE_FP32", (num_classes,), label_filename="labels.txt")],
    )


# ----------------------------------------------------------------------------- config


def build_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    options: TritonOptions,
    parameters: Optional[dict[str, str]] = None,
    graph_fp16: bool = False,
):
    """Triton's ModelConfig protobuf for an onnxruntime_onnx model with a dynamic batch axis.

    ``graph_fp16``: the graph is float16 inside (``--fp16``); with TensorRT >= 11 that is the engine's precision.
    """
    pb2 = model_config_pb2()
    cfg = pb2.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=options.max_batch_size,
                          default_model_filename=MODEL_FILE)
    for specs, field in ((inputs, cfg.input), (outputs, cfg.output)):
        for t in specs:
            entry = field.add(name=t.name, data_type=pb2.DataType.Value(t.data_type), dims=list(t.dims))
            if t.batch_only:
                entry.reshape.SetInParent()  # shape [ ]: the model sees [batch]
            if t.label_filename:
                entry.label_filename = t.label_filename
    cfg.dynamic_batching.preferred_batch_size.extend(options.batch_sizes())
    cfg.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    cfg.instance_group.add(count=options.instances, kind=pb2.ModelInstanceGroup.Kind.Value(KINDS[options.kind]))
    if options.tensorrt:
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        settings = TensorRTSettings(options.tensorrt_version, graph_fp16=graph_fp16, cache_dir=TRITON_TRT_CACHE)
        trt.parameters.update(settings.triton_parameters())
        warmup = cfg.model_warmup.add(name="max_batch_zeros", batch_size=options.max_batch_size)
        for t in inputs:  # one zero-data request at max batch: TensorRT builds its engine while the model loads
            warmup.inputs[t.name].CopyFrom(
                pb2.ModelWarmup.Input(data_type=pb2.DataType.Value(t.data_type), dims=list(t.dims), zero_data=True))
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def render_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    options: TritonOptions,
    parameters: Optional[dict[str, str]] = None,
    graph_fp16: bool = False,
) -> str:
    """config.pbtxt text: :func:`build_config` printed in protobuf text format."""
    from google.protobuf import text_format

    cfg = build_config(name, inputs, outputs, options, parameters, graph_fp16)
    return text_format.MessageToString(cfg, as_utf8=True)


# ----------------------------------------------------------------------------- validation


def model_config_pb2():
    """Triton's ModelConfig protobuf module as shipped with tritonclient."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:  # pragma: no cover - tritonclient is a declared dependency of export
        raise ExportError("tritonclient[grpc] is needed to validate Triton configs (pip install 'tritonclient[grpc]')") from e
    return model_config_pb2


def parse_config(text: str):
    """Parse config.pbtxt text into Triton's ModelConfig (raises ExportError naming the problem)."""
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ExportError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from e


_ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64", 10: "TYPE_FP16"}  # onnx.TensorProto enum -> Triton


def validate_model_dir(model_dir: str | os.PathLike, expected_name: Optional[str] = None):
    """Parse ``config.pbtxt`` and check it against ``1/model.onnx``: names, types, dims, batch axis.

    ``expected_name``: the model name (default: the folder name; Triton requires them equal).
    Returns the parsed ModelConfig.
    """
    import onnx

    model_dir = Path(model_dir)
    cfg = parse_config((model_dir / "config.pbtxt").read_text(encoding="utf-8"))
    pb2 = model_config_pb2()
    if cfg.name != (expected_name or model_dir.name):
        raise ExportError(f"{model_dir}: config name {cfg.name!r} differs from the model folder name {expected_name or model_dir.name!r}")
    if cfg.platform != "onnxruntime_onnx":
        raise ExportError(f"{model_dir}: platform {cfg.platform!r}, expected onnxruntime_onnx")
    graph = onnx.load(str(model_dir / "1" / MODEL_FILE), load_external_data=False).graph
    for kind, declared, actual in (("input", cfg.input, graph.input), ("output", cfg.output, graph.output)):
        by_name = {v.name: v for v in actual}
        if sorted(t.name for t in declared) != sorted(by_name):
            raise ExportError(f"{model_dir}: config {kind}s {[t.name for t in declared]} != graph {kind}s {sorted(by_name)}")
        for t in declared:
            v = by_name[t.name].type.tensor_type
            want_type = _ONNX_TO_TRITON.get(v.elem_type, f"onnx elem_type {v.elem_type}")
            got_type = pb2.DataType.Name(t.data_type)
            if got_type != want_type:
                raise ExportError(f"{model_dir}: {kind} {t.name!r} is {got_type} in config but {want_type} in the graph")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.shape.dim]
            if cfg.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise ExportError(f"{model_dir}: {kind} {t.name!r} has no dynamic batch axis in the graph ({dims})")
                dims = dims[1:]
            model_shape = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            if model_shape != dims:
                raise ExportError(
                    f"{model_dir}: {kind} {t.name!r}: config gives the model shape {model_shape} (batch excluded), graph has {dims}"
                )
            if t.HasField("reshape") and _numel(t.dims) != _numel(t.reshape.shape):
                raise ExportError(f"{model_dir}: {kind} {t.name!r}: dims {list(t.dims)} and reshape {list(t.reshape.shape)} differ in size")
            if kind == "output" and t.label_filename and not (model_dir / t.label_filename).is_file():
                raise ExportError(f"{model_dir}: label file {t.label_filename!r} is missing")
    if TASKS_PARAM in cfg.parameters:
        try:
            json.loads(cfg.parameters[TASKS_PARAM].string_value)
        except json.JSONDecodeError as e:
            raise ExportError(f"{model_dir}: parameter {TASKS_PARAM} is not valid JSON: {e}") from e
    return cfg


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def read_tasks_param(cfg) -> dict[str, Any]:
    """The task manifest from a ModelConfig (e.g. what tritonclient's get_model_config returns)."""
    if TASKS_PARAM not in cfg.parameters:
        raise ExportError(f"model {cfg.name!r} has no {TASKS_PARAM!r} parameter")
    return json.loads(cfg.parameters[TASKS_PARAM].string_value)


# ----------------------------------------------------------------------------- repository


@dataclass(frozen=True)
class RepositoryReport:
    root: Path
    models: dict[str, ExportReport]

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "models": {k: v.to_dict() for k, v in self.models.items()}}


def _write_model(
    out: Path, name: str, export_fn, config_text: str, labels: dict[str, Sequence[str]]
) -> ExportReport:
    """Export into a temp copy of the model folder, write config + labels, validate, swap in atomically."""
    with atomic_dir(out / name, replace=True) as tmp:
        (tmp / "1").mkdir()
        report = export_fn(tmp / "1" / MODEL_FILE)
        (tmp / "config.pbtxt").write_text(config_text, encoding="utf-8")
        for rel, lines in labels.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text("".join(f"{label}\n" for label in lines), encoding="utf-8")
        validate_model_dir(tmp, expected_name=name)
    final = out / name / "1" / MODEL_FILE
    return dataclasses.replace(report, path=final)


def write_repository(
    trunk: VideoTrunk,
    bundles: Sequence[TaskBundle],
    out: str | os.PathLike,
    options: TritonOptions = TritonOptions(),
    export_options: ExportOptions = ExportOptions(),
) -> RepositoryReport:
    """Export the multi-task model (and per-task models if asked) into a Triton repository at ``out``."""
    out = Path(out)
    T, S = common_shape(bundles, export_options.num_frames)
    names = [b.spec.name for b in bundles]
    for b in bundles:
        bad = [label for label in b.spec.labels if "\n" in label or "\r" in label]
        if bad:
            raise ExportError(f"task {b.spec.name!r}: label {bad[0]!r} holds a line break; Triton label files are one label per line")
    if options.single_task_models and MULTITASK_MODEL in names:
        raise ExportError(f"a task named {MULTITASK_MODEL!r} would overwrite the multi-task model; rename the task")
    models: dict[str, ExportReport] = {}
    manifest = tasks_manifest(trunk, bundles, T)
    c_max = max(b.spec.num_classes for b in bundles)
    ins, outs = multitask_tensors(T, S, c_max)
    text = render_config(MULTITASK_MODEL, ins, outs, options, {TASKS_PARAM: json.dumps(manifest, ensure_ascii=False)},
                         export_options.fp16)
    models[MULTITASK_MODEL] = _write_model(
        out, MULTITASK_MODEL, lambda p: export_multitask(trunk, bundles, p, export_options), text,
        {f"labels/{b.spec.name}.txt": b.spec.labels for b in bundles},
    )
    if options.single_task_models:
        for b in bundles:
            one = tasks_manifest(trunk, [b], T)
            ins, outs = single_tensors(T, S, b.spec.num_classes)
            text = render_config(b.spec.name, ins, outs, options, {TASKS_PARAM: json.dumps(one, ensure_ascii=False)},
                                 export_options.fp16)
            models[b.spec.name] = _write_model(
                out, b.spec.name, lambda p, b=b: export_single(trunk, b, p, export_options), text, {"labels.txt": b.spec.labels}
            )
    return RepositoryReport(out, models)
