"""Assemble and run the server: trunk (loaded once), registry, cache, batcher, gRPC, metrics, drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from server.config import ServerConfig
from server.dataplane.plane import DataPlane
from server.decode.live_streams import LiveDecoders
from server.decode.pool import Decoder, ProcessDecodePool, ThreadDecoder
from server.engine.batcher import Batcher
from server.engine.model import ModelRunner, dtype_name, resolve_device, resolve_dtype
from server.engine.pipeline import Pipeline
from server.engine.quantize import prepare_served_trunk
from server.engine.response_cache import ResponseCache
from server.engine.slots import AdapterSlots
from server.engine.stand_ins import WarmUp, shape_stand_ins
from server.frontends.auth import Auth
from server.frontends.grpc_service import TaskAdminService, VideoClassifierService
from server.frontends.http import HttpServer, HttpService
from server.frontends.oip_grpc import OIP_SERVICE_NAME, InferenceService
from server.frontends.oip_grpc import add_to_server as add_oip_to_server
from server.frontends.wire_clip import ClipOnceInterceptor
from server.malloc_tuning import use_mmap_for_large_buffers
from server.observability.access_log import AccessLogInterceptor
from server.observability.logs import configure_logging
from server.observability.metrics import Metrics
from server.registry.registry import TaskRegistry, TaskVersion
from server.registry.version import Seen
from stadapter.factory import load_trunk
from stadapter.fsutil import atomic_write_text
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("server")

DecoderHook = Callable[[Decoder], Decoder]  # given the configured decoding backend, returns the one to serve with

SERVICE_NAMES = (*(s.full_name for s in pb.DESCRIPTOR.services_by_name.values()), OIP_SERVICE_NAME)


@dataclass
class Server:
    """A running server (``await Server.start(cfg)``; ``await srv.drain()``)."""

    cfg: ServerConfig
    grpc_server: grpc.aio.Server
    health: HealthServicer
    pipeline: Pipeline
    batcher: Batcher
    registry: TaskRegistry
    slots: AdapterSlots
    metrics: Metrics
    grpc_port: int
    metrics_port: int
    http: Optional[HttpServer] = None  # None with --http-port -1
    live: Optional[LiveDecoders] = None  # the live streams' decoder processes
    _poller: Optional[asyncio.Task] = None
    _index_writer: Optional[asyncio.Task] = None

    @classmethod
    async def start(cls, cfg: ServerConfig, wrap_decoder: Optional[DecoderHook] = None) -> "Server":
        """Load, warm up, bind and serve. ``wrap_decoder`` is given the decoding backend ``cfg`` asks for and
        returns the one to use (benches measure without decode this way; tests inject faults)."""
        auth = Auth.from_config(cfg)
        if auth.admin_token is None and not cfg.allow_insecure_admin:
            log.warning("no admin token configured: RegisterTask/UnregisterTask are refused")
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        trunk = load_trunk(Path(cfg.model_repository) / "trunk", device=device, dtype=dtype)  # the one load
        t0 = time.monotonic()
        prepared = prepare_served_trunk(trunk, device, dtype, cfg.cpu_chunk_bytes, cfg.quantize)
        log.info("trunk %s (%s…): device %s, dtype %s (--device %s, --dtype %s)%s%s", trunk.spec.model if trunk.spec else "?",
                 trunk.fingerprint[:12], device, dtype_name(dtype), cfg.device, cfg.dtype,
                 f", {prepared.note}" if prepared.note else "",
                 f", weights packed for oneDNN in {time.monotonic() - t0:.2f} s" if prepared.packed else "")

        metrics = Metrics(device)
        slots = AdapterSlots(cfg.slot_budget_bytes, device, dtype, on_event=metrics.adapter_event, slots=cfg.adapter_slots)
        metrics.watch_slots(lambda: slots.used, lambda: slots.free, lambda: slots.bytes)

        cache = ResponseCache(cfg.response_cache_bytes, metrics.response_cache_event) if cfg.response_cache_bytes else None
        if cache is not None:
            metrics.watch_response_cache(lambda: cache.nbytes, lambda: len(cache))

        def on_change(published: list[TaskVersion], retired: list[TaskVersion]) -> None:
            for tv in retired:
                slots.retire(tv)  # leaves the device when its last request ends
                if cache is not None:
                    cache.drop_version(tv.uid)
            metrics.show_tasks(registry.tasks, published, retired, cfg.max_task_series)
            metrics.tasks_loaded.set(len(registry.tasks))

        limits = cfg.limits  # the one limits object (services, pipeline, batcher, decoder, registry)
        registry = TaskRegistry(cfg.model_repository, trunk, limits.bundle, cfg.keep_versions, on_change,
                                cfg.host_cache_bytes, cfg.pin_tasks, metrics.host_event,
                                host_dtype=dtype if cfg.host_dtype == "serving" else None)
        metrics.watch_host(lambda: registry.host.resident_count, lambda: registry.host.bytes)
        runner = ModelRunner(trunk, slots, max_rows=limits.max_batch_rows)  # warm-up covers each batch-size bucket
        batcher = Batcher(runner, limits, cfg.max_queue_delay_ms / 1e3, metrics)
        warming = WarmUp(batcher, trunk, slots.check_fits if cfg.adapter_slots else None) if cfg.warmup else None
        # The first scan (metadata only: weights are read on first use) runs in a thread, as the poll's does; the
        # decoder processes import and the warm-up runs what it has found meanwhile (at a first start over
        # thousands of task folders each takes seconds).
        decoder = new_decoder(cfg)
        decoding = asyncio.get_running_loop().create_task(start_decoder(decoder), name="decoder-start")
        seen: Seen = warming.add if warming is not None else (lambda tv: None)
        scan = asyncio.ensure_future(asyncio.to_thread(first_sync, registry, seen))
        try:
            t0 = time.monotonic()
            runs = await warming.run(scan) if warming is not None else 0
            await scan
            if runs:
                log.info("warm-up: %d forward(s) in %.2f s, as the scan found the tasks", runs, time.monotonic() - t0)
            metrics.tasks_loaded.set(len(registry.tasks))
            await load_pinned(registry, cfg.pin_tasks)
            if cfg.adapter_slots:  # --adapter-slots too many for the device: refused now (shapes from task.json)
                slots.check_fits(shape_stand_ins(list(registry.tasks.values()), trunk))
            if slots.budget < cfg.slot_budget_bytes and not cfg.adapter_slots:
                log.warning("the slot bank's byte budget (--cache-bytes) %d is more than the device's free memory allows: "
                            "%d instead", cfg.slot_budget_bytes, slots.budget)
            await decoding
        except BaseException:
            await asyncio.wait([scan])  # a thread: nothing of the start runs on after it is refused
            decoding.cancel()
            with contextlib.suppress(BaseException):  # its own failure, or its cancellation: the first error is raised
                await decoding
            decoder.close()
            raise
        if wrap_decoder is not None:
            decoder = wrap_decoder(decoder)
        pipeline = Pipeline(registry, batcher, metrics, limits, decoder, cfg.default_top_k, response_cache=cache)

        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        gs = grpc.aio.server(options=options, interceptors=[AccessLogInterceptor(), ClipOnceInterceptor()])
        live = LiveDecoders(cfg.max_live_streams, refused=lambda reason: metrics.live_refused.labels(reason).inc())
        metrics.live_streams_open.set_function(lambda: live.open)
        live.warm()
        plane = DataPlane(pipeline, registry, metrics, auth, live)  # what every frontend below serves
        pb_grpc.add_VideoClassifierServicer_to_server(VideoClassifierService(plane), gs)
        pb_grpc.add_TaskAdminServicer_to_server(TaskAdminService(plane), gs)
        add_oip_to_server(InferenceService(plane), gs)  # KServe v2, same port
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, gs)
        for name in ("", *SERVICE_NAMES):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME), gs)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert and cfg.tls_key:  # ServerConfig refuses one without the other
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            port = gs.add_secure_port(address, creds)
        else:
            port = gs.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind gRPC on {address}")
        batcher.start()
        await gs.start()
        http = None
        if cfg.http_port >= 0:  # same tokens, TLS, admission and metrics; on this event loop
            http = await HttpServer.start(HttpService(plane), cfg.host, cfg.http_port,
                                          cfg.tls_cert, cfg.tls_key)
        metrics_port = metrics.serve(cfg.host, cfg.metrics_port)
        srv = cls(cfg, gs, health, pipeline, batcher, registry, slots, metrics, port, metrics_port, http, live)
        # The scan index (thousands of entries at a first start) is written once serving, by a thread: the
        # replicas and the next start read it, this start's ready does not wait for it.
        srv._index_writer = asyncio.get_running_loop().create_task(asyncio.to_thread(registry.reader.index.save),
                                                                   name="scan-index-write")
        if cfg.poll_interval_s > 0:
            srv._poller = asyncio.get_running_loop().create_task(srv._poll(), name="repository-poll")
        return srv

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                await asyncio.to_thread(self.registry.sync)
            except Exception:  # noqa: BLE001 - a bad folder must not stop polling
                log.exception("repository poll failed")

    def ready_info(self) -> dict:
        """The ready line: the bound ports, the device and dtype that ``--device``/``--dtype`` resolved to, and
        what ``--quantize`` resolved to, ``int8`` or ``none`` (a start that cannot honour ``int8`` is refused)."""
        return {"event": "ready", "grpc_port": self.grpc_port, "metrics_port": self.metrics_port,
                "http_port": self.http.port if self.http is not None else None,
                "device": str(self.slots.device), "dtype": dtype_name(self.slots.dtype),
                "quantize": "int8" if self.registry.trunk.int8 else "none"}

    async def drain(self) -> None:
        """Health NOT_SERVING (gRPC; HTTP ready 503), refuse new work (UNAVAILABLE), let in-flight work finish, stop."""
        log.info("draining: %d requests in flight", self.pipeline.inflight)
        self.pipeline.draining = True
        await self.health.enter_graceful_shutdown()
        if self.live is not None:  # live streams have no end of their own: each stops reading, answers, ends
            self.live.drain()
        if not await self.pipeline.wait_idle(self.cfg.drain_timeout_s):
            log.warning("drain timeout: %d requests still in flight", self.pipeline.inflight)
        if self._poller is not None:
            self._poller.cancel()
        if self._index_writer is not None:  # a write in progress finishes (a thread; its file is renamed whole)
            await asyncio.wait([self._index_writer])
        await self.grpc_server.stop(grace=1.0)
        if self.http is not None:  # /v2/health/ready answered 503 until here
            await self.http.stop()
        await self.batcher.close()
        self.pipeline.close()
        if self.live is not None:
            self.live.close()
        self.metrics.shutdown()
        log.info("stopped")


async def load_pinned(registry: TaskRegistry, names: tuple[str, ...]) -> None:
    """Read the weights of the ``--pin-tasks`` at start (off the event loop); one that is not served or does not
    load is logged and the server starts without it."""
    for name in names:
        tv = registry.tasks.get(name)
        if tv is None:
            log.warning("--pin-tasks names %s, which is not served", name)
            continue
        try:
            await registry.ensure_loaded(tv)
        except Exception as e:  # noqa: BLE001 - the tier took it out of service and logged why
            log.warning("pinned task %s did not load: %s", name, e)


def first_sync(registry: TaskRegistry, seen: Seen) -> None:
    """The start's scan, with the cyclic garbage collector paused: it makes a few objects per task folder, all kept,
    which the collector would otherwise go over again and again (tens of thousands of folders on a large
    repository); nothing else in the process allocates much meanwhile. Its index is written later (``Server``).
    ``seen``: given each version as it is read (the warm-up's)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        registry.sync(save_index=False, seen=seen)
    finally:
        if was_enabled:
            gc.enable()


def new_decoder(cfg: ServerConfig) -> Decoder:
    """The decoding backend ``cfg`` names, not started yet (:func:`start_decoder`): sandboxed worker processes, or
    threads in this process."""
    if cfg.decode_backend == "process":
        return ProcessDecodePool(cfg.decode_workers, window_workers=cfg.window_decoders)
    return ThreadDecoder(cfg.decode_workers)


async def start_decoder(decoder: Decoder) -> None:
    """Start ``decoder``'s worker processes, if it has any, and wait until each has imported the decoder: eagerly,
    so the first request does not pay for the imports."""
    if isinstance(decoder, ProcessDecodePool):
        await decoder.start()


def write_ready_file(path: Path, info: dict) -> None:
    atomic_write_text(path, json.dumps(info) + "\n")  # a reader never sees half a line


async def serve(cfg: ServerConfig, wrap_decoder: Optional[DecoderHook] = None) -> int:
    configure_logging(cfg.log_level, cfg.log_format)
    use_mmap_for_large_buffers()
    srv = await Server.start(cfg, wrap_decoder)
    stop = asyncio.Event()  # SIGTERM / SIGINT drain from before the server says it is ready, whatever runs then
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    info = srv.ready_info()
    print(json.dumps(info), flush=True)
    if cfg.ready_file:
        write_ready_file(Path(cfg.ready_file), info)
    await stop.wait()
    await srv.drain()
    return 0
