"""What the sync and asyncio clients share: options, results, the error type, retries, message builders.

Only grpcio + protobuf + the generated ``stadapter_api`` stubs are imported here (no torch).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import grpc

from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.wire import ADMIN_TOKEN_ENV, BUNDLE_FILES, SAMPLING_OVERRIDE_FIELDS

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_ENV = ADMIN_TOKEN_ENV
MiB = 1 << 20
SAMPLING_FIELDS = SAMPLING_OVERRIDE_FIELDS

Clip = Union[str, os.PathLike, bytes, bytearray, memoryview]


class ClientError(Exception):
    """Any failed call: the gRPC status ``code`` (a ``grpc.StatusCode``) and the server's ``message``.

    Local problems (a clip file that cannot be read, a bundle folder without its files)
    use ``INVALID_ARGUMENT`` with ``local=True``: nothing was sent. ``task``: the task whose item
    failed, in the answer of a several-task request ("" otherwise).
    """

    def __init__(self, code: grpc.StatusCode, message: str, local: bool = False, task: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.local = local
        self.task = task

    @classmethod
    def from_item(cls, e: pb.ItemError, task: str = "") -> "ClientError":
        """The error of one item (a BatchClassify clip, one task of a several-task request)."""
        code = next((c for c in grpc.StatusCode if c.value[0] == e.code), grpc.StatusCode.UNKNOWN)
        return cls(code, e.message, task=task)

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "ClientError":
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for UNAVAILABLE only (server down, restarting or draining), with capped exponential
    backoff and full jitter. Other codes are answers, not outages, and are raised at once.

    Args:
        max_attempts: calls in all (1 = no retry).
        initial_backoff_s: the first wait's upper bound; doubled (``multiplier``) per attempt.
        max_backoff_s: cap on one wait.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError(f"RetryPolicy: backoffs must be >= 0 and multiplier >= 1, got {self}")

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """``attempt`` counts from 1 (the call that just failed)."""
        return code == grpc.StatusCode.UNAVAILABLE and attempt < self.max_attempts

    def backoff(self, attempt: int, rng: Optional[random.Random] = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (full jitter: uniform in [0, cap])."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return (rng or _RNG).uniform(0.0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)
_RNG = random.Random()


@dataclass(frozen=True)
class ClientOptions:
    """How to reach the server.

    Args:
        address: ``host:port``.
        token: bearer token sent as ``authorization`` metadata on every call (admin calls need it;
            classification only when the server requires one).
        tls_ca: PEM file of the root certificate(s) to trust; turns TLS on.
        tls: TLS with the system's roots (no ``tls_ca``).
        timeout_s: deadline of one call, retries included.
        retry: policy for UNAVAILABLE.
        stream_threshold_bytes: clips larger than this are streamed in chunks (ClassifyStream).
        chunk_bytes: chunk size for streamed clips and bundle uploads.
        max_message_bytes: the channel's send/receive limit.
    """

    address: str = DEFAULT_ADDRESS
    token: Optional[str] = None
    tls_ca: Optional[Path] = None
    tls: bool = False
    timeout_s: float = 60.0
    retry: RetryPolicy = RetryPolicy()
    stream_threshold_bytes: int = 1 * MiB
    chunk_bytes: int = 1 * MiB
    max_message_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if not self.address or ":" not in self.address:
            raise ValueError(f"address must be host:port, got {self.address!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.chunk_bytes < 1 or self.stream_threshold_bytes < 0:
            raise ValueError("chunk_bytes must be >= 1 and stream_threshold_bytes >= 0")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes)]

    def credentials(self) -> Optional[grpc.ChannelCredentials]:
        """None = plaintext."""
        if self.tls_ca is not None:
            try:
                roots = Path(self.tls_ca).read_bytes()
            except OSError as e:
                raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read the TLS CA file: {e}",
                                  local=True) from e
            return grpc.ssl_channel_credentials(root_certificates=roots)
        if self.tls:
            return grpc.ssl_channel_credentials()
        return None


# ----------------------------------------------------------------------------- results


def resolve_options(address: Optional[str], options: Optional[ClientOptions], kwargs: Mapping[str, Any]) -> ClientOptions:
    """The options of a client built as ``Client(address, **fields)`` or ``Client(options=...)`` (not both)."""
    if options is None:
        fields: dict[str, Any] = {"address": address} if address else {}
        return ClientOptions(**fields, **kwargs)
    if address or kwargs:
        raise TypeError("pass either options= or address/keyword options, not both")
    return options


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    index: int


@dataclass(frozen=True)
class ClassifyResult:
    task: str
    task_version: int
    predictions: tuple[Prediction, ...]
    timings: Mapping[str, float]  # decode_ms, queue_ms, compute_ms, total_ms, batch_size, cached (from the cache)
    request_id: str

    @property
    def top(self) -> Prediction:
        return self.predictions[0]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "task_version": self.task_version, "request_id": self.request_id,
                "predictions": [p.__dict__ for p in self.predictions], "timings": dict(self.timings)}

    @classmethod
    def from_pb(cls, r: pb.ClassifyResponse) -> "ClassifyResult":
        return cls(r.task, r.task_version, _predictions(r), _timings(r.timings), r.request_id)


def _predictions(r: pb.ClassifyResponse | pb.WindowResult) -> tuple[Prediction, ...]:
    return tuple(Prediction(p.label, float(p.score), int(p.index)) for p in r.predictions)


def _timings(t: pb.Timings) -> dict[str, float]:
    return {"decode_ms": t.decode_ms, "queue_ms": t.queue_ms, "compute_ms": t.compute_ms, "total_ms": t.total_ms,
            "batch_size": t.batch_size, "cached": t.cached}


@dataclass(frozen=True)
class WindowResult:
    """One window of a timeline (``windows``): frames ``[start_frame, end_frame)``, ``start_s`` to ``end_s``."""

    index: int
    start_s: float
    end_s: float
    start_frame: int
    end_frame: int
    task: str
    task_version: int
    predictions: tuple[Prediction, ...]
    timings: Mapping[str, float]
    request_id: str
    last_frame_received_unix_ns: int = 0  # live streams: when the server received the window's last frame

    @property
    def top(self) -> Prediction:
        return self.predictions[0]

    def to_dict(self) -> dict[str, Any]:
        out = {"index": self.index, "start_s": self.start_s, "end_s": self.end_s, "start_frame": self.start_frame,
               "end_frame": self.end_frame, "task": self.task, "task_version": self.task_version,
               "request_id": self.request_id, "predictions": [p.__dict__ for p in self.predictions],
               "timings": dict(self.timings)}
        if self.last_frame_received_unix_ns:  # a live stream's window
            out["last_frame_received_unix_ns"] = self.last_frame_received_unix_ns
        return out

    @classmethod
    def from_pb(cls, r: pb.WindowResult) -> "WindowResult":
        return cls(r.index, r.start_s, r.end_s, r.start_frame, r.end_frame, r.task, r.task_version, _predictions(r),
                   _timings(r.timings), r.request_id, r.last_frame_received_unix_ns)


TaskOutcome = Union[ClassifyResult, ClientError]
Tasks = Union[str, Sequence[str]]  # one task name, or several for one clip


def task_results(r: pb.ClassifyResponse) -> list[TaskOutcome]:
    """The answer of a several-task request: one result or error per task, in the request's order."""
    out: list[TaskOutcome] = []
    for t in r.results:
        if t.HasField("error"):
            out.append(ClientError.from_item(t.error, t.task))
        else:
            out.append(ClassifyResult.from_pb(pb.ClassifyResponse(task=t.task, task_version=t.task_version,
                                                                  predictions=t.predictions, timings=t.timings,
                                                                  request_id=r.request_id)))
    return out


