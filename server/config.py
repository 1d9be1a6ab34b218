"""The server's settings: one frozen record, built from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from server.limits import ServerLimits
from server.observability.logs import LOG_FORMATS, LOG_LEVELS
from stadapter.bundle import BundleLimits
from stadapter.video import VideoLimits, WindowLimits

MiB = 1 << 20
DEFAULT_CACHE_BYTES = 1 << 30
_VIDEO = VideoLimits()  # the decoder's own defaults are the flags' defaults
_WINDOWS = WindowLimits()


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``python -m server`` can be told.

    Args:
        model_repository: folder with ``trunk/`` and ``tasks/<task>/<version>/``.
        http_port: OIP v2 REST, health probes and the multipart upload (``server.frontends.http``); 0 = any free port,
            -1 = no HTTP.
        max_batch_size: rows (clip views) per forward pass.
        max_queue_delay_ms: longest time the first queued clip waits for company.
        max_queue_size: requests admitted but not yet computed (decoding + queued);
            one more is refused with RESOURCE_EXHAUSTED at once.
        decode_workers: decoder worker processes (``decode_backend=process``: a clip that crashes or
            hangs FFmpeg costs only its request; the worker is killed and replaced), or threads
            (``decode_backend=thread``).
        window_decoders: most decoder workers one ``ClassifyWindows`` video is split between (each decodes a
            run of its windows after one seek), of those free when it starts; 1 (default) = one worker per
            video, so a long timeline never holds every worker while short clips wait. Process backend only
            (the thread backend decodes a video in one thread).
        decode_timeout_s: longest decode of one clip (the request deadline may cut it shorter); past it
            the worker is killed and the request fails with INVALID_ARGUMENT (process backend only).
        decode_backend: ``process`` (sandboxed, default) or ``thread`` (in-process, no timeout; benches, debugging).
        device: ``auto`` = cuda when available, else cpu.
        dtype: ``auto`` = bfloat16 on a GPU with native bf16 (compute capability 8.0+), float16 on older ones; on cpu
            bfloat16 with AMX-BF16 or AVX512-BF16 (:func:`stadapter.devices.native_bf16`), else float32.
        cpu_chunk_bytes: on a CPU device, each trunk block runs over as many whole clips at a time as keep
            its input tokens within this many bytes (``VideoTrunk.chunk_bytes``; 5 MiB = 8 ViT-B/16 frames):
            the same results, ~10% faster on ViT-B/16 here; a small trunk's batch fits at once; 0 = the whole
            batch at once. Ignored on CUDA, where the whole batch keeps the device busy.
        cache_bytes: device budget for resident task adapters (LRU beyond it); sizes the device slot bank
            unless ``adapter_slots`` is set. Not given (None): 1 GiB.
        adapter_slots: the device slot bank holds exactly this many task slots (one bank per adapter
            activation), whatever their bytes: the slot count, not ``cache_bytes``, is then the one limit
            (a ViT-B/16 12x384 slot is 27 MiB; ``stadapter_adapter_device_bytes`` shows the total). Size it for
            the tasks that should stay resident; past it the least recently used one is evicted, and a
            batch with more distinct tasks grows the bank for that batch only. 0 (default) = as many slots
            as ``cache_bytes`` holds. Giving both is refused: two limits on one bank would leave the user
            guessing which one holds.
        poll_interval_s: how often the repository is re-read for other replicas' changes (0 = never).
        max_message_bytes: gRPC receive/send limit (one clip in one message must fit).
        max_clip_bytes: largest clip accepted (whole or streamed).
        max_inflight_clip_bytes: encoded clip bytes all requests together may hold (streams
            being received, clips waiting for decode); past it, RESOURCE_EXHAUSTED at once.
        max_clip_duration_s / max_frame_pixels / max_decoded_pixels / max_decode_seconds: the decoder's
            bounds on one clip (``stadapter.video.VideoLimits`` fields, same defaults).
        max_num_frames: frames per view a sampling override may ask for (INVALID_ARGUMENT above it).
        max_window_video_s / max_windows: ClassifyWindows' longest video and most windows per request (they
            replace max_clip_duration_s there; ``stadapter.video.WindowLimits`` fields, same defaults).
        response_cache_bytes: budget of the response cache (``server.engine.response_cache``: the same clip, task
            version and sampling answered without a decode or forward); 0 = no cache (default).
        stream_idle_timeout_s: a client stream (ClassifyStream, RegisterTask) that sends nothing for this
            long is ended with DEADLINE_EXCEEDED and what it held is freed.
        admin_token_file: file holding the admin bearer token (else env ``STADAPTER_ADMIN_TOKEN``).
        allow_insecure_admin: accept admin calls without any token configured (development only).
        classify_token_file: if set, classification needs this bearer token too.
        keep_versions: task versions kept on disk per task (older ones are deleted after a register).
        drain_timeout_s: on SIGTERM, longest wait for in-flight requests.
        warmup: run each served input shape once before accepting traffic.
        log_level: ``debug`` | ``info`` (access lines) | ``warning`` | ``error`` (``server.observability.logs``).
        log_format: ``text`` (for people) or ``json`` (one object per line, for log shippers).
    """

    model_repository: Path
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090
    http_port: int = 8000
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_queue_size: int = 256
    decode_workers: int = 2
    window_decoders: int = 1
    decode_timeout_s: float = 30.0
    decode_backend: str = "process"
    device: str = "auto"
    dtype: str = "auto"
    cpu_chunk_bytes: int = 5 * MiB
    cache_bytes: Optional[int] = None  # None: not given, DEFAULT_CACHE_BYTES unless adapter_slots sizes the bank
    adapter_slots: int = 0
    poll_interval_s: float = 2.0
    max_message_bytes: int = 64 * MiB
    max_clip_bytes: int = 256 * MiB
    max_inflight_clip_bytes: int = 1024 * MiB
    max_clip_duration_s: float = _VIDEO.max_duration_s
    max_frame_pixels: int = _VIDEO.max_pixels
    max_decoded_pixels: int = _VIDEO.max_decoded_pixels
    max_decode_seconds: float = _VIDEO.max_decode_seconds
    max_num_frames: int = 64
    max_window_video_s: float = _WINDOWS.max_duration_s
    max_windows: int = _WINDOWS.max_windows
    response_cache_bytes: int = 0
    stream_idle_timeout_s: float = 30.0
    max_bundle_bytes: int = 1 << 30
    admin_token_file: Optional[Path] = None
    allow_insecure_admin: bool = False
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    classify_token_file: Optional[Path] = None
    ready_file: Optional[Path] = None
    keep_versions: int = 2
    default_top_k: int = 5
    drain_timeout_s: float = 30.0
    warmup: bool = True
    log_level: str = "info"
    log_format: str = "text"

    @property
    def slot_budget_bytes(self) -> int:
        """``cache_bytes`` as ``__post_init__`` filled it in (never None after it)."""
        assert self.cache_bytes is not None
        return self.cache_bytes

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "max_queue_size", "decode_workers", "window_decoders",
                    "max_message_bytes", "max_clip_bytes",
                    "max_inflight_clip_bytes", "max_bundle_bytes", "keep_versions", "default_top_k",
                    "max_frame_pixels", "max_decoded_pixels", "max_num_frames", "max_windows")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ServerConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.adapter_slots, int) or self.adapter_slots < 0:
            raise ValueError(f"ServerConfig.adapter_slots must be an int >= 0 (0 = as many as cache_bytes holds), "
                             f"got {self.adapter_slots!r}")
        if self.adapter_slots and self.cache_bytes is not None:
            raise ValueError(f"--adapter-slots {self.adapter_slots} and --cache-bytes {self.cache_bytes} both size the "
                             f"device slot bank: give one (--adapter-slots: a fixed slot count; --cache-bytes: a byte "
                             f"budget)")
        if self.cache_bytes is None:  # frozen: the filled-in default is set once, here
            object.__setattr__(self, "cache_bytes", DEFAULT_CACHE_BYTES)
        for name in ("max_queue_delay_ms", "poll_interval_s", "drain_timeout_s", "cache_bytes", "response_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("decode_timeout_s", "max_clip_duration_s", "max_decode_seconds", "stream_idle_timeout_s",
                     "max_window_video_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.cpu_chunk_bytes, int) or self.cpu_chunk_bytes < 0:
            raise ValueError(f"ServerConfig.cpu_chunk_bytes must be an int >= 0 (0 = no chunks), got {self.cpu_chunk_bytes!r}")
        if self.decode_backend not in ("process", "thread"):
            raise ValueError(f"ServerConfig.decode_backend must be process|thread, got {self.decode_backend!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"ServerConfig.log_level must be {'|'.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"ServerConfig.log_format must be {'|'.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"ServerConfig.dtype must be auto|float32|float16|bfloat16, got {self.dtype!r}")
        if self.max_inflight_clip_bytes < self.max_clip_bytes:
            raise ValueError(f"ServerConfig.max_inflight_clip_bytes ({self.max_inflight_clip_bytes}) must be >= "
                             f"max_clip_bytes ({self.max_clip_bytes}), or the largest clip could never be accepted")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        for name in ("port", "metrics_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                raise ValueError(f"ServerConfig.{name} must be 0..65535, got {v!r}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"ServerConfig.http_port must be 0..65535 (or -1: no HTTP), got {self.http_port!r}")

    def replace(self, **changes) -> "ServerConfig":
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def limits(self) -> ServerLimits:
        """The one limits object the services, pipeline, batcher and decoder share."""
        video = dataclasses.replace(_VIDEO, max_bytes=self.max_clip_bytes, max_duration_s=self.max_clip_duration_s,
                                    max_pixels=self.max_frame_pixels, max_decoded_pixels=self.max_decoded_pixels,
                                    max_decode_seconds=self.max_decode_seconds)
        return ServerLimits(video=video, max_inflight_clip_bytes=self.max_inflight_clip_bytes,
                            max_queue_size=self.max_queue_size, max_batch_rows=self.max_batch_size,
                            max_num_frames=self.max_num_frames, stream_idle_timeout_s=self.stream_idle_timeout_s,
                            decode_timeout_s=self.decode_timeout_s,
                            windows=dataclasses.replace(_WINDOWS, max_duration_s=self.max_window_video_s,
                                                        max_windows=self.max_windows),
                            bundle=BundleLimits(max_tensor_bytes=self.max_bundle_bytes))


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` names each flag's default, except where there is none (None: unset, or said in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig(model_repository=Path("."))
    # allow_abbrev=False: a shortened flag (--drain-timeout) would silently mean whichever flag it prefixes today
    p = argparse.ArgumentParser(prog="python -m server", allow_abbrev=False,
                                formatter_class=_DefaultsHelp,
                                description="Serve ST-Adapter video tasks: stadapter.v1 gRPC, the Open Inference "
                                            "Protocol (gRPC on --port, REST on --http-port), an HTTP multipart "
                                            "upload (--http-port) and Prometheus metrics (--metrics-port).")
    a = p.add_argument
    a("--model-repository", required=True, type=Path, help="folder with trunk/ and tasks/")
    a("--host", default=d.host, help="address every port binds")
    a("--port", type=int, default=d.port, help="gRPC port (0 = any free port)")
    a("--metrics-port", type=int, default=d.metrics_port, help="Prometheus HTTP port (0 = any free port)")
    a("--http-port", type=int, default=d.http_port,
      help="HTTP: OIP v2 REST, /v2/health/{live,ready}, multipart upload (0 = any free port, -1 = off)")
    a("--max-batch-size", type=int, default=d.max_batch_size, help="rows (clip views) per forward")
    a("--max-queue-delay-ms", type=float, default=d.max_queue_delay_ms,
      help="longest wait for more rows before a batch runs")
    a("--max-queue-size", type=int, default=d.max_queue_size, help="admitted, not yet computed requests")
    a("--decode-workers", type=int, default=d.decode_workers,
      help="decoder worker processes (threads with --decode-backend thread)")
    a("--window-decoders", type=int, default=d.window_decoders,
      help="most decoder workers one ClassifyWindows video is split between, of those free (1 = no split; "
           "process backend)")
    a("--decode-timeout-s", type=float, default=d.decode_timeout_s,
      help="longest decode of one clip; past it the worker is killed (process backend)")
    a("--decode-backend", default=d.decode_backend, choices=("process", "thread"),
      help="process: sandboxed workers (default); thread: in-process, for benches and debugging")
    a("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    a("--dtype", default=d.dtype, choices=("auto", "float32", "float16", "bfloat16"),
      help="auto: bfloat16 on GPUs with native bf16 (compute capability 8.0+), else float16; on cpu bfloat16 with "
           "AMX-BF16 or AVX512-BF16, else float32")
    a("--cpu-chunk-bytes", type=int, default=d.cpu_chunk_bytes,
      help="on CPU, run each trunk block over whole clips whose tokens fit this many bytes (same results, faster "
           "on big trunks; 5 MiB = 8 ViT-B/16 frames; 0 = the whole batch at once)")
    a("--cache-bytes", type=int, default=None,
      help="device byte budget for task adapters: as many slots as it holds, LRU beyond (default 1 GiB; not with "
           "--adapter-slots)")
    a("--adapter-slots", type=int, default=d.adapter_slots,
      help="the device slot bank holds exactly N task slots whatever their bytes (a ViT-B/16 12x384 task: 27 MiB); "
           "LRU beyond N; 0 = as many as --cache-bytes holds; not with --cache-bytes")
    a("--poll-interval-s", type=float, default=d.poll_interval_s, help="re-read the repository (0 = off)")
    a("--max-message-bytes", type=int, default=d.max_message_bytes,
      help="gRPC receive/send limit (one clip in one message must fit)")
    a("--max-clip-bytes", type=int, default=d.max_clip_bytes, help="largest clip accepted, whole or streamed")
    a("--max-inflight-clip-bytes", type=int, default=d.max_inflight_clip_bytes,
      help="encoded clip bytes held by all requests together (streams, clips awaiting decode)")
    a("--max-clip-duration-s", type=float, default=d.max_clip_duration_s, help="longest clip (from its header)")
    a("--max-frame-pixels", type=int, default=d.max_frame_pixels, help="width x height of one frame")
    a("--max-decoded-pixels", type=int, default=d.max_decoded_pixels,
      help="pixels of all frames the decoder outputs for one clip (bounds decode time)")
    a("--max-decode-seconds", type=float, default=d.max_decode_seconds,
      help="wall clock the decoder itself allows one clip (checked per packet; --decode-timeout-s kills the worker)")
    a("--max-num-frames", type=int, default=d.max_num_frames, help="frames per view a sampling override may ask for")
    a("--max-window-video-s", type=float, default=d.max_window_video_s,
      help="ClassifyWindows: longest video (from its header; replaces --max-clip-duration-s there)")
    a("--max-windows", type=int, default=d.max_windows, help="ClassifyWindows: most windows one request may have")
    a("--response-cache-bytes", type=int, default=d.response_cache_bytes,
      help="answers kept by clip sha256, task version and sampling (LRU within this budget); 0 = off")
    a("--stream-idle-timeout-s", type=float, default=d.stream_idle_timeout_s,
      help="a client stream silent this long is ended (DEADLINE_EXCEEDED) and its bytes freed")
    a("--max-bundle-bytes", type=int, default=d.max_bundle_bytes, help="largest task bundle a register accepts")
    a("--admin-token-file", type=Path, help="file with the admin token (else env STADAPTER_ADMIN_TOKEN)")
    a("--allow-insecure-admin", action="store_true", help="admin calls without a token (development only)")
    a("--tls-cert", type=Path, help="PEM certificate: gRPC over TLS (with --tls-key)")
    a("--tls-key", type=Path, help="PEM private key of --tls-cert")
    a("--classify-token-file", type=Path, help="require this bearer token for classification too")
    a("--ready-file", type=Path, help="write the ready JSON here once serving")
    a("--keep-versions", type=int, default=d.keep_versions,
      help="versions of each task kept on disk and servable by a name@N pin")
    a("--default-top-k", type=int, default=d.default_top_k, help="labels per result when a request gives no top_k")
    a("--drain-timeout-s", type=float, default=d.drain_timeout_s,
      help="on SIGTERM, how long requests in flight may finish before the exit")
    a("--warmup", action=argparse.BooleanOptionalAction, default=d.warmup,
      help="run each served input shape once before accepting traffic (default on)")
    a("--log-level", default=d.log_level, choices=tuple(LOG_LEVELS),
      help="info logs one access line per request; warning leaves them out")
    a("--log-format", default=d.log_format, choices=LOG_FORMATS, help="json: one JSON object per line")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> ServerConfig:
    p = build_parser()
    ns = p.parse_args(argv)
    try:
        return ServerConfig(**vars(ns))
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable
