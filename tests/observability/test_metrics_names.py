"""Metric names and series the server exposes before any traffic (Prometheus conventions: unit last)."""

from __future__ import annotations

import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.observability.metrics import BASE_UNITS, KNOWN_LABELS, Metrics


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


# units that are not Prometheus base units: a name says seconds and bytes, never these
_OTHER_UNITS = {"ms", "msec", "milliseconds", "us", "microseconds", "ns", "minutes", "hours", "secs", "kb", "mb", "gb",
                "kib", "mib", "gib", "percent", "pct"}


def test_every_family_has_help_and_its_unit_as_its_last_word():
    """All families, the process collector's included (the one-name check above is its example); docs/reference/
    metrics.md shows each family's help and reads its unit from the last word."""
    for fam in Metrics(torch.device("cpu")).registry.collect():
        words = fam.name.split("_")  # a counter's family name has no _total
        assert fam.documentation.strip(), f"{fam.name} has no help"
        assert [w for w in words if w in BASE_UNITS] in ([], [words[-1]]), f"{fam.name}: the unit goes last, once"
        assert not set(words) & _OTHER_UNITS, f"{fam.name}: use a base unit ({', '.join(BASE_UNITS)})"


def test_labelled_counters_start_at_zero_for_their_known_values():
    s = _samples(Metrics(torch.device("cpu")))
    for counter, values in KNOWN_LABELS.items():
        label = {"dropped": "reason", "live_refused": "reason"}.get(counter, "result")
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