def classify_outcome(task: Tasks, r: pb.ClassifyResponse) -> Union[ClassifyResult, list[TaskOutcome]]:
    """What ``classify`` returns: a result for one task name (a str), a list for a list of names."""
    return ClassifyResult.from_pb(r) if isinstance(task, str) else task_results(r)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    version: int
    labels: tuple[str, ...]
    description: str = ""
    num_frames: int = 0
    input_size: int = 0
    sampling_mode: str = ""
    temporal_views: int = 1
    spatial_views: int = 1
    adapter: Mapping[str, Any] = field(default_factory=dict)
    adapter_bytes: int = 0
    created: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    trunk_fingerprint: str = ""
    state: str = ""
    servable_versions: tuple[int, ...] = ()  # versions a request may pin as name@N
    residency: str = ""  # where its weights are: "device", "host" or "disk" (empty from a register)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["labels"], d["servable_versions"] = list(self.labels), list(self.servable_versions)
        d["adapter"], d["metrics"] = dict(self.adapter), dict(self.metrics)
        return d

    @classmethod
    def from_pb(cls, t: pb.TaskInfo) -> "TaskInfo":
        return cls(t.name, t.version, tuple(t.labels), t.description, t.num_frames, t.input_size, t.sampling_mode,
                   t.temporal_views, t.spatial_views, _json(t.adapter_config_json), t.adapter_bytes, t.created,
                   _json(t.metrics_json), t.trunk_fingerprint, t.state, tuple(t.servable_versions), t.residency)


