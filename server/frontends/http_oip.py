"""The Open Inference Protocol's REST ``infer`` body, with Triton's binary-data extension (what tritonclient.http sends).

A request body is a JSON object, optionally followed by binary tensor data: then the
``Inference-Header-Content-Length`` header gives the JSON's length, and each input
that travels binary says its size in ``parameters.binary_data_size`` (for BYTES, the
4-byte little-endian length + bytes serialization, as over gRPC). An input without
it carries its elements in ``data`` (for BYTES, JSON strings, taken as UTF-8: fine
for text, useless for video files, so clients send ``CLIP`` binary).

Outputs go back binary when the request asks (``parameters.binary_data_output``, or
an output's own ``parameters.binary_data``, which wins), else as JSON ``data``.
Pure functions over bytes and dicts; the endpoint is ``server.frontends.http``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from server.errors import BadRequest
from server.frontends.oip_model import check_input
from server.frontends.oip_tensors import split_bytes_elements
from stadapter.config import brief
from stadapter_api.wire import OIP_CLIP_INPUT

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class InferHeader:
    """What the JSON part of one infer request asks for."""

    id: str
    parameters: dict[str, Any]  # the request's parameters (model parameters and Triton's reserved ones)
    count: int  # N clips
    binary_size: Optional[int]  # bytes of CLIP's binary data after the JSON; None when it is in ``data``
    data: Optional[list]  # CLIP's JSON elements when it is not binary
    outputs: tuple[tuple[str, Optional[bool]], ...]  # (name, binary_data or None = the request's default)


def header_length(value: Optional[str]) -> Optional[int]:
    """The JSON's length from the ``Inference-Header-Content-Length`` header's value (None: absent, all JSON)."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count, got {brief(value)}")
    return n


def parse_header(raw: bytes | bytearray) -> InferHeader:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"the infer request's JSON does not parse: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"the infer request must be a JSON object, got {type(doc).__name__}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise BadRequest("the infer request needs \"inputs\": a list of tensor objects")
    t = inputs[0] if inputs else {}
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        shape = [-1]  # reported by check_input as a bad shape
    n = check_input([str(i.get("name", "")) for i in inputs], str(t.get("datatype", "")), shape)
    params = t.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise BadRequest(f"input {OIP_CLIP_INPUT!r} has a bad binary_data_size {brief(size)}")
    data = t.get("data")
    if size is None and not isinstance(data, list):
        raise BadRequest(f"input {OIP_CLIP_INPUT!r} carries neither binary data (parameters.binary_data_size) "
                         "nor a \"data\" list")
    outputs = []
    for o in doc.get("outputs") or ():
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("each requested output must be an object with a \"name\"")
        op = o.get("parameters") or {}
        binary = op.get("binary_data") if isinstance(op, dict) else None
        outputs.append((o["name"], binary if isinstance(binary, bool) else None))
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"the request's parameters must be a JSON object, got {type(parameters).__name__}")
    return InferHeader(str(doc.get("id", ""))[:256], parameters, n, size, data if size is None else None,
                       tuple(outputs))


def clips_of(header: InferHeader, binary: bytes | bytearray | memoryview) -> list[bytes]:
    """The request's clips, from the binary data after the JSON or from the JSON ``data``."""
    if header.binary_size is not None:
        if len(binary) != header.binary_size:
            raise BadRequest(f"input {OIP_CLIP_INPUT!r} says {header.binary_size} binary bytes; the body holds "
                             f"{len(binary)} after the JSON")
        return split_bytes_elements(memoryview(binary), header.count)
    if len(binary):
        raise BadRequest(f"{len(binary)} bytes follow the JSON but no input has parameters.binary_data_size")
    data = header.data or []
    if len(data) != header.count or not all(isinstance(d, str) for d in data):
        raise BadRequest(f"input {OIP_CLIP_INPUT!r} has shape [{header.count}]; its \"data\" must be that many "
                         f"strings (or send it binary: parameters.binary_data_size)")
    return [d.encode() for d in data]


def encode_response(model: str, version: str, request_id: str, header: InferHeader, wanted: Sequence[str],
                    tensors: dict[str, tuple[str, list[int], bytes]]) -> tuple[bytes, Optional[int]]:
    """The response body and, when binary data follows the JSON, the JSON's length (the header's value)."""
    default = header.parameters.get("binary_data_output") is True
    per_output = dict(header.outputs)
    outputs, blobs = [], []
    for name in wanted:
        datatype, shape, raw = tensors[name]
        binary = per_output.get(name)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary if binary is not None else default:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(datatype, shape, raw)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id:
        doc["id"] = request_id
    text = json.dumps(doc).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)


def _json_data(datatype: str, shape: list[int], raw: bytes) -> list:
    count = shape[0] * shape[1]
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in split_bytes_elements(raw, count)]
    return list(struct.unpack(f"<{count}f", raw))
