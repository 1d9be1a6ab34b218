"""What the Open Inference Protocol's two wire forms (gRPC: ``server.frontends.oip_grpc``, HTTP/REST: ``server.frontends.http``) share.

Every served task is a model with one input ``CLIP`` (BYTES ``[N]``) and two outputs,
``LABELS`` (BYTES ``[N, k]``) and ``SCORES`` (FP32 ``[N, k]``). Here: the model's
signature, its lookup by name and version, the request parameters, the clip checks,
classifying the ``N`` clips on one ticket, and the output tensors as raw bytes. The
wire forms only parse their requests and write their answers.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping, Optional, Sequence

from server.engine.admission import Ticket
from server.engine.pipeline import Classification, Pipeline
from server.errors import BadRequest, TaskNotFound
from server.frontends.oip_tensors import ParamSpec, element_count, fp32_bytes, join_bytes_elements
from server.limits import ServerLimits
from server.registry.registry import TaskRegistry, TaskVersion
from stadapter.config import brief
from stadapter_api.wire import OIP_CLIP_INPUT, OIP_LABELS_OUTPUT, OIP_SCORES_OUTPUT

SERVER_NAME = "stadapter"
PLATFORM = "stadapter"
OUTPUTS = (OIP_LABELS_OUTPUT, OIP_SCORES_OUTPUT)
INPUT_SIGNATURE = ((OIP_CLIP_INPUT, "BYTES", (-1,)),)  # (name, datatype, shape) of each input
OUTPUT_SIGNATURE = ((OIP_LABELS_OUTPUT, "BYTES", (-1, -1)), (OIP_SCORES_OUTPUT, "FP32", (-1, -1)))
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


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stadapter-serve")
    except PackageNotFoundError:
        return "0"


async def served_model(registry: TaskRegistry, name: str, version: str) -> TaskVersion:
    """Task ``name`` at ``version`` (empty: the served one; else a servable version, as ``name@N`` pins it,
    its first load off the event loop); NOT_FOUND for an unknown task or a version that is not servable."""
    if version:
        await registry.preload(f"{name}@{version}")
    tv = registry.get(name)  # TaskNotFound: NOT_FOUND, naming the served tasks (``name@N``: that version)
    if version in ("", str(tv.version)):
        return tv
    try:
        return registry.get(f"{tv.name}@{version}")  # the registry's pin: it decides what is servable
    except (TaskNotFound, BadRequest) as e:  # a malformed version names no model: NOT_FOUND, as in the protocol
        raise TaskNotFound(f"model {tv.name!r} is served at version {tv.version}; version {brief(version)} is not "
                           f"servable (servable versions: {registry.servable_versions(tv.name)})") from e


def model_ready(registry: TaskRegistry, draining: bool, name: str, version: str) -> bool:
    tv = registry.tasks.get(name)
    servable = version == "" or (version.isdigit() and int(version) in registry.servable_versions(name))
    return tv is not None and not draining and servable


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


def check_clip_sizes(clips: Sequence[bytes], limits: ServerLimits) -> None:
    for i, clip in enumerate(clips):
        if len(clip) > limits.max_clip_bytes:
            raise BadRequest(f"clip {i} is {len(clip)} bytes, above the server's --max-clip-bytes of "
                             f"{limits.max_clip_bytes}")


async def classify_clips(pipeline: Pipeline, ticket: Ticket, tv: TaskVersion, clips: Sequence[bytes], top_k: int,
                         overrides: Mapping[str, Any], deadline: Optional[float]) -> list[Classification]:
    """Every clip on the request's ticket (the caller holds their bytes); the first failure is the answer."""
    task = tv.name if pipeline.registry.tasks.get(tv.name) is tv else f"{tv.name}@{tv.version}"  # a pinned version
    results = await asyncio.gather(
        *(pipeline.classify(ticket, task, clip, top_k, overrides, deadline) for clip in clips),
        return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if isinstance(r, Classification)]


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