@dataclass(frozen=True)
class TaskList:
    tasks: tuple[TaskInfo, ...]
    trunk_model: str
    trunk_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"trunk_model": self.trunk_model, "trunk_fingerprint": self.trunk_fingerprint,
                "tasks": [t.to_dict() for t in self.tasks]}


def _json(text: str) -> dict[str, Any]:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


# ----------------------------------------------------------------------------- requests


def read_clip(clip: Clip) -> bytes:
    """The encoded file's bytes (a path is read here; nothing is decoded on the client)."""
    if isinstance(clip, (bytes, bytearray, memoryview)):
        data = bytes(clip)
    else:
        try:
            data = Path(clip).read_bytes()
        except OSError as e:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read clip {clip}: {e.strerror or e}",
                              local=True) from e
    if not data:
        what = "the clip" if isinstance(clip, (bytes, bytearray, memoryview)) else f"clip {clip}"
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is empty", local=True)
    return data


def sampling_overrides(sampling: Optional[Mapping[str, Any]]) -> Optional[pb.SamplingOverrides]:
    if not sampling:
        return None
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unknown sampling override(s) {unknown}; allowed: {list(SAMPLING_FIELDS)}", local=True)
    return pb.SamplingOverrides(**{k: v for k, v in sampling.items() if v is not None})


def task_fields(task: Tasks) -> dict[str, Any]:
    """``task=`` for one name (the request and response of one task), ``tasks=`` for a list of names."""
    if isinstance(task, str):
        return {"task": task}
    names = list(task)
    if not names or not all(isinstance(t, str) for t in names):
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"task must be a name or a non-empty list of names, got {names!r}", local=True)
    return {"tasks": names}


def classify_request(task: Tasks, data: bytes, top_k: int, sampling: Optional[Mapping[str, Any]],
                     request_id: str = "") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(clip=data, top_k=top_k, sampling=sampling_overrides(sampling),
                              request_id=request_id, **task_fields(task))


def classify_chunks(task: Tasks, data: bytes, top_k: int, sampling: Optional[Mapping[str, Any]], chunk_bytes: int,
                    request_id: str = "") -> list[pb.ClassifyChunk]:
    """The stream of one clip: the first chunk carries task(s), top_k, sampling and request id."""
    fields = task_fields(task)
    view = memoryview(data)
    chunks = [pb.ClassifyChunk(data=bytes(view[i:i + chunk_bytes])) for i in range(0, len(data), chunk_bytes)]
    first = chunks[0]
    first.task, first.top_k, first.request_id = fields.get("task", ""), top_k, request_id
    first.tasks.extend(fields.get("tasks", []))
    ov = sampling_overrides(sampling)
    if ov is not None:
        first.sampling.CopyFrom(ov)
    return chunks


