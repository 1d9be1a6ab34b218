"""asyncio client of the ``stadapter.v1`` gRPC API (same methods as :class:`clients.Client`, awaitable)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

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
from .sync import batch_request, batch_results

T = TypeVar("T")


class AsyncClient:
    """``async with AsyncClient("127.0.0.1:50051") as c: await c.classify(data, task="motion")``.

    Create it inside the running event loop (grpc.aio channels belong to one loop).
    """

    def __init__(self, address: Optional[str] = None, *, options: Optional[ClientOptions] = None, **kwargs: Any):
        options = resolve_options(address, options, kwargs)
        self.options = options
        creds = options.credentials()
        if creds is None:
            self._channel = grpc.aio.insecure_channel(options.address, options=options.channel_options())
        else:
            self._channel = grpc.aio.secure_channel(options.address, creds, options=options.channel_options())
        self._classifier = pb_grpc.VideoClassifierStub(self._channel)
        self._admin = pb_grpc.TaskAdminStub(self._channel)

    async def _call(self, fn: Callable[..., Any], make_request: Callable[[], Any], timeout: Optional[float]) -> Any:
        policy = self.options.retry
        deadline = time.monotonic() + (timeout or self.options.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call could be made")
            try:
                return await fn(make_request(), timeout=left, metadata=self.options.metadata())
            except grpc.RpcError as e:
                err = ClientError.from_rpc(e)
                wait = policy.backoff(attempt)
                if not policy.should_retry(err.code, attempt) or time.monotonic() + wait >= deadline:
                    raise err from None
                await asyncio.sleep(wait)

    async def classify(self, clip: Clip, task: Tasks, top_k: int = 0, sampling: Optional[Mapping[str, Any]] = None,
                       timeout: Optional[float] = None,
                       request_id: str = "") -> Union[ClassifyResult, list[Union[ClassifyResult, ClientError]]]:
        """See :meth:`clients.Client.classify`: a list of task names gives a list of results/errors."""
        data = read_clip(clip)
        o = self.options
        if len(data) > o.stream_threshold_bytes:
            chunks = classify_chunks(task, data, top_k, sampling, o.chunk_bytes, request_id)
            resp = await self._call(self._classifier.ClassifyStream, lambda: iter(chunks), timeout)
        else:
            req = classify_request(task, data, top_k, sampling, request_id)
            resp = await self._call(self._classifier.Classify, lambda: req, timeout)
        return classify_outcome(task, resp)

    def windows(self, clip: Clip, task: str, window_s: float, stride_s: float, top_k: int = 0,
                sampling: Optional[Mapping[str, Any]] = None, timeout: Optional[float] = None,
                request_id: str = "") -> AsyncIterator[WindowResult]:
        """See :meth:`clients.Client.windows`: ``async for w in client.windows(...)``; leaving early cancels."""
        fn, request = windows_call(self._classifier, self.options, clip, task, window_s, stride_s, top_k, sampling,
                                   request_id)
        return self._stream(fn, request, timeout)

    def live(self, source: LiveSource, task: Tasks, window_s: float, stride_s: float, top_k: int = 0,
             sampling: Optional[Mapping[str, Any]] = None, realtime: bool = False, timeout: Optional[float] = None,
             request_id: str = "") -> AsyncIterator[WindowResult]:
        """See :meth:`clients.Client.live`: ``async for w in client.live(...)``; the source is read in a thread (a
        pipe or realtime pacing never blocks the event loop); leaving early cancels."""
        messages = LiveMessages(live_messages(task, source, window_s, stride_s, top_k, sampling, request_id,
                                              realtime))
        return self._stream(self._classifier.ClassifyLive, _in_thread(messages), timeout, unbounded=True,
                            source=messages)

    async def _stream(self, fn: Callable[..., Any], request: Any, timeout: Optional[float], unbounded: bool = False,
                      source: Optional[LiveMessages] = None) -> AsyncIterator[WindowResult]:
        """See :meth:`clients.Client._stream`."""
        limit = timeout if timeout or unbounded else self.options.timeout_s
        call = fn(request, timeout=limit, metadata=self.options.metadata())
        try:
            async for r in call:
                yield WindowResult.from_pb(r)
        except grpc.RpcError as e:
            if source is not None:
                source.raise_failure()
            raise ClientError.from_rpc(e) from None
        finally:
            call.cancel()
        if source is not None:
            source.raise_failure()

    async def batch_classify(self, clips: Sequence[Clip], task: Union[str, Sequence[str]], top_k: int = 0,
                             sampling: Optional[Mapping[str, Any]] = None,
                             timeout: Optional[float] = None) -> list[Union[ClassifyResult, ClientError]]:
        req = batch_request(clips, task, top_k, sampling)
        return batch_results(await self._call(self._classifier.BatchClassify, lambda: req, timeout))

    async def list_tasks(self, timeout: Optional[float] = None) -> TaskList:
        r = await self._call(self._classifier.ListTasks, lambda: pb.ListTasksRequest(), timeout)
        return TaskList(tuple(TaskInfo.from_pb(t) for t in r.tasks), r.trunk_model, r.trunk_fingerprint)

    async def describe_task(self, task: str, timeout: Optional[float] = None) -> TaskInfo:
        r = await self._call(self._classifier.DescribeTask, lambda: pb.DescribeTaskRequest(task=task), timeout)
        return TaskInfo.from_pb(r)

    async def register(self, bundle_dir: Union[str, os.PathLike], timeout: Optional[float] = None,
                       upload_id: Optional[str] = None) -> TaskInfo:
        """See :meth:`clients.Client.register`: one upload id per call, the same on every retry."""
        files = read_bundle_files(bundle_dir)
        uid = upload_id or new_upload_id()
        r = await self._call(self._admin.RegisterTask, lambda: register_chunks(files, self.options.chunk_bytes, uid),
                             timeout)
        return TaskInfo.from_pb(r.task)

    async def unregister(self, task: str, timeout: Optional[float] = None) -> tuple[str, int]:
        r = await self._call(self._admin.UnregisterTask, lambda: pb.UnregisterTaskRequest(task=task), timeout)
        return r.task, r.version

    async def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        r = await self._call(stub.Check, lambda: health_pb2.HealthCheckRequest(service=service), timeout)
        return HEALTH_STATUS.get(r.status, str(r.status))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def _in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """A blocking iterator's items, each taken in a thread."""
    while True:
        item = await asyncio.to_thread(next, items, _END)
        if item is _END:
            return
        yield item


_END: Any = object()
