"""A unary request's clip held once: cut out of the wire bytes, not copied into the message and out again.

With the upb protobuf runtime, parsing a ``ClassifyRequest`` copies its ``clip`` into the
message's arena, and reading ``request.clip`` copies it again (clearing the field frees
nothing: the arena lives as long as the message). With gRPC's own receive buffer that is
three clips for one counted against ``--max-inflight-clip-bytes`` (``python -m
bench.stalled_streams --phase unary`` measures the RSS this costs). For the unary clip
methods this module's deserializer walks the message's top-level fields (a few, whatever
the clip's size), parses everything but the clip with protobuf, and hands the handler a
:class:`SplitRequest`: the parsed message plus the clip as a view of the wire bytes.
BatchClassify's items get the same, one level down (:class:`SplitBatch`).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message

from server.errors import BadRequest
from stadapter_api.v1 import inference_pb2 as pb

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class SplitRequest:
    """A request message without its clip, and the clip (a view of the received bytes; ``b""`` if unset).
    Every other attribute is the message's. ``decode_error``: why the bytes were not a valid message (then
    the message is empty); :func:`clip_of` turns it into INVALID_ARGUMENT, where a deserializer that raises
    would get grpc's UNKNOWN "Unexpected DecodeError"."""

    __slots__ = ("message", "clip", "decode_error")

    def __init__(self, message: Message, clip: memoryview | bytes, decode_error: str = ""):
        self.message = message
        self.clip = clip
        self.decode_error = decode_error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise DecodeError("varint longer than 10 bytes")


def split_field(raw: bytes | memoryview, number: int) -> tuple[bytes, list[memoryview]]:
    """``raw``'s top-level fields without the length-delimited field ``number``, and that field's values in wire
    order as views of ``raw`` (for a bytes field protobuf keeps the last)."""
    view = memoryview(raw)
    rest: list[memoryview] = []
    values: list[memoryview] = []
    i, n = 0, len(view)
    while i < n:
        start = i
        key, i = _varint(view, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise DecodeError("field number 0")
        if wire == _VARINT:
            _, i = _varint(view, i)
        elif wire == _FIXED64:
            i += 8
        elif wire == _FIXED32:
            i += 4
        elif wire == _LENGTH:
            length, i = _varint(view, i)
            i += length
            if i <= n and field == number:
                values.append(view[i - length:i])
                continue
        else:
            raise DecodeError(f"wire type {wire} (groups are not used by this API)")
        if i > n:
            raise DecodeError("truncated message")
        rest.append(view[start:i])
    return b"".join(rest), values


def _split(message_type: type[Message], raw: bytes | memoryview) -> SplitRequest:
    rest, clips = split_field(raw, message_type.DESCRIPTOR.fields_by_name["clip"].number)
    return SplitRequest(message_type.FromString(rest), clips[-1] if clips else b"")


def _reason(e: DecodeError) -> str:
    return f"{e}"[:200] or "cannot parse"


def clip_deserializer(message_type: type[Message]) -> Callable[[bytes], SplitRequest]:
    def deserialize(raw: bytes) -> SplitRequest:
        try:
            return _split(message_type, raw)
        except DecodeError as e:
            return SplitRequest(message_type(), b"", _reason(e))

    return deserialize


class SplitBatch:
    """A BatchClassifyRequest as :class:`SplitRequest` items (each clip a view of the received bytes)."""

    __slots__ = ("requests", "decode_error")
    DESCRIPTOR = pb.BatchClassifyRequest.DESCRIPTOR  # what the access log reads the message type by

    def __init__(self, requests: list[SplitRequest], decode_error: str = ""):
        self.requests = requests
        self.decode_error = decode_error


def batch_deserializer(raw: bytes) -> SplitBatch:
    try:
        rest, items = split_field(raw, pb.BatchClassifyRequest.DESCRIPTOR.fields_by_name["requests"].number)
        pb.BatchClassifyRequest.FromString(rest)  # any other field must parse (there is none today)
        return SplitBatch([_split(pb.ClassifyRequest, item) for item in items])
    except DecodeError as e:
        return SplitBatch([], _reason(e))


def clip_of(request: Any) -> memoryview | bytes:
    """The clip of a unary request (a :class:`SplitRequest` over gRPC, a plain message otherwise);
    :class:`BadRequest` (INVALID_ARGUMENT) for bytes that were not a valid message."""
    _check(request)
    return request.clip


def items_of(request: Any) -> list[Any]:
    """The items of a BatchClassifyRequest (a :class:`SplitBatch` over gRPC, a plain message otherwise)."""
    _check(request)
    return list(request.requests)


def _check(request: Any) -> None:
    if isinstance(request, SplitRequest) and request.decode_error:
        name = type(request.message).DESCRIPTOR.full_name
    elif isinstance(request, SplitBatch) and request.decode_error:
        name = pb.BatchClassifyRequest.DESCRIPTOR.full_name
    else:
        return
    raise BadRequest(f"the request is not a valid {name} message: {request.decode_error}")


UNARY_CLIP_METHODS: dict[str, Callable[[bytes], Any]] = {
    "/stadapter.v1.VideoClassifier/Classify": clip_deserializer(pb.ClassifyRequest),
    "/stadapter.v1.VideoClassifier/ClassifyWindows": clip_deserializer(pb.ClassifyWindowsRequest),
    "/stadapter.v1.VideoClassifier/BatchClassify": batch_deserializer,
}


class ClipOnceInterceptor(grpc.aio.ServerInterceptor):
    """Gives the unary clip methods (and BatchClassify) the deserializers above (put after the access log,
    which counts the wire bytes these deserializers are handed)."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        deserializer = UNARY_CLIP_METHODS.get(handler_call_details.method)
        if handler is None or deserializer is None:
            return handler
        cached = self._handlers.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            factory = grpc.unary_unary_rpc_method_handler if not handler.response_streaming \
                else grpc.unary_stream_rpc_method_handler
            behaviour = handler.unary_unary if not handler.response_streaming else handler.unary_stream
            cached = (handler, factory(behaviour, request_deserializer=deserializer,
                                       response_serializer=handler.response_serializer))
            self._handlers[handler_call_details.method] = cached
        return cached[1]
