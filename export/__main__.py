"""``python -m export {onnx,multitask,triton,check,validate,trtexec}``; prints one JSON object, errors exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from stadapter.bundle import BundleError
from stadapter.config import ConfigError
from stadapter.trunk import TrunkError

from .onnx_export import ExportError, ExportOptions, export_multitask, export_single, load_tasks
from .runtime import ORT_PROVIDERS, ProviderUnavailable

TRT_VERSION_HELP = ("TensorRT version that builds the engine, e.g. 10.3 or 11.0 (default: this machine's tensorrt package "
                    "or trtexec); from 11 the engine has the graph's precision (export with --fp16 for fp16)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trunk", required=True, help="trunk folder (trunk.json + weights)")
    p.add_argument("--frames", type=int, help="frames per clip T (default: the tasks' sampling.num_frames)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20 dynamo, 17 legacy)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and maths inside (inputs/outputs stay float32)")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                   help="torch.onnx exporter: dynamo (torch.export, default) or legacy (TorchScript)")
    p.add_argument("--tol", type=float, help="parity tolerance (default 1e-4, 2e-2 with --fp16)")


def _options(args) -> ExportOptions:
    return ExportOptions(num_frames=args.frames, opset=args.opset, fp16=args.fp16, exporter=args.exporter, tolerance=args.tol)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="ONNX / Triton / TensorRT export of ST-Adapter tasks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("onnx", help="one task: frames -> logits")
    _export_args(one)
    one.add_argument("--task", required=True, help="task bundle folder (task.json + adapter.safetensors)")
    one.add_argument("--out", required=True, help="output .onnx file")
    multi = sub.add_parser("multitask", help="several tasks: (frames, task_index) -> (logits, num_classes)")
    _export_args(multi)
    multi.add_argument("--tasks", nargs="+", required=True, help="task bundle folders; task i = the i-th folder")
    multi.add_argument("--out", required=True)
    tri = sub.add_parser("triton", help="write a Triton model repository")
    _export_args(tri)
    tri.add_argument("--tasks", nargs="+", required=True)
    tri.add_argument("--out", required=True, help="repository root, e.g. model_repository/triton")
    tri.add_argument("--max-batch-size", type=int, default=32)
    tri.add_argument("--instances", type=int, default=1)
    tri.add_argument("--kind", choices=("auto", "gpu", "cpu"), default="auto")
    tri.add_argument("--tensorrt", action="store_true",
                     help="onnxruntime TensorRT accelerator + warm-up (FP16 kernels on TensorRT < 11, else the graph's precision)")
    tri.add_argument("--trt-version", help="TensorRT inside the serving Triton (default: 10.x or older; 11 and later need "
                     "onnxruntime >= 1.27 there and take the precision from the graph: export with --fp16)")
    tri.add_argument("--single-task-models", action="store_true", help="also one model per task, named by the task")
    tri.add_argument("--max-queue-delay-us", type=int, default=2000)
    tri.add_argument("--preferred-batch-sizes", type=int, nargs="+")
    chk = sub.add_parser("check", help="parity + speed of an exported graph on one provider")
    chk.add_argument("--onnx", required=True)
    chk.add_argument("--provider", choices=sorted(ORT_PROVIDERS), default="cpu")
    chk.add_argument("--trunk", help="with --tasks: compare with PyTorch (else with onnxruntime-cpu)")
    chk.add_argument("--tasks", nargs="*", default=[])
    chk.add_argument("--batch", type=int, default=4)
    chk.add_argument("--repeats", type=int, default=10)
    chk.add_argument("--tol", type=float, help="default: 1e-4 cpu, 1e-3 cuda, 5e-2 tensorrt")
    chk.add_argument("--trt-fp32", action="store_true",
                     help="TensorRT without fp16 (TensorRT >= 11: refused for an --fp16 graph, whose precision is the engine's)")
    chk.add_argument("--trt-version", help=TRT_VERSION_HELP)
    chk.add_argument("--trt-cache", help="TensorRT engine cache folder")
    chk.add_argument("--threads", type=int)
    val = sub.add_parser("validate", help="parse every config.pbtxt of a Triton repository and check it against its graph")
    val.add_argument("root")
    trt = sub.add_parser("trtexec", help="print the trtexec command that builds an engine of an exported graph")
    trt.add_argument("--onnx", required=True)
    trt.add_argument("--trt-version", help=TRT_VERSION_HELP)
    trt.add_argument("--max-batch", type=int, default=32)
    trt.add_argument("--opt-batch", type=int)
    return p


def run(args) -> dict:
    from stadapter import load_trunk

    if args.cmd in ("onnx", "multitask", "triton"):
        trunk = load_trunk(args.trunk)
        bundles = load_tasks(trunk, [args.task] if args.cmd == "onnx" else args.tasks)
        opts = _options(args)
        if args.cmd == "onnx":
            return export_single(trunk, bundles[0], args.out, opts).to_dict()
        if args.cmd == "multitask":
            return export_multitask(trunk, bundles, args.out, opts).to_dict()
        from .triton import TritonOptions, write_repository

        tri = TritonOptions(
            max_batch_size=args.max_batch_size, instances=args.instances, kind=args.kind, tensorrt=args.tensorrt,
            trt_version=args.trt_version,
            single_task_models=args.single_task_models, max_queue_delay_us=args.max_queue_delay_us,
            preferred_batch_sizes=tuple(args.preferred_batch_sizes) if args.preferred_batch_sizes else None,
        )
        return write_repository(trunk, bundles, args.out, tri, opts).to_dict()
    if args.cmd == "check":
        from .check import check_graph

        if bool(args.trunk) != bool(args.tasks):
            raise ExportError("--trunk and --tasks go together (the PyTorch reference needs both)")
        return check_graph(
            args.onnx, args.provider, args.trunk, args.tasks, args.batch, args.repeats, args.tol,
            trt_fp16=False if args.trt_fp32 else None, trt_cache=args.trt_cache, threads=args.threads,
            trt_version=args.trt_version,
        )
    if args.cmd == "validate":
        from .triton import validate_model_dir

        root = Path(args.root)
        dirs = sorted(d for d in root.iterdir() if (d / "config.pbtxt").is_file()) if root.is_dir() else []
        if not dirs:
            raise ExportError(f"{root}: no model folders with a config.pbtxt")
        return {"root": str(root), "valid": [validate_model_dir(d).name for d in dirs]}
    return trtexec_report(args.onnx, args.max_batch, args.opt_batch, args.trt_version)


def trtexec_report(onnx: str, max_batch: int, opt_batch: Optional[int], trt_version: Optional[str]) -> dict:
    """The trtexec command for ``trt_version`` (or this machine's TensorRT). With neither, one command per
    TensorRT generation, and ``command`` is the one for TensorRT < 10 (what this printed before versions mattered)."""
    from .check import graph_info, input_shapes
    from .tensorrt import TensorRTSettings, TensorRTVersionError, installed_tensorrt_version, parse_version, show

    info = graph_info(onnx)
    shapes = input_shapes(info)
    text = trt_version if trt_version is not None else installed_tensorrt_version()
    if text is not None:
        settings = TensorRTSettings(parse_version(text), graph_fp16=info.fp16)
        return {"command": settings.trtexec_command(onnx, shapes, max_batch, opt_batch), "tensorrt_version": show(settings.version),
                "graph_fp16": info.fp16, "engine_precision": settings.engine_precision()}
    by_version = {}
    for label, version in (("<10", (8, 6)), ("10.x", (10, 0)), (">=11", (11, 0))):
        try:
            by_version[label] = TensorRTSettings(version, graph_fp16=info.fp16).trtexec_command(onnx, shapes, max_batch, opt_batch)
        except TensorRTVersionError as e:
            by_version[label] = f"error: {e}"
    return {"command": by_version["<10"], "commands_by_tensorrt": by_version, "tensorrt_version": None, "graph_fp16": info.fp16,
            "note": "no TensorRT here and no --trt-version: pass --trt-version for the command of the TensorRT that builds the engine"}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ExportError, BundleError, TrunkError, ConfigError, ProviderUnavailable, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.cmd == "check" and not result.get("ok", True):
        print(f"error: parity failed: max abs diff {result['max_abs_diff']:.3g} > {result['tolerance']:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
