"""What the Open Inference Protocol's two wire forms (gRPC: ``server.frontends.oip_grpc``, HTTP/REST: ``server.frontends.http``) share.

Every served task is a model with one input ``CLIP`` (BYTES ``[N]``) and two outputs,
``LABELS`` (BYTES ``[N, k]``) and ``SCORES`` (FP32 ``[N, k]``); the model's signature,
metadata and lookup are the data plane's (``server.dataplane.catalog``). Here: the
request parameters, the input's checks and the output tensors as raw bytes. The wire forms only parse their
requests and write their answers.
"""

from __future__ import annotations

from typing import Any, Sequence

from server.engine.pipeline import Classification
from server.errors import BadRequest
from server.frontends.oip_tensors import ParamSpec, element_count, fp32_bytes, join_bytes_elements
from server.registry.registry import TaskVersion
from stadapter.config import brief
from stadapter_api.wire import OIP_CLIP_INPUT, OIP_LABELS_OUTPUT, OIP_SCORES_OUTPUT

OUTPUTS = (OIP_LABELS_OUTPUT, OIP_SCORES_OUTPUT)
PARAMETERS = (
    ParamSpec("top_k", "int64_param"),
    ParamSpec("num_frames", "int64_param"),
    ParamSpec("mode", "string_param"),
    ParamSpec("stride", "int64_param"),
    ParamSpec("temporal_views", "int64_param"),
    ParamSpec("spatial_views", "int64_param"),
    ParamSpec("autorotate", "bool_param"),
    ParamSpec("seek", "string_param"),
)


def split_top_k(params: dict[str, Any]) -> int:
    """Take ``top_k`` out of the parsed request parameters (0 = the server's default); the rest are overrides."""
    top_k = params.pop("top_k", 0)
    assert isinstance(top_k, int)  # read_parameters took it from an int64 parameter
    if top_k < 0:
        raise BadRequest(f"request parameter top_k must be >= 0, got {brief(top_k)}")
    return top_k


def requested_outputs(names: Sequence[str]) -> tuple[str, ...]:
    """The outputs a request names, in its order (all of them when it names none)."""
    wanted = tuple(names) or OUTPUTS
    unknown = sorted(set(wanted) - set(OUTPUTS))
    if unknown:
        raise BadRequest(f"unknown output(s) {brief(unknown)}; the outputs are {list(OUTPUTS)}")
    return wanted


def check_input(names: Sequence[str], datatype: str, shape: Sequence[int]) -> int:
    """The clip count ``N`` of a request whose inputs are ``names``, the one being ``datatype`` ``shape``."""
    if len(names) != 1 or names[0] != OIP_CLIP_INPUT:
        raise BadRequest(f"the model takes one input, {OIP_CLIP_INPUT!r} (BYTES [N], one encoded clip per "
                         f"element); got inputs {brief(list(names))}")
    if datatype != "BYTES":
        raise BadRequest(f"input {OIP_CLIP_INPUT!r} must be BYTES, got {brief(datatype)}")
    n = element_count(shape)
    if n is None or n == 0:
        raise BadRequest(f"input {OIP_CLIP_INPUT!r} must have shape [N] with N >= 1 clips, got {brief(list(shape))}")
    return n


def output_tensors(tv: TaskVersion, results: Sequence[Classification]) -> dict[str, tuple[str, list[int], bytes]]:
    """``{name: (datatype, shape, raw bytes)}`` of both outputs, ``[N, k]`` with the smallest k of the clips."""
    k = min(len(r.top) for r in results)
    labels = tv.spec.labels
    shape = [len(results), k]
    return {
        OIP_LABELS_OUTPUT: ("BYTES", shape, join_bytes_elements([labels[i].encode() for r in results
                                                                 for i, _ in r.top[:k]])),
        OIP_SCORES_OUTPUT: ("FP32", shape, fp32_bytes([p for r in results for _, p in r.top[:k]])),
    }
