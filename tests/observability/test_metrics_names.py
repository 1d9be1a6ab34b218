"""Metric names and series the server exposes before any traffic (Prometheus conventions: unit last)."""

from __future__ import annotations

import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.observability.metrics import KNOWN_LABELS, Metrics


def _samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_names_end_with_their_unit_and_cpu_memory_is_the_process_rss():
    s = _samples(Metrics(torch.device("cpu")))
    names = {n for n, _ in s}
    assert "stadapter_clip_in_flight_bytes" in names and "stadapter_clip_bytes_in_flight" not in names
    assert s[("process_resident_memory_bytes", ())] > 0
    assert not any(n == "stadapter_device_memory_bytes" for n in names)  # no device memory to report on a CPU


def test_labelled_counters_start_at_zero_for_their_known_values():
    s = _samples(Metrics(torch.device("cpu")))
    for counter, values in KNOWN_LABELS.items():
        label = {"dropped": "reason"}.get(counter, "result")
        for v in values:
            assert s[(f"stadapter_{counter}_total", ((label, v),))] == 0.0, (counter, v)


def test_the_pipeline_registers_no_series_of_its_own(two_task_repo, tiny_trunk):
    """docs/reference/metrics.md walks a bare ``Metrics``: every series the server wires up must be declared there."""
    from server.config import ServerConfig
    from server.engine.batcher import Batcher
    from server.engine.pipeline import Pipeline
    from server.registry.registry import TaskRegistry

    m = Metrics(torch.device("cpu"))
    declared = {f.name for f in m.registry.collect()}
    limits = ServerConfig(model_repository=two_task_repo).limits
    p = Pipeline(TaskRegistry(two_task_repo, tiny_trunk), Batcher(None, limits, 0.01, m), m, limits)
    try:
        assert {f.name for f in m.registry.collect()} == declared
        assert "stadapter_requests_in_flight" in declared
    finally:
        p.close()
