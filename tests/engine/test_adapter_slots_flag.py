"""--adapter-slots N: the device slot bank holds exactly N slots, whatever their bytes (the one limit)."""

from __future__ import annotations

import pytest
import torch
from factories import TINY_SAMPLING, make_task_adapters
from serverproc import ServerProcess, metric, scrape

from server.config import parse_args
from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots
from server.observability.metrics import Metrics
from server.registry.registry import TaskVersion
from stadapter import AdapterConfig, AdapterStack, TaskSpec
from stadapter.bank import SlotBank, TaskShape

CPU = torch.device("cpu")
CFG = AdapterConfig(width=8, pre_attn=True, pre_mlp=True)


def _versions(trunk, tmp_path, n: int) -> list[TaskVersion]:
    out = []
    for i in range(n):
        stack = make_task_adapters(trunk, 3, CFG, seed=40 + i).stack()
        host = AdapterStack({k: s.map(lambda t: t.detach().clone()) for k, s in stack.slots.items()},
                            stack.head_w.detach().clone(), stack.head_b.detach().clone(), stack.num_classes)
        spec = TaskSpec(name=f"s{i}", labels=("a", "b", "c"), adapter=CFG, sampling=TINY_SAMPLING,
                        trunk_fingerprint=trunk.fingerprint)
        out.append(TaskVersion(spec, host, tmp_path / f"s{i}", host.nbytes))
    return out


def _slot_bytes(trunk, tv: TaskVersion) -> int:
    return SlotBank(trunk.dim, CPU, torch.float32).slot_bytes([TaskShape.of(tv.host_stack)])


# --- the flag ---------------------------------------------------------------------------------------


def test_the_flag_parses_and_defaults_to_the_byte_budget():
    assert parse_args(["--model-repository", "r", "--adapter-slots", "64"]).adapter_slots == 64
    default = parse_args(["--model-repository", "r"])
    assert default.adapter_slots == 0 and default.cache_bytes == 1 << 30


@pytest.mark.parametrize("argv, says", [
    (["--adapter-slots", "-1"], "adapter_slots must be an int >= 0"),
    (["--adapter-slots", "two"], "--adapter-slots: invalid int value"),
    (["--adapter-slots", "8", "--cache-bytes", "4096"], "--adapter-slots 8 and --cache-bytes 4096 both size"),
    # the default budget given explicitly is still two limits on one bank (it was accepted)
    (["--adapter-slots", "8", "--cache-bytes", str(1 << 30)], f"--adapter-slots 8 and --cache-bytes {1 << 30} both"),
])
def test_bad_values_are_usage_errors_that_say_why(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--model-repository", "r", *argv])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_adapter_slots_refuses_a_bad_count():
    with pytest.raises(ValueError, match="slots must be an int >= 0"):
        AdapterSlots(1 << 20, CPU, torch.float32, slots=-2)


# --- the bank ----------------------------------------------------------------------------------------


def test_the_bank_holds_exactly_n_slots_whatever_the_byte_budget(tiny_trunk, tmp_path):
    tvs = _versions(tiny_trunk, tmp_path, 7)
    per = _slot_bytes(tiny_trunk, tvs[0])
    slots = AdapterSlots(1, CPU, torch.float32, slots=5)  # a 1-byte budget would hold one slot: N owns the limit
    runner = ModelRunner(tiny_trunk, slots)
    v = torch.zeros(1, 4, 3, 32, 32)
    runner.forward([(tvs[0], v)])
    assert (slots.used, slots.free, slots.bytes) == (1, 4, 5 * per)  # all N allocated with the first task
    for tv in tvs[1:5]:
        runner.forward([(tv, v)])
    assert (slots.used, slots.free, slots.evictions) == (5, 0, 0)
    runner.forward([(tvs[5], v)])  # a sixth task: the least recently used leaves, the bank stays at N
    assert (slots.used, slots.free, slots.evictions, slots.bytes) == (5, 0, 1, 5 * per)
    assert not slots.is_resident(tvs[0]) and slots.is_resident(tvs[5])


def test_a_batch_with_more_tasks_than_n_runs_and_the_bank_returns_to_n(tiny_trunk, tmp_path):
    tvs = _versions(tiny_trunk, tmp_path, 4)
    slots = AdapterSlots(1 << 40, CPU, torch.float32, slots=2)
    runner = ModelRunner(tiny_trunk, slots)
    g = torch.Generator().manual_seed(5)
    clips = [(tv, torch.randn(1, 4, 3, 32, 32, generator=g)) for tv in tvs]
    out = runner.forward(clips)
    for (tv, views), p in zip(clips, out.probs, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(p, tiny_trunk(views, tv.host_stack).softmax(-1).mean(0), atol=1e-5, rtol=0)
    assert (slots.used, slots.free, slots.bytes) == (2, 0, 2 * _slot_bytes(tiny_trunk, tvs[0]))


def test_the_slot_metric_reflects_n(tiny_trunk, tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    tvs = _versions(tiny_trunk, tmp_path, 3)
    m = Metrics(CPU)
    slots = AdapterSlots(1 << 40, CPU, torch.float32, on_event=m.adapter_event, slots=6)
    m.watch_slots(lambda: slots.used, lambda: slots.free, lambda: slots.bytes)
    runner = ModelRunner(tiny_trunk, slots)
    for tv in tvs:
        runner.forward([(tv, torch.zeros(1, 4, 3, 32, 32))])
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in f.samples}
    assert got[("stadapter_adapter_slots", (("state", "used"),))] == 3
    assert got[("stadapter_adapter_slots", (("state", "free"),))] == 3
    assert got[("stadapter_adapter_device_bytes", ())] == 6 * _slot_bytes(tiny_trunk, tvs[0])


def test_the_server_sizes_its_bank_by_the_flag(two_task_repo):
    """Over a real server: after the warm-up the bank has the N slots asked for, all free (the warm-up runs
    zero-weight stand-ins and frees their slots: it left 2 of them used, by versions no request can name)."""
    with ServerProcess(two_task_repo, "--adapter-slots", "5") as srv:
        m = scrape(srv.metrics_url)
    assert metric(m, "stadapter_adapter_slots", state="used") == 0
    assert metric(m, "stadapter_adapter_slots", state="free") == 5
