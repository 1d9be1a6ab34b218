from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingOverrides(_message.Message):
    __slots__ = ("num_frames", "mode", "stride", "temporal_views", "spatial_views", "autorotate", "seek")
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_VIEWS_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_VIEWS_FIELD_NUMBER: _ClassVar[int]
    AUTOROTATE_FIELD_NUMBER: _ClassVar[int]
    SEEK_FIELD_NUMBER: _ClassVar[int]
    num_frames: int
    mode: str
    stride: int
    temporal_views: int
    spatial_views: int
    autorotate: bool
    seek: str
    def __init__(self, num_frames: _Optional[int] = ..., mode: _Optional[str] = ..., stride: _Optional[int] = ..., temporal_views: _Optional[int] = ..., spatial_views: _Optional[int] = ..., autorotate: _Optional[bool] = ..., seek: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("task", "clip", "top_k", "sampling", "request_id", "tasks")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    task: str
    clip: bytes
    top_k: int
    sampling: SamplingOverrides
    request_id: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[str] = ..., clip: _Optional[bytes] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[SamplingOverrides, _Mapping]] = ..., request_id: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ...) -> None: ...

class ClassifyChunk(_message.Message):
    __slots__ = ("task", "top_k", "sampling", "request_id", "data", "tasks")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    task: str
    top_k: int
    sampling: SamplingOverrides
    request_id: str
    data: bytes
    tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[str] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[SamplingOverrides, _Mapping]] = ..., request_id: _Optional[str] = ..., data: _Optional[bytes] = ..., tasks: _Optional[_Iterable[str]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "score", "index")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    index: int
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "compute_ms", "total_ms", "batch_size", "cached")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_size: int
    cached: bool
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., cached: _Optional[bool] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("task", "task_version", "predictions", "timings", "request_id", "results")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    task: str
    task_version: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    timings: Timings
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[TaskResult]
    def __init__(self, task: _Optional[str] = ..., task_version: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[TaskResult, _Mapping]]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task", "task_version", "predictions", "timings", "error")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task: str
    task_version: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    timings: Timings
    error: ItemError
    def __init__(self, task: _Optional[str] = ..., task_version: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ClassifyWindowsRequest(_message.Message):
    __slots__ = ("task", "clip", "window_s", "stride_s", "top_k", "sampling", "request_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    STRIDE_S_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    clip: bytes
    window_s: float
    stride_s: float
    top_k: int
    sampling: SamplingOverrides
    request_id: str
    def __init__(self, task: _Optional[str] = ..., clip: _Optional[bytes] = ..., window_s: _Optional[float] = ..., stride_s: _Optional[float] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[SamplingOverrides, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ClassifyWindowsChunk(_message.Message):
    __slots__ = ("task", "window_s", "stride_s", "top_k", "sampling", "request_id", "data")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    STRIDE_S_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    task: str
    window_s: float
    stride_s: float
    top_k: int
    sampling: SamplingOverrides
    request_id: str
    data: bytes
    def __init__(self, task: _Optional[str] = ..., window_s: _Optional[float] = ..., stride_s: _Optional[float] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[SamplingOverrides, _Mapping]] = ..., request_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class LiveChunk(_message.Message):
    __slots__ = ("task", "tasks", "window_s", "stride_s", "top_k", "sampling", "request_id", "data")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    STRIDE_S_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    task: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    window_s: float
    stride_s: float
    top_k: int
    sampling: SamplingOverrides
    request_id: str
    data: bytes
    def __init__(self, task: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., window_s: _Optional[float] = ..., stride_s: _Optional[float] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[SamplingOverrides, _Mapping]] = ..., request_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WindowResult(_message.Message):
    __slots__ = ("index", "start_s", "end_s", "start_frame", "end_frame", "predictions", "task", "task_version", "request_id", "timings", "last_frame_received_unix_ns")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FRAME_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LAST_FRAME_RECEIVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    index: int
    start_s: float
    end_s: float
    start_frame: int
    end_frame: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    task: str
    task_version: int
    request_id: str
    timings: Timings
    last_frame_received_unix_ns: int
    def __init__(self, index: _Optional[int] = ..., start_s: _Optional[float] = ..., end_s: _Optional[float] = ..., start_frame: _Optional[int] = ..., end_frame: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., task: _Optional[str] = ..., task_version: _Optional[int] = ..., request_id: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., last_frame_received_unix_ns: _Optional[int] = ...) -> None: ...

class BatchClassifyRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ClassifyRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ClassifyRequest, _Mapping]]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class BatchClassifyResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: ClassifyResponse
    error: ItemError
    def __init__(self, response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class BatchClassifyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchClassifyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchClassifyResult, _Mapping]]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "trunk_model", "trunk_fingerprint")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TRUNK_MODEL_FIELD_NUMBER: _ClassVar[int]
    TRUNK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    trunk_model: str
    trunk_fingerprint: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ..., trunk_model: _Optional[str] = ..., trunk_fingerprint: _Optional[str] = ...) -> None: ...

class DescribeTaskRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: str
    def __init__(self, task: _Optional[str] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "version", "labels", "description", "num_frames", "input_size", "sampling_mode", "temporal_views", "spatial_views", "adapter_config_json", "adapter_bytes", "created", "metrics_json", "trunk_fingerprint", "state", "servable_versions", "residency")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_MODE_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_VIEWS_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_VIEWS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    TRUNK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    description: str
    num_frames: int
    input_size: int
    sampling_mode: str
    temporal_views: int
    spatial_views: int
    adapter_config_json: str
    adapter_bytes: int
    created: str
    metrics_json: str
    trunk_fingerprint: str
    state: str
    servable_versions: _containers.RepeatedScalarFieldContainer[int]
    residency: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., num_frames: _Optional[int] = ..., input_size: _Optional[int] = ..., sampling_mode: _Optional[str] = ..., temporal_views: _Optional[int] = ..., spatial_views: _Optional[int] = ..., adapter_config_json: _Optional[str] = ..., adapter_bytes: _Optional[int] = ..., created: _Optional[str] = ..., metrics_json: _Optional[str] = ..., trunk_fingerprint: _Optional[str] = ..., state: _Optional[str] = ..., servable_versions: _Optional[_Iterable[int]] = ..., residency: _Optional[str] = ...) -> None: ...

class RegisterTaskChunk(_message.Message):
    __slots__ = ("filename", "data", "upload_id")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    filename: str
    data: bytes
    upload_id: str
    def __init__(self, filename: _Optional[str] = ..., data: _Optional[bytes] = ..., upload_id: _Optional[str] = ...) -> None: ...

class RegisterTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: TaskInfo
    def __init__(self, task: _Optional[_Union[TaskInfo, _Mapping]] = ...) -> None: ...

class UnregisterTaskRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: str
    def __init__(self, task: _Optional[str] = ...) -> None: ...

class UnregisterTaskResponse(_message.Message):
    __slots__ = ("task", "version")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: int
    def __init__(self, task: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
