"""bench.tier_mix, the parts of bench.tiers: a repository of distinct valid tasks the registry serves, the request
mixes, and the arithmetic of its tier rates and latency classes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bench import tier_mix, tiers
from server.registry.registry import TaskRegistry
from stadapter import load_trunk

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "model_repository"


def test_the_repository_holds_distinct_bundles_the_registry_loads(tmp_path):
    nbytes = tier_mix.build_repository(tmp_path / "repo", EMBEDDED / "trunk", EMBEDDED / "tasks" / "motion" / "1", 3)
    files = sorted((tmp_path / "repo" / "tasks").glob("*/1/adapter.safetensors"))
    assert len(files) == 3 and len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 3
    reg = TaskRegistry(tmp_path / "repo", load_trunk(tmp_path / "repo" / "trunk"))
    reg.sync()
    assert sorted(reg.tasks) == ["task0", "task1", "task2"]
    for tv in reg.tasks.values():
        assert reg.host.load_now(tv).nbytes == tv.nbytes == nbytes  # validated as a first request reads it


def test_the_mixes():
    zipf = tier_mix.draw("zipf", 1000, 5000, 1.1, seed=0)
    uniform = tier_mix.draw("uniform", 1000, 5000, 1.1, seed=0)
    assert zipf == tier_mix.draw("zipf", 1000, 5000, 1.1, seed=0)  # seeded
    assert all(0 <= k < 1000 for k in zipf + uniform) and len(zipf) == len(uniform) == 5000
    top = max(zipf.count(k) for k in set(zipf))
    assert top > 5000 * 0.1 and max(uniform.count(k) for k in set(uniform)) < 30  # rank 1 of s=1.1: ~14% of draws
    assert len(set(zipf)) < len(set(uniform))
    with pytest.raises(ValueError, match="unknown mix 'pareto': zipf | uniform"):
        tier_mix.draw("pareto", 10, 10, 1.1, seed=0)


def test_tier_rates_and_latency_classes():
    before = {"loads": 1.0, "activations": 2.0, "hits": 3.0}
    after = {"loads": 3.0, "activations": 6.0, "hits": 9.0}  # 10 uses: 6 hits, 4 copies of which 2 read from disk
    assert tier_mix.tier_rates(before, after) == {"device": 0.6, "host": 0.2, "disk": 0.2}
    assert tier_mix.tier_rates(before, before) == {"device": 0.0, "host": 0.0, "disk": 0.0}
    timed = [tier_mix.Timed(k, s) for k, s in ((1, 0.5), (1, 0.1), (2, 0.4), (1, 0.1), (2, 0.2))]
    lat = tier_mix.latency_classes(timed, [t.task for t in timed], top=1)
    assert (lat["cold"]["n"], lat["repeat"]["n"], lat["hot"]["n"]) == (2, 3, 2)
    assert lat["cold"]["p50_ms"] == pytest.approx(450.0) and lat["hot"]["p50_ms"] == pytest.approx(100.0)
    assert tier_mix.percentiles([]) == {"n": 0, "p50_ms": None, "p99_ms": None}
    after_warm_up = tier_mix.latency_classes(timed, [t.task for t in timed], top=1, warmed=[1])
    assert (after_warm_up["cold"]["n"], after_warm_up["repeat"]["n"]) == (1, 4)  # task 1 was served before the run
    assert tier_mix.mean_ms({"s": 1.0, "n": 2.0}, {"s": 1.5, "n": 7.0}, "s", "n") == 100.0
    assert tier_mix.mean_ms({"s": 1.0, "n": 2.0}, {"s": 1.0, "n": 2.0}, "s", "n") is None


def test_rounds_give_each_ratio_their_median_and_a_table_row_per_run():
    def run(rps: float) -> dict:
        return {"requests_per_s": rps, "tiers": {"device": 1.0, "host": 0.0, "disk": 0.0}, "peak_rss_bytes": 2**30,
                "load_ms_mean": None, "latency": {"all": tier_mix.percentiles([0.1, 0.2])}}

    m = tiers.compared([{"tiered": run(r1), "resident": run(r2)} for r1, r2 in ((41.0, 50.0), (60.0, 50.0), (45.0, 50.0))])
    assert m["ratios"] == [0.82, 1.2, 0.9] and m["ratio_median"] == 0.9
    small = {"ready_s": 1.0, "cpu_ready_s": 1.0, "rss_ready_bytes": 2**30}
    text = tiers.table({"tasks": 3, "task_bytes": 1024, "all_tasks_bytes": 3072, "host_budget_bytes": 2**20,
                        "adapter_slots": 2, "trunk_bytes": 2**20, "ready": {"2": small, "3": small},
                        "mixes": {"zipf": m}})
    assert text.count("\nzipf     tiered") == 3 and text.count("\nzipf     resident") == 3
    assert text.endswith("zipf: tiered / resident req/s per round 0.82, 1.20, 0.90; median 0.90")