def check_windows(task: str, window_s: float, stride_s: float) -> None:
    """The client's own checks of a timeline request (the server checks again, against the clip)."""
    if not isinstance(task, str) or not task:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"windows takes one task name, got {task!r}", local=True)
    if not (window_s > 0 and stride_s > 0):
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"window_s and stride_s must be > 0 seconds, got {window_s!r} and {stride_s!r}", local=True)


def windows_request(task: str, data: bytes, window_s: float, stride_s: float, top_k: int,
                    sampling: Optional[Mapping[str, Any]], request_id: str = "") -> pb.ClassifyWindowsRequest:
    check_windows(task, window_s, stride_s)
    return pb.ClassifyWindowsRequest(task=task, clip=data, window_s=window_s, stride_s=stride_s, top_k=top_k,
                                     sampling=sampling_overrides(sampling), request_id=request_id)


def windows_chunks(task: str, data: bytes, window_s: float, stride_s: float, top_k: int,
                   sampling: Optional[Mapping[str, Any]], chunk_bytes: int,
                   request_id: str = "") -> list[pb.ClassifyWindowsChunk]:
    """The stream of one long clip: the first chunk carries the request's fields."""
    check_windows(task, window_s, stride_s)
    view = memoryview(data)
    chunks = [pb.ClassifyWindowsChunk(data=bytes(view[i:i + chunk_bytes])) for i in range(0, len(data), chunk_bytes)]
    first = chunks[0]
    first.task, first.window_s, first.stride_s, first.top_k, first.request_id = task, window_s, stride_s, top_k, request_id
    ov = sampling_overrides(sampling)
    if ov is not None:
        first.sampling.CopyFrom(ov)
    return chunks


def windows_call(classifier: Any, options: ClientOptions, clip: Clip, task: str, window_s: float, stride_s: float,
                 top_k: int, sampling: Optional[Mapping[str, Any]], request_id: str) -> tuple[Any, Any]:
    """The stub method and the request of a ``windows`` call (sync and async clients): the clip read and checked
    here; above ``stream_threshold_bytes`` the chunk stream, else one request."""
    data = read_clip(clip)
    if len(data) > options.stream_threshold_bytes:
        chunks = windows_chunks(task, data, window_s, stride_s, top_k, sampling, options.chunk_bytes, request_id)
        return classifier.ClassifyWindowsStream, iter(chunks)
    return classifier.ClassifyWindows, windows_request(task, data, window_s, stride_s, top_k, sampling, request_id)


def read_bundle_files(bundle_dir: Union[str, os.PathLike]) -> dict[str, bytes]:
    """task.json + adapter.safetensors of a bundle folder (read once, so a retry resends the same bytes)."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"bundle folder {root} does not exist", local=True)
    missing = [n for n in BUNDLE_FILES if not (root / n).is_file()]
    if missing:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"bundle folder {root} lacks {missing}; a bundle is {' + '.join(BUNDLE_FILES)}", local=True)
    return {n: (root / n).read_bytes() for n in BUNDLE_FILES}


def new_upload_id() -> str:
    """One id per register call, sent again by each of its retries: the server publishes it at most once."""
    return uuid.uuid4().hex


def register_chunks(files: Mapping[str, bytes], chunk_bytes: int,
                    upload_id: str = "") -> Iterator[pb.RegisterTaskChunk]:
    """The upload stream of one bundle; the first chunk carries ``upload_id``."""
    first = True
    for name, data in files.items():
        for i in range(0, max(len(data), 1), chunk_bytes):
            yield pb.RegisterTaskChunk(filename=name, data=data[i:i + chunk_bytes],
                                       upload_id=upload_id if first else "")
            first = False


HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
