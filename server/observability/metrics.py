"""Prometheus metrics of one server, in its own registry (never the process-global one)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily

from server.config import ALL_TASKS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The units a series name may carry (Prometheus base units), always as its last word (before a counter's _total)
BASE_UNITS = ("seconds", "bytes", "ratio")


class _DeviceMemoryCollector:
    """``stadapter_device_memory_bytes{device,kind}``: CUDA allocated/reserved (nothing on a CPU device: the
    process's own memory is ``process_resident_memory_bytes``, from prometheus_client's process collector)."""

    def __init__(self, device: torch.device):
        self.device = device

    def collect(self):
        g = GaugeMetricFamily("stadapter_device_memory_bytes", "Memory held on the CUDA serving device, by kind "
                              "(allocated | reserved); no series on a CPU device (see process_resident_memory_bytes)",
                              labels=["device", "kind"])
        if self.device.type == "cuda":
            g.add_metric([str(self.device), "allocated"], float(torch.cuda.memory_allocated(self.device)))
            g.add_metric([str(self.device), "reserved"], float(torch.cuda.memory_reserved(self.device)))
        yield g


# Label values each labelled counter knows from the start: their series exist, at 0, before the first event.
KNOWN_LABELS = {
    "dropped": ("deadline", "cancelled"),
    "task_loads": ("ok", "failed"),
    "registrations": ("ok",),
    "unregistrations": ("ok", "not_found"),
    "live_refused": ("full", "draining", "disabled"),
}


class Metrics:
    def __init__(self, device: torch.device):
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "stadapter"
        self.requests = Counter(f"{p}_requests", "RPCs answered, by method, task and gRPC status code (task "
                                f"{ALL_TASKS!r} while more than --max-task-series tasks are served)",
                                ["method", "task", "code"], registry=r)
        self.decode_seconds = Histogram(f"{p}_decode_seconds", "Time to decode one clip", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram(f"{p}_queue_wait_seconds", "Time a decoded clip waited for its forward, "
                                            "from entering the batch queue to the forward's start (staging included)",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(f"{p}_compute_seconds", "Time of one batched forward (the forward alone)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram(f"{p}_stage_seconds", "Time to stage one batch (slots leased, input on the "
                                       "device), which may overlap the previous forward", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.request_seconds = Histogram(f"{p}_request_seconds", "End-to-end time of a classification",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{p}_batch_size", "Clips per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.batch_rows = Histogram(f"{p}_batch_rows", "Rows (clip views) per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tasks = Histogram(f"{p}_batch_tasks", "Distinct tasks per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.shared_prefix_rows = Counter(f"{p}_shared_prefix_rows",
                                          "Rows that reused another row's patch embedding and unadapted blocks "
                                          "(same clip, other task)", registry=r)
        self.clips = Counter(f"{p}_clips", f"Clips classified, by task ({ALL_TASKS!r} while more than --max-task-series "
                             "tasks are served)", ["task"], registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Requests admitted and not yet computed", registry=r)
        self.requests_in_flight = Gauge(f"{p}_requests_in_flight", "RPCs in progress (drain waits for 0)", registry=r)
        self.clip_in_flight_bytes = Gauge(f"{p}_clip_in_flight_bytes",
                                          "Encoded clip bytes held by requests in progress", registry=r)
        self.tasks_loaded = Gauge(f"{p}_tasks_loaded", "Tasks being served (known from the repository; their "
                                  "weights may still be on disk, see stadapter_tasks_host_resident)", registry=r)
        self.tasks_host_resident = Gauge(f"{p}_tasks_host_resident", "Task versions whose weights are in host memory "
                                         "(the host tier, --host-cache-bytes)", registry=r)
        self.host_bytes = Gauge(f"{p}_host_bytes", "Adapter + head tensor bytes of the task versions in host memory",
                                registry=r)
        self.task_loads = Counter(f"{p}_task_loads", "Task version weights read from disk on first use, by result "
                                  "(ok | failed: the bundle did not load and the version was taken out of service)",
                                  ["result"], registry=r)
        self.task_load_seconds = Histogram(f"{p}_task_load_seconds", "Time to read and check one task version's "
                                           "weights from disk", buckets=LATENCY_BUCKETS, registry=r)
        self.host_evictions = Counter(f"{p}_host_evictions", "Task versions whose weights left host memory for the "
                                      "--host-cache-bytes budget (read from disk again on their next use)", registry=r)
        self.task_bytes = Gauge(f"{p}_task_bytes", "Adapter + head tensor bytes of the served version (while at most "
                                "--max-task-series tasks are served)", ["task"], registry=r)
        self.task_version = Gauge(f"{p}_task_version", "Served version of each task (while at most --max-task-series "
                                  "tasks are served)", ["task"], registry=r)
        self._task_series = True  # whether at most --max-task-series tasks are served (see show_tasks)
        self.adapter_hits = Counter(f"{p}_adapter_hits", "Batch tasks already in a device slot", registry=r)
        self.adapter_activations = Counter(f"{p}_adapter_activations",
                                           "Task versions copied from host memory into a device slot", registry=r)
        self.adapter_evictions = Counter(f"{p}_adapter_evictions",
                                         "Task versions evicted from their device slot (LRU; the host copy stays)", registry=r)
        self.adapter_activation_seconds = Histogram(f"{p}_adapter_activation_seconds",
                                                    "Time to copy one task version into a device slot",
                                                    buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_slots = Gauge(f"{p}_adapter_slots", "Device adapter slots by state (used | free)", ["state"], registry=r)
        self.adapter_device_bytes = Gauge(f"{p}_adapter_device_bytes",
                                          "Device bytes of the adapter slot banks (used and free slots)", registry=r)
        self.registrations = Counter(f"{p}_registrations", "RegisterTask calls by result", ["result"], registry=r)
        self.unregistrations = Counter(f"{p}_unregistrations", "UnregisterTask calls by result", ["result"], registry=r)
        self.response_cache_hits = Counter(f"{p}_response_cache_hits",
                                           "Classifications answered from the response cache", registry=r)
        self.response_cache_misses = Counter(f"{p}_response_cache_misses",
                                             "Response cache lookups that found no answer (the clip was computed)",
                                             registry=r)
        self.response_cache_bytes = Gauge(f"{p}_response_cache_bytes", "Bytes held by the response cache", registry=r)
        self.response_cache_entries = Gauge(f"{p}_response_cache_entries", "Answers held by the response cache",
                                            registry=r)
        self.dropped = Counter(f"{p}_dropped", "Clips dropped before compute, by reason (deadline | cancelled)",
                               ["reason"], registry=r)
        self.live_streams_open = Gauge(f"{p}_live_streams_open", "ClassifyLive streams open (each with a decoder "
                                       "process of its own)", registry=r)
        self.live_windows = Counter(f"{p}_live_windows", "ClassifyLive windows answered (each for all its tasks)",
                                    registry=r)
        self.live_lag_seconds = Histogram(f"{p}_live_lag_seconds", "ClassifyLive: from the arrival of the chunk that "
                                          "completed a window's last frame to its answer sent", buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.live_refused = Counter(f"{p}_live_refused", "ClassifyLive streams refused before decoding, by reason "
                                    "(full: --max-live-streams open | draining | disabled: --max-live-streams 0)",
                                    ["reason"], registry=r)
        r.register(_DeviceMemoryCollector(device))
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        for name, values in KNOWN_LABELS.items():
            for value in values:
                getattr(self, name).labels(value)
        self._http: Optional[Any] = None  # prometheus_client's WSGI server, once serving

    def adapter_event(self, event: str, seconds: float) -> None:
        """The slots' ``on_event`` hook (``hit`` | ``activation`` | ``eviction`` | ``discard``)."""
        if event == "activation":
            self.adapter_activations.inc()
            self.adapter_activation_seconds.observe(seconds)
        else:
            {"hit": self.adapter_hits, "eviction": self.adapter_evictions}.get(event, _Null).inc()

    def host_event(self, event: str, seconds: float) -> None:
        """The host tier's ``on_event`` hook (``load`` | ``load_failed`` | ``eviction``)."""
        if event == "eviction":
            self.host_evictions.inc()
            return
        self.task_loads.labels("ok" if event == "load" else "failed").inc()
        self.task_load_seconds.observe(seconds)

    def watch_host(self, resident: Callable[[], float], nbytes: Callable[[], float]) -> None:
        self.tasks_host_resident.set_function(resident)
        self.host_bytes.set_function(nbytes)

    def response_cache_event(self, event: str) -> None:
        """The response cache's ``on_event`` hook (``hit`` | ``miss``)."""
        (self.response_cache_hits if event == "hit" else self.response_cache_misses).inc()

    def watch_response_cache(self, nbytes: Callable[[], float], entries: Callable[[], float]) -> None:
        self.response_cache_bytes.set_function(nbytes)
        self.response_cache_entries.set_function(entries)

    def task_label(self, served_name: str) -> str:
        """The ``task`` label a served task's requests and clips count under: its name while at most
        ``--max-task-series`` tasks are served, :data:`ALL_TASKS` above it (series already made keep their counts)."""
        return served_name if self._task_series else ALL_TASKS

    def show_tasks(self, served: Mapping[str, Any], published: Iterable[Any], retired: Iterable[Any],
                   bound: int) -> None:
        """Keep ``stadapter_task_bytes{task}`` / ``stadapter_task_version{task}`` in step with a change of the served
        table (``published`` and ``retired`` versions: anything with ``name``, ``version``, ``nbytes``): one series per
        served task while there are at most ``bound`` (``--max-task-series``), none above it (every series goes at once),
        all of them again when the count falls back under it. :meth:`task_label` follows the same bound."""
        if len(served) > bound:
            if self._task_series:
                self.task_bytes.clear()
                self.task_version.clear()
                self._task_series = False
            return
        if not self._task_series:
            published, self._task_series = list(served.values()), True
        for tv in retired:
            if tv.name not in served:
                remove_label(self.task_bytes, tv.name)
                remove_label(self.task_version, tv.name)
        for tv in published:
            self.task_bytes.labels(tv.name).set(tv.nbytes)
            self.task_version.labels(tv.name).set(tv.version)

    def watch_slots(self, used: Callable[[], float], free: Callable[[], float], device_bytes: Callable[[], float]) -> None:
        self.adapter_slots.labels("used").set_function(used)
        self.adapter_slots.labels("free").set_function(free)
        self.adapter_device_bytes.set_function(device_bytes)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        http, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = http
        return int(http.server_address[1])

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Null:
    @staticmethod
    def inc(amount: float = 1) -> None:
        pass


def remove_label(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
