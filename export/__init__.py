"""ONNX / TensorRT export and the Triton model repository (``python -m export --help``).

Modules: :mod:`export.modules` (exportable wrappers), :mod:`export.onnx_export`
(single and multi-task graphs, parity), :mod:`export.triton` (config.pbtxt,
validation against Triton's ModelConfig), :mod:`export.runtime` (onnxruntime
providers), :mod:`export.check` (parity + speed on cpu / cuda / tensorrt).
"""

from .onnx_export import ExportError, ExportOptions, ExportReport, export_multitask, export_single, load_tasks

__all__ = ["ExportError", "ExportOptions", "ExportReport", "export_multitask", "export_single", "load_tasks"]
