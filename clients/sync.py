"""Blocking client of the ``stadapter.v1`` gRPC API."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import grpc

from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

from .core import (
    HEALTH_STATUS,
    ClassifyResult,
    ClientError,
    ClientOptions,
    Clip,
    TaskInfo,
    TaskList,
    Tasks,
    WindowResult,
    classify_chunks,
    classify_outcome,
    classify_request,
    new_upload_id,
    read_bundle_files,
    read_clip,
    register_chunks,
    resolve_options,
    windows_call,
)
from .live import LiveMessages, LiveSource, live_messages

T = TypeVar("T")


class Client:
    """``with Client("127.0.0.1:50051") as c: c.classify("clip.mp4", task="motion")``.

    Keyword arguments are :class:`ClientOptions` fields (token, tls_ca, timeout_s, retry, ...),
    or pass ``options=ClientOptions(...)``. Every failure raises :class:`ClientError`.
    """

    def __init__(self, address: Optional[str] = None, *, options: Optional[ClientOptions] = None, **kwargs: Any):
        options = resolve_options(address, options, kwargs)
        self.options = options
        creds = options.credentials()
        if creds is None:
            self._channel = grpc.insecure_channel(options.address, options=options.channel_options())
        else:
            self._channel = grpc.secure_channel(options.address, creds, options=options.channel_options())
        self._classifier = pb_grpc.VideoClassifierStub(self._channel)
        self._admin = pb_grpc.TaskAdminStub(self._channel)

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., T], make_request: Callable[[], Any], timeout: Optional[float]) -> T:
        """Call with the deadline spread over all attempts; retry UNAVAILABLE with backoff."""
        policy = self.options.retry
        deadline = time.monotonic() + (timeout or self.options.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call could be made")
            try:
                return fn(make_request(), timeout=left, metadata=self.options.metadata())
            except grpc.RpcError as e:
                err = ClientError.from_rpc(e)
                wait = policy.backoff(attempt)
                if not policy.should_retry(err.code, attempt) or time.monotonic() + wait >= deadline:
                    raise err from None
                time.sleep(wait)

    # -- classification ------------------------------------------------------------------------

    def classify(self, clip: Clip, task: Tasks, top_k: int = 0, sampling: Optional[Mapping[str, Any]] = None,
                 timeout: Optional[float] = None,
                 request_id: str = "") -> Union[ClassifyResult, list[Union[ClassifyResult, ClientError]]]:
        """Classify one clip (a path or the encoded bytes). Clips above ``stream_threshold_bytes`` are
        streamed in chunks. ``top_k``: labels per result (0: the server's ``--default-top-k``).
        ``sampling``: overrides such as ``{"num_frames": 8, "temporal_views": 3}``.

        ``task``: a name (returns a :class:`ClassifyResult`) or a list of names: the clip is sent and
        decoded once, and the answer is a list with one :class:`ClassifyResult` or :class:`ClientError`
        per task, in order (an unknown task fails its item only)."""
        data = read_clip(clip)
        o = self.options
        if len(data) > o.stream_threshold_bytes:
            chunks = classify_chunks(task, data, top_k, sampling, o.chunk_bytes, request_id)
            resp = self._call(self._classifier.ClassifyStream, lambda: iter(chunks), timeout)
        else:
            req = classify_request(task, data, top_k, sampling, request_id)
            resp = self._call(self._classifier.Classify, lambda: req, timeout)
        return classify_outcome(task, resp)

    def windows(self, clip: Clip, task: str, window_s: float, stride_s: float, top_k: int = 0,
                sampling: Optional[Mapping[str, Any]] = None, timeout: Optional[float] = None,
                request_id: str = "") -> Iterator[WindowResult]:
        """A long clip as a timeline: an iterator of :class:`WindowResult`, one per window (``window_s`` long, one
        every ``stride_s``), in time order, as the server computes them. The clip is read and checked here, at
        the call; it is sent on the first ``next``. Clips above ``stream_threshold_bytes`` are streamed in
        chunks. Leaving the loop early cancels the call (the server stops decoding). Not retried: a timeline
        may have been half given. ``timeout`` bounds the whole stream."""
        fn, request = windows_call(self._classifier, self.options, clip, task, window_s, stride_s, top_k, sampling,
                                   request_id)
        return self._stream(fn, request, timeout)

    def live(self, source: LiveSource, task: Tasks, window_s: float, stride_s: float, top_k: int = 0,
             sampling: Optional[Mapping[str, Any]] = None, realtime: bool = False, timeout: Optional[float] = None,
             request_id: str = "") -> Iterator[WindowResult]:
        """A live stream (ClassifyLive): an iterator of :class:`WindowResult`, one per window and task, each as
        soon as the server has decoded the window's last frame and computed it. ``source``: the stream's bytes, an
        iterable of chunks (as an encoder emits them), a binary file object (stdin), a file path (``realtime``:
        paced as it would play), MPEG-TS, Matroska/WebM, fragmented MP4 or FLV; or a URL (``rtsp://``, ``srt://``,
        HLS over ``https://``, ...; :class:`~clients.LiveURL` for any PyAV input) opened here with PyAV, its video
        remuxed (not decoded) into the stream as the source gives it (the server never opens URLs). Each result's
        ``last_frame_received_unix_ns`` says when the server received the window's last frame. Leaving the loop
        early cancels the call. ``timeout``: bounds the whole stream (default: none)."""
        messages = LiveMessages(live_messages(task, source, window_s, stride_s, top_k, sampling, request_id,
                                              realtime))
        return self._stream(self._classifier.ClassifyLive, messages, timeout, unbounded=True, source=messages)

    def _stream(self, fn: Callable[..., Any], request: Any, timeout: Optional[float], unbounded: bool = False,
                source: Optional[LiveMessages] = None) -> Iterator[WindowResult]:
        """The call's results; ``source``: a live stream's messages, whose failure is raised after what the server
        answered (in place of the server's error, which that failure caused)."""
        limit = timeout if timeout or unbounded else self.options.timeout_s
        call = fn(request, timeout=limit, metadata=self.options.metadata())
        try:
            for r in call:
                yield WindowResult.from_pb(r)
        except grpc.RpcError as e:
            if source is not None:
                source.raise_failure()
            raise ClientError.from_rpc(e) from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops the server's work if the caller left early
        if source is not None:
            source.raise_failure()

    def batch_classify(self, clips: Sequence[Clip], task: Union[str, Sequence[str]], top_k: int = 0,
                       sampling: Optional[Mapping[str, Any]] = None,
                       timeout: Optional[float] = None) -> list[Union[ClassifyResult, ClientError]]:
        """Several clips in one call (``task``: one name for all, or one per clip). Each item is a
        :class:`ClassifyResult` or the :class:`ClientError` of that clip alone."""
        req = batch_request(clips, task, top_k, sampling)
        resp = self._call(self._classifier.BatchClassify, lambda: req, timeout)
        return batch_results(resp)

    def list_tasks(self, timeout: Optional[float] = None) -> TaskList:
        r = self._call(self._classifier.ListTasks, lambda: pb.ListTasksRequest(), timeout)
        return TaskList(tuple(TaskInfo.from_pb(t) for t in r.tasks), r.trunk_model, r.trunk_fingerprint)

    def describe_task(self, task: str, timeout: Optional[float] = None) -> TaskInfo:
        return TaskInfo.from_pb(self._call(self._classifier.DescribeTask, lambda: pb.DescribeTaskRequest(task=task),
                                           timeout))

    # -- administration (bearer token) ---------------------------------------------------------

    def register(self, bundle_dir: Union[str, os.PathLike], timeout: Optional[float] = None,
                 upload_id: Optional[str] = None) -> TaskInfo:
        """Upload a bundle folder (task.json + adapter.safetensors); returns the task as published.

        Every retry sends the same ``upload_id`` (a fresh one per call unless given), so a register the
        server published just before the connection broke is returned by the retry, not published twice."""
        files = read_bundle_files(bundle_dir)
        uid = upload_id or new_upload_id()
        r = self._call(self._admin.RegisterTask, lambda: register_chunks(files, self.options.chunk_bytes, uid),
                       timeout)
        return TaskInfo.from_pb(r.task)

    def unregister(self, task: str, timeout: Optional[float] = None) -> tuple[str, int]:
        """Returns (task, removed version)."""
        r = self._call(self._admin.UnregisterTask, lambda: pb.UnregisterTaskRequest(task=task), timeout)
        return r.task, r.version

    # -- health --------------------------------------------------------------------------------

    def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        """``grpc.health.v1`` status: SERVING, NOT_SERVING (draining), SERVICE_UNKNOWN, UNKNOWN."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        r = self._call(stub.Check, lambda: health_pb2.HealthCheckRequest(service=service), timeout)
        return HEALTH_STATUS.get(r.status, str(r.status))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def batch_request(clips: Sequence[Clip], task: Union[str, Sequence[str]], top_k: int,
                  sampling: Optional[Mapping[str, Any]]) -> pb.BatchClassifyRequest:
    tasks = [task] * len(clips) if isinstance(task, str) else list(task)
    if len(tasks) != len(clips):
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{len(clips)} clips but {len(tasks)} task names; give one task or one per clip", local=True)
    return pb.BatchClassifyRequest(requests=[classify_request(t, read_clip(c), top_k, sampling)
                                             for c, t in zip(clips, tasks, strict=True)])


def batch_results(resp: pb.BatchClassifyResponse) -> list[Union[ClassifyResult, ClientError]]:
    out: list[Union[ClassifyResult, ClientError]] = []
    for item in resp.results:
        if item.WhichOneof("result") == "response":
            out.append(ClassifyResult.from_pb(item.response))
        else:
            out.append(ClientError.from_item(item.error))
    return out
