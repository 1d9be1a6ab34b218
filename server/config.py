"""The server's settings: one frozen record, built from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from server.live_limits import LiveLimits
from server.observability.logs import LOG_FORMATS, LOG_LEVELS
from stadapter.video import VideoLimits, WindowLimits

ALL_TASKS = "_all"  # the task label of every served task's requests and clips above --max-task-series

if TYPE_CHECKING:
    from server.limits import ServerLimits

MiB = 1 << 20
DEFAULT_CACHE_BYTES = 1 << 30
QUANTIZE = ("auto", "none", "int8")  # --quantize: int8 block linears where they pay (server.engine.quantize), never, always
INT8_MIN_WIDTH = 512  # --quantize auto: int8 from this trunk width up (where it pays: python -m bench.int8_width)
INT8_MAX_ERROR = 0.03  # --quantize auto: largest relative distance of the probe's features from the unquantised trunk's
HOST_DTYPES = ("stored", "serving")  # --host-dtype: as the bundles store them (today's), or the serving dtype
DEFAULT_HOST_CACHE_BYTES = 4 << 30  # the host tier's default (server.registry.host_tier): see --host-cache-bytes
_VIDEO = VideoLimits()  # the decoder's own defaults are the flags' defaults
_WINDOWS = WindowLimits()
_LIVE = LiveLimits()


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``python -m server`` can be told: one field per flag of :func:`build_parser`, same name.

    Each flag is described once, in its help below (``python -m server --help``; docs/reference/flags.md is
    generated from it by ``python -m server.reference flags``).
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
    quantize: str = "auto"
    cpu_chunk_bytes: int = 5 * MiB
    cache_bytes: Optional[int] = None  # None: not given, DEFAULT_CACHE_BYTES unless adapter_slots sizes the bank
    host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES
    pin_tasks: tuple[str, ...] = ()
    max_task_series: int = 100
    host_dtype: str = "stored"
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
    max_live_streams: int = _LIVE.max_streams
    max_live_s: float = _LIVE.max_s
    live_idle_s: float = _LIVE.idle_s
    max_live_chunk_bytes: int = _LIVE.max_chunk_bytes
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
                    "max_frame_pixels", "max_decoded_pixels", "max_num_frames", "max_windows",
                    "max_live_chunk_bytes")
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
        for name in ("max_queue_delay_ms", "poll_interval_s", "drain_timeout_s", "cache_bytes", "response_cache_bytes",
                     "host_cache_bytes", "max_task_series"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("decode_timeout_s", "max_clip_duration_s", "max_decode_seconds", "stream_idle_timeout_s",
                     "max_window_video_s", "max_live_s", "live_idle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.max_live_streams, int) or self.max_live_streams < 0:
            raise ValueError(f"ServerConfig.max_live_streams must be an int >= 0, got {self.max_live_streams!r}")
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
        if self.quantize not in QUANTIZE:
            raise ValueError(f"ServerConfig.quantize must be {'|'.join(QUANTIZE)}, got {self.quantize!r}")
        if self.host_dtype not in HOST_DTYPES:
            raise ValueError(f"ServerConfig.host_dtype must be {'|'.join(HOST_DTYPES)}, got {self.host_dtype!r}")
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
        # imported here: the parser (``--help``, ``python -m server.reference flags``) stays free of torch
        from server.limits import ServerLimits
        from stadapter.bundle import BundleLimits

        video = dataclasses.replace(_VIDEO, max_bytes=self.max_clip_bytes, max_duration_s=self.max_clip_duration_s,
                                    max_pixels=self.max_frame_pixels, max_decoded_pixels=self.max_decoded_pixels,
                                    max_decode_seconds=self.max_decode_seconds)
        return ServerLimits(video=video, max_inflight_clip_bytes=self.max_inflight_clip_bytes,
                            max_queue_size=self.max_queue_size, max_batch_rows=self.max_batch_size,
                            max_num_frames=self.max_num_frames, stream_idle_timeout_s=self.stream_idle_timeout_s,
                            decode_timeout_s=self.decode_timeout_s,
                            windows=dataclasses.replace(_WINDOWS, max_duration_s=self.max_window_video_s,
                                                        max_windows=self.max_windows),
                            live=LiveLimits(max_streams=self.max_live_streams, max_s=self.max_live_s,
                                            idle_s=self.live_idle_s, max_chunk_bytes=self.max_live_chunk_bytes),
                            bundle=BundleLimits(max_tensor_bytes=self.max_bundle_bytes))


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` names each flag's default, except where there is none (None: unset, or said in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _task_names(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b"), each a task name (argparse reports the error)."""
    from stadapter.config import ConfigError, check_task_name

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        try:
            check_task_name(n)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def build_parser() -> argparse.ArgumentParser:
    """The flags, each described once here (``--help``, docs/reference/flags.md), in groups of one concern each."""
    d = ServerConfig(model_repository=Path("."))
    # allow_abbrev=False: a shortened flag (--drain-timeout) would silently mean whichever flag it prefixes today
    p = argparse.ArgumentParser(prog="python -m server", allow_abbrev=False,
                                formatter_class=_DefaultsHelp,
                                description="Serve ST-Adapter video tasks: stadapter.v1 gRPC, the Open Inference "
                                            "Protocol (OIP, KServe v2: gRPC on --port, REST on --http-port), an HTTP "
                                            "multipart upload (--http-port) and Prometheus metrics (--metrics-port). "
                                            "Give flags in full: the parser takes no abbreviations.")

    a = p.add_argument_group("Repository and ports").add_argument
    a("--model-repository", required=True, type=Path, help="folder with trunk/ and tasks/<task>/<version>/")
    a("--host", default=d.host, help="address every port binds")
    a("--port", type=int, default=d.port, help="gRPC port: stadapter.v1 and OIP (0 = any free port)")
    a("--http-port", type=int, default=d.http_port,
      help="HTTP: OIP v2 REST, /v2/health/{live,ready}, multipart upload, the live WebSocket and its page /live "
           "(0 = any free port, -1 = no HTTP)")
    a("--metrics-port", type=int, default=d.metrics_port, help="Prometheus HTTP port, /metrics (0 = any free port)")
    a("--max-task-series", type=int, default=d.max_task_series,
      help="stadapter_task_bytes{task} and stadapter_task_version{task} (one series per served task) are exported "
           "while at most this many tasks are served, and none above it (they come back when the count falls again), "
           "and stadapter_requests_total and stadapter_clips_total count a served task's requests under its name "
           f"while at most this many are served, under task={ALL_TASKS!r} above it: a repository of thousands of tasks "
           "would make thousands of series; the totals without a task label (stadapter_tasks_loaded, "
           "stadapter_host_bytes, ...) are exported always. 0: never")
    a("--ready-file", type=Path,
      help="once serving, write the ready JSON line here: the bound ports grpc_port, http_port (null with "
           "--http-port -1) and metrics_port (for --port 0), and the resolved device and dtype")

    a = p.add_argument_group("Tasks").add_argument
    a("--poll-interval-s", type=float, default=d.poll_interval_s,
      help="how often the repository is re-read to pick up other replicas' changes (0 = never)")
    a("--keep-versions", type=int, default=d.keep_versions,
      help="versions of each task kept on disk (older ones are deleted after a register); they are also the "
           "versions a request may pin (name@N)")
    a("--default-top-k", type=int, default=d.default_top_k, help="labels per result when a request gives no top_k")
    a("--max-bundle-bytes", type=int, default=d.max_bundle_bytes, help="largest task bundle a register accepts")
    a("--host-cache-bytes", type=int, default=d.host_cache_bytes,
      help="host memory budget of task weights: the repository scan reads no weights, a task's are read from disk "
           "(and checked) on its first request and kept here, the least recently used leaving beyond the budget "
           "unless a request holds them or they are pinned. A fixed default rather than a share of RAM: a "
           "container's RAM as the process sees it is often the host's, not its limit (4 GiB: about 150 "
           "ViT-B/16 12x384 tasks)")
    a("--pin-tasks", type=_task_names, default=d.pin_tasks,
      help="comma-separated task names whose weights are read at start and never leave host memory (e.g. a,b)")
    a("--host-dtype", default=d.host_dtype, choices=HOST_DTYPES,
      help="dtype of the task weights kept in host memory: stored, as the bundles store them (float32 as training "
           "writes them); serving, the serving dtype (--dtype as resolved): a bfloat16 or float16 server then "
           "counts half the bytes of a float32 task against --host-cache-bytes, with the same logits (a device slot "
           "holds the serving dtype either way: the conversion moves from each activation to the load)")

    a = p.add_argument_group("Admission and batching",
                             "Past a bound on what requests hold, the next one is refused at once with "
                             "RESOURCE_EXHAUSTED.").add_argument
    a("--max-batch-size", type=int, default=d.max_batch_size,
      help="rows (clip views) per forward pass; a request needing more views is INVALID_ARGUMENT before decoding")
    a("--max-queue-delay-ms", type=float, default=d.max_queue_delay_ms,
      help="longest the first queued clip waits for more rows before its batch runs")
    a("--max-queue-size", type=int, default=d.max_queue_size,
      help="requests admitted and not yet computed (decoding or queued); one more is RESOURCE_EXHAUSTED")
    a("--max-message-bytes", type=int, default=d.max_message_bytes,
      help="gRPC receive/send limit (one clip in one message must fit)")
    a("--max-clip-bytes", type=int, default=d.max_clip_bytes, help="largest clip accepted, whole or streamed")
    a("--max-inflight-clip-bytes", type=int, default=d.max_inflight_clip_bytes,
      help="encoded clip bytes all requests together may hold (streams being received, clips awaiting decode); "
           "past it, RESOURCE_EXHAUSTED")
    a("--stream-idle-timeout-s", type=float, default=d.stream_idle_timeout_s,
      help="a client stream (ClassifyStream, RegisterTask) that sends nothing this long is ended with "
           "DEADLINE_EXCEEDED and what it held is freed")

    a = p.add_argument_group("Decoding",
                             "The bounds on one clip default to the decoder's own (stadapter.video.VideoLimits and "
                             "WindowLimits); past one, the request is INVALID_ARGUMENT naming the limit.").add_argument
    a("--decode-backend", default=d.decode_backend, choices=("process", "thread"),
      help="process: sandboxed worker processes (PyAV and numpy, never torch; frames come back through shared "
           "memory as uint8 crops that the model normalises on its device), so a clip that crashes or hangs FFmpeg "
           "costs only its request and the worker is replaced; thread: decoding in this process, no timeout "
           "(benches, debugging)")
    a("--decode-workers", type=int, default=d.decode_workers,
      help="decoder worker processes (threads with --decode-backend thread): at most this many decodes at once")
    a("--window-decoders", type=int, default=d.window_decoders,
      help="most decoder workers one ClassifyWindows video is split between, of those free when it starts (each "
           "decodes a run of its windows after one seek); 1 = one worker per video, so a long timeline never holds "
           "every worker while short clips wait (process backend; the thread backend decodes a video in one thread)")
    a("--decode-timeout-s", type=float, default=d.decode_timeout_s,
      help="longest decode of one clip (the request's deadline may cut it shorter); past it the worker is killed "
           "and the request fails with INVALID_ARGUMENT, or DEADLINE_EXCEEDED when the deadline ran out first "
           "(process backend)")
    a("--max-clip-duration-s", type=float, default=d.max_clip_duration_s, help="longest clip (from its header)")
    a("--max-frame-pixels", type=int, default=d.max_frame_pixels, help="width x height of one frame")
    a("--max-decoded-pixels", type=int, default=d.max_decoded_pixels,
      help="pixels of all frames the decoder outputs for one clip (bounds decode time)")
    a("--max-decode-seconds", type=float, default=d.max_decode_seconds,
      help="wall clock the decoder itself allows one clip (checked per packet; --decode-timeout-s kills the worker)")
    a("--max-num-frames", type=int, default=d.max_num_frames,
      help="frames per view a sampling override may ask for (views are bounded by --max-batch-size)")
    a("--max-window-video-s", type=float, default=d.max_window_video_s,
      help="ClassifyWindows: longest video (from its header; replaces --max-clip-duration-s there)")
    a("--max-windows", type=int, default=d.max_windows, help="ClassifyWindows: most windows one request may have")
    a("--max-live-streams", type=int, default=d.max_live_streams,
      help="ClassifyLive: live streams open at once, each decoded by a process of its own (not one of "
           "--decode-workers); one more is refused with RESOURCE_EXHAUSTED; 0 = no live streams")
    a("--max-live-s", type=float, default=d.max_live_s,
      help="ClassifyLive: longest stream, in its own timestamps (and in wall clock, plus --live-idle-s); past it the "
           "stream ends with INVALID_ARGUMENT (its windows so far stay answered)")
    a("--live-idle-s", type=float, default=d.live_idle_s,
      help="ClassifyLive: longest wait for a stream's next chunk; past it the stream ends with DEADLINE_EXCEEDED and "
           "its decoder process is stopped")
    a("--max-live-chunk-bytes", type=int, default=d.max_live_chunk_bytes,
      help="ClassifyLive: largest chunk of a stream (over HTTP: a WebSocket message; a larger one is INVALID_ARGUMENT); "
           "it bounds the bytes a stream "
           "holds received but not yet read by its decoder: the chunk being handed over and the pipe's buffer")

    a = p.add_argument_group("Model and device memory").add_argument
    a("--device", default=d.device, help="auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    a("--dtype", default=d.dtype, choices=("auto", "float32", "float16", "bfloat16"),
      help="auto: bfloat16 on GPUs with native bf16 (compute capability 8.0+), else float16; on a CPU bfloat16 "
           "with AMX-BF16 or AVX512-BF16 (trunk weights packed for oneDNN), else float32")
    a("--quantize", default=d.quantize, choices=QUANTIZE,
      help="int8: on a CPU, the trunk's block linears (attention's projections and the MLP: nearly all its "
           "multiply-adds) multiply in int8, weights quantised once per output channel and inputs per call, the rest "
           "in bfloat16; faster on a large trunk (ViT-B/16, not the small demo trunk) where the CPU has int8 dot "
           "products (AVX512-VNNI, AMX), and answers move more than "
           "bfloat16 alone moves them (docs/benchmarks.md measures both). Needs --dtype bfloat16 (or auto on a CPU "
           "with bf16 units); refused at start on CUDA or where this torch lacks oneDNN's int8 linear. auto: int8 "
           f"where it can run and pays, a trunk at least {INT8_MIN_WIDTH} wide, and only if a fixed probe clip's "
           f"features stay within {100 * INT8_MAX_ERROR:g}%% of the unquantised trunk's (measured at start, named in "
           "the startup log); none: never")
    a("--cpu-chunk-bytes", type=int, default=d.cpu_chunk_bytes,
      help="on a CPU, each trunk block runs over as many whole clips at a time as keep its input tokens within "
           "this many bytes (VideoTrunk.chunk_bytes; the same results; int8 block linears take one clip's view a "
           "call whatever it says; 5 MiB = 8 ViT-B/16 frames; a small trunk's "
           "batch fits at once); 0 = the whole batch at once. Ignored on CUDA, where the whole batch keeps the "
           "device busy")
    a("--cache-bytes", type=int, default=None,
      help="device byte budget of the adapter slot bank: as many task slots as it holds, the least recently used "
           "task going back to host memory beyond it (not given: 1 GiB; on CUDA at most a quarter of the device's free "
           "memory at start; not with --adapter-slots)")
    a("--adapter-slots", type=int, default=d.adapter_slots,
      help="the device slot bank (one per adapter activation) holds exactly N task slots whatever their bytes "
           "(a ViT-B/16 12x384 task: 27 MiB; stadapter_adapter_device_bytes shows the total); past N the least "
           "recently used task goes back to host memory, and a batch with more distinct tasks grows the bank for "
           "that batch only; 0 = as many as --cache-bytes holds. Giving both is refused: two limits on one bank. On "
           "CUDA refused at start unless the banks, and the largest once more while it grows, fit half the free "
           "device memory")
    a("--response-cache-bytes", type=int, default=d.response_cache_bytes,
      help="budget of the response cache: answers kept by clip sha256, task version and sampling (LRU), so the "
           "same request is answered without a decode or forward; 0 = no cache")
    a("--warmup", action=argparse.BooleanOptionalAction, default=d.warmup,
      help="run each served input shape once before accepting traffic: one-task and mixed batches, each row a clip "
           "of its own, and the shared-prefix path where tasks adapt only the last blocks")

    a = p.add_argument_group("Security").add_argument
    a("--admin-token-file", type=Path,
      help="file with the bearer token of RegisterTask / UnregisterTask (else env STADAPTER_ADMIN_TOKEN; with "
           "neither, admin calls are refused unless --allow-insecure-admin)")
    a("--allow-insecure-admin", action="store_true", help="accept admin calls with no token configured "
                                                          "(development only)")
    a("--classify-token-file", type=Path, help="require this bearer token for classification too")
    a("--tls-cert", type=Path, help="PEM certificate: gRPC over TLS (with --tls-key)")
    a("--tls-key", type=Path, help="PEM private key of --tls-cert")

    a = p.add_argument_group("Shutdown and logs").add_argument
    a("--drain-timeout-s", type=float, default=d.drain_timeout_s,
      help="on SIGTERM, how long requests in flight may finish before the exit")
    a("--log-level", default=d.log_level, choices=tuple(LOG_LEVELS),
      help="info writes one access line per request; warning leaves them out")
    a("--log-format", default=d.log_format, choices=LOG_FORMATS,
      help="text (for people) or json (one object per line, for log shippers)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> ServerConfig:
    p = build_parser()
    ns = p.parse_args(argv)
    try:
        return ServerConfig(**vars(ns))
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable
