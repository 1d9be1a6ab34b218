"""Classify clips on Triton Inference Server serving the multi-task model that ``export/`` writes.

The model (default ``stadapter_multitask``) takes ``frames`` FP32 ``[batch, T, 3, S, S]`` and
``task_index`` INT64 ``[batch, 1]`` (one per row), and returns ``logits`` FP32 ``[batch, C_max]``
(zero-padded to the widest head) and ``num_classes`` INT64 ``[batch, 1]``. Its config
parameter ``tasks_json`` names each task's index, labels and sampling. Here the client
decodes and preprocesses (``stadapter.video``, needs torch + PyAV: imported only when a
clip is decoded), sends one row per view, takes the softmax over each row's real classes,
averages the views, and returns the same :class:`~clients.core.ClassifyResult` as the
native client, so the CLI prints the same table / JSON.

    python -m clients triton-classify --url 127.0.0.1:8001 --task motion clip.mp4
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import grpc
import numpy as np

from .core import ClassifyResult, ClientError, Clip, Prediction, read_clip

TASKS_PARAM = "tasks_json"
DEFAULT_MODEL = "stadapter_multitask"


@dataclass(frozen=True)
class TritonTask:
    name: str
    index: int
    version: int
    labels: tuple[str, ...]
    num_frames: int
    input_size: int
    sampling: Mapping[str, Any]


def parse_manifest(text: str) -> dict[str, TritonTask]:
    """``tasks_json`` -> tasks by name."""
    try:
        data = json.loads(text)
        return {t["name"]: TritonTask(t["name"], int(t["index"]), int(t.get("version", 0)), tuple(t["labels"]),
                                      int(t["num_frames"]), int(t["input_size"]), dict(t["sampling"]))
                for t in data["tasks"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ClientError(grpc.StatusCode.FAILED_PRECONDITION, f"the model's {TASKS_PARAM} is not a task manifest: {e}",
                          local=True) from e


def build_inputs(frames: np.ndarray, task_index: int) -> list[tuple[str, np.ndarray, str]]:
    """(name, array, Triton datatype) of one request: every row (view) of a clip gets the task's index."""
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"frames must be [views, T, 3, S, S], got {frames.shape}",
                          local=True)
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    index = np.full((frames.shape[0], 1), task_index, dtype=np.int64)  # dims [1] + reshape [] in config.pbtxt
    return [("frames", frames, "FP32"), ("task_index", index, "INT64")]


def softmax_views(logits: np.ndarray, num_classes: np.ndarray) -> np.ndarray:
    """Mean over rows (views) of the softmax over each row's first ``num_classes`` logits: [C]."""
    n = {int(c) for c in np.asarray(num_classes).reshape(-1)}
    if len(n) != 1:
        raise ClientError(grpc.StatusCode.INTERNAL, f"views of one clip report different class counts {sorted(n)}")
    c = n.pop()
    z = logits[:, :c].astype(np.float64)  # [V, C]
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).mean(axis=0)


def top_predictions(probs: np.ndarray, labels: Sequence[str], top_k: int) -> tuple[Prediction, ...]:
    if len(probs) != len(labels):
        raise ClientError(grpc.StatusCode.INTERNAL,
                          f"the model returned {len(probs)} classes, the task has {len(labels)}")
    k = len(labels) if top_k <= 0 else min(top_k, len(labels))
    order = np.argsort(-probs, kind="stable")[:k]
    return tuple(Prediction(labels[i], float(probs[i]), int(i)) for i in order)


def preprocess(clip: Clip, task: TritonTask) -> np.ndarray:
    """Decode the task's sampled frames: float32 [V, T, 3, S, S] (V = temporal x spatial views)."""
    try:
        from stadapter.config import SamplingConfig
        from stadapter.video import VideoError, decode_clip
    except ImportError as e:  # the SDK alone does not need torch/av; this path does
        raise ClientError(grpc.StatusCode.FAILED_PRECONDITION,
                          f"decoding for Triton needs the stadapter package with torch and av installed ({e})",
                          local=True) from e
    cfg = SamplingConfig.from_dict({**task.sampling, "num_frames": task.num_frames, "input_size": task.input_size})
    try:
        return decode_clip(read_clip(clip), cfg).numpy()
    except VideoError as e:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"bad clip: {e}", local=True) from e


class TritonClassifier:
    """``TritonClassifier("127.0.0.1:8001").classify("clip.mp4", "motion")``."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = DEFAULT_MODEL, timeout_s: float = 60.0,
                 ssl: bool = False, root_certificates: Optional[str] = None):
        import tritonclient.grpc as tgrpc
        from tritonclient.utils import InferenceServerException

        self._tgrpc, self._exc = tgrpc, InferenceServerException
        self.model, self.timeout_s = model, timeout_s
        self._client = tgrpc.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates)
        cfg = self._call(lambda: self._client.get_model_config(model, client_timeout=timeout_s)).config
        if TASKS_PARAM not in cfg.parameters:
            raise ClientError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"model {model!r} has no {TASKS_PARAM!r} parameter: not a stadapter multi-task export",
                              local=True)
        self.tasks = parse_manifest(cfg.parameters[TASKS_PARAM].string_value)

    def _call(self, fn):
        try:
            return fn()
        except self._exc as e:
            code = _status(e.status())
            raise ClientError(code, e.message() or str(e)) from None

    def task(self, name: str) -> TritonTask:
        if name not in self.tasks:
            raise ClientError(grpc.StatusCode.NOT_FOUND,
                              f"unknown task {name!r}; model {self.model!r} serves {sorted(self.tasks)}")
        return self.tasks[name]

    def infer(self, frames: np.ndarray, task: TritonTask) -> tuple[np.ndarray, np.ndarray]:
        """One request: logits [V, C_max], num_classes [V, 1]."""
        inputs = []
        for name, array, dtype in build_inputs(frames, task.index):
            inp = self._tgrpc.InferInput(name, list(array.shape), dtype)
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        outputs = [self._tgrpc.InferRequestedOutput("logits"), self._tgrpc.InferRequestedOutput("num_classes")]
        r = self._call(lambda: self._client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s))
        return r.as_numpy("logits"), r.as_numpy("num_classes")

    def classify(self, clip: Clip, task: str, top_k: int = 5) -> ClassifyResult:
        t = self.task(task)
        t0 = time.perf_counter()
        frames = preprocess(clip, t)  # [V, T, 3, S, S]
        t1 = time.perf_counter()
        logits, num_classes = self.infer(frames, t)
        t2 = time.perf_counter()
        preds = top_predictions(softmax_views(logits, num_classes), t.labels, top_k)
        timings = {"decode_ms": (t1 - t0) * 1e3, "queue_ms": 0.0, "compute_ms": (t2 - t1) * 1e3,
                   "total_ms": (t2 - t0) * 1e3, "batch_size": 0}
        return ClassifyResult(t.name, t.version, preds, timings, "")

    def close(self) -> None:
        self._client.close()


def _status(text: Optional[str]) -> grpc.StatusCode:
    """tritonclient reports statuses as strings such as 'StatusCode.UNAVAILABLE'."""
    name = (text or "").rsplit(".", 1)[-1]
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
