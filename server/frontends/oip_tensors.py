"""Tensors of the Open Inference Protocol (KServe v2) as this server reads and writes them.

A request's tensor arrives either in ``raw_input_contents`` (what tritonclient and
perf_analyzer send: for BYTES, each element is a 4-byte little-endian length and
its bytes, concatenated) or in the tensor's typed ``contents``. Answers go out raw,
as Triton's own server sends them. Pure functions over bytes and lists, no gRPC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from server.errors import BadRequest
from stadapter.config import brief

_LEN = struct.Struct("<I")


def split_bytes_elements(raw: bytes | memoryview, expected: int) -> list[bytes]:
    """The elements of a serialized BYTES tensor; refuses a truncated or over-long buffer."""
    view = memoryview(raw)
    out: list[bytes] = []
    pos = 0
    while pos < len(view):
        if len(out) == expected:
            raise BadRequest(f"the BYTES tensor holds more than the {expected} element(s) its shape says")
        if pos + 4 > len(view):
            raise BadRequest(f"the BYTES tensor is cut inside element {len(out)}'s 4-byte length")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise BadRequest(f"the BYTES tensor's element {len(out)} says {n} bytes but only {len(view) - pos} follow")
        out.append(bytes(view[pos:pos + n]))
        pos += n
    if len(out) != expected:
        raise BadRequest(f"the BYTES tensor holds {len(out)} element(s); its shape says {expected}")
    return out


def join_bytes_elements(items: Sequence[bytes]) -> bytes:
    """Serialize BYTES elements (4-byte little-endian length, then the bytes, each)."""
    return b"".join(_LEN.pack(len(b)) + b for b in items)


def fp32_bytes(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


@dataclass(frozen=True)
class ParamSpec:
    """A request parameter this server understands: its name and the InferParameter field that carries it."""

    name: str
    kind: str  # "int64_param" | "string_param" | "bool_param"


# Triton's own request parameters (tritonclient and perf_analyzer set them); accepted and ignored, as are
# all ``triton_*`` keys (e.g. perf_analyzer's ``triton_enable_empty_final_response``).
# ``binary_data_output`` is the HTTP binary-data extension's (read by server.frontends.http, not a model parameter).
RESERVED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                                 "binary_data_output"})
RESERVED_PREFIX = "triton_"


def read_parameters(params, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """``{name: value}`` from a gRPC request's ``parameters`` map, each in the field its spec names.

    An unknown key, or a value in another field (e.g. ``top_k`` as a string), is INVALID_ARGUMENT.
    """
    def kind(p) -> tuple[Optional[str], Any]:
        got = p.WhichOneof("parameter_choice")
        return got, getattr(p, got) if got else None

    return _read(params, specs, kind)


def read_json_parameters(params: Any, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """The same from the HTTP/REST form (a JSON object: ``{"top_k": 2, "mode": "uniform"}``)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"the request's parameters must be a JSON object, got {type(params).__name__}")

    def kind(v: Any) -> tuple[Optional[str], Any]:
        if isinstance(v, bool):
            return "bool_param", v
        if isinstance(v, int):
            return "int64_param", v
        if isinstance(v, str):
            return "string_param", v
        if isinstance(v, float):
            return "double_param", v
        return None, v

    return _read(params, specs, kind)


def _read(params, specs: Sequence[ParamSpec], kind: Callable[[Any], tuple[Optional[str], Any]]) -> dict[str, Any]:
    by_name = {s.name: s for s in specs}
    out: dict[str, object] = {}
    for key in sorted(params):
        if key in RESERVED_PARAMETERS or key.startswith(RESERVED_PREFIX):
            continue
        spec = by_name.get(key)
        if spec is None:
            raise BadRequest(f"unknown request parameter {brief(key)}; known: {sorted(by_name)}")
        got, value = kind(params[key])
        if got != spec.kind:
            raise BadRequest(f"request parameter {key!r} must be a {spec.kind.removesuffix('_param')}, "
                             f"got {got.removesuffix('_param') if got else 'nothing'}")
        out[key] = value
    return out


def element_count(shape: Sequence[int]) -> Optional[int]:
    """Elements of a 1-D shape ``[N]``; None for any other shape."""
    if len(shape) != 1 or shape[0] < 0:
        return None
    return int(shape[0])
