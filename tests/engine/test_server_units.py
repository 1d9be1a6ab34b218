"""In-process tests of the server's parts: registry, device cache, batcher, auth, error mapping, config."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time

import grpc
import pytest
import torch
from factories import make_bundle, make_trunk_dir

from server.config import ServerConfig, parse_args
from server.engine.batcher import Batcher
from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots
from server.errors import BadRequest, Draining, QueueFull, TaskNotFound, Unauthenticated, status_for
from server.frontends.auth import Auth
from server.registry.registry import TaskRegistry
from stadapter.bundle import BundleError
from stadapter.config import ConfigError
from stadapter.video import VideoError, VideoOutOfMemory


@pytest.fixture()
def repo(two_task_repo):
    return two_task_repo


def _upload(registry: TaskRegistry, trunk, tmp_path, name: str, seed: int = 5, **kw):
    src = make_bundle(trunk, tmp_path / f"src-{name}-{seed}", name=name, seed=seed, **kw)
    up = registry.new_upload_dir()
    for f in src.iterdir():
        shutil.copy(f, up / f.name)
    return registry.register_upload(up)


def test_registry_loads_latest_version_and_ignores_dot_folders(repo, tiny_trunk):
    make_bundle(tiny_trunk, repo / "tasks" / "alpha" / "2", name="alpha", version=2, seed=3)
    (repo / "tasks" / ".upload-leftover").mkdir()
    (repo / "tasks" / "alpha" / ".tmp-3").mkdir()
    reg = TaskRegistry(repo, tiny_trunk)
    reg.sync()
    assert sorted(reg.tasks) == ["alpha", "beta"]
    assert reg.tasks["alpha"].version == 2


def test_registry_skips_a_bad_folder_and_keeps_serving_the_rest(repo, tiny_trunk, tmp_path_factory):
    bad = repo / "tasks" / "gamma" / "1"
    other_trunk_dir = make_trunk_dir(tmp_path_factory.mktemp("other") / "trunk", seed=7)
    from stadapter import load_trunk

    make_bundle(load_trunk(other_trunk_dir), bad, name="gamma")
    reg = TaskRegistry(repo, tiny_trunk)
    reg.sync()
    assert sorted(reg.tasks) == ["alpha", "beta"]


def test_register_assigns_next_version_atomically_and_publishes(repo, tiny_trunk, tmp_path):
    changes = []
    reg = TaskRegistry(repo, tiny_trunk, on_change=lambda p, r: changes.append(([t.key for t in p], [t.key for t in r])))
    reg.sync()
    old = reg.acquire("alpha")  # an in-flight request holds version 1
    tv = _upload(reg, tiny_trunk, tmp_path, "alpha", seed=9, version=1)
    assert tv.version == 2 and reg.tasks["alpha"] is tv
    assert json.loads((repo / "tasks" / "alpha" / "2" / "task.json").read_text())["version"] == 2
    assert old.version == 1 and old.retired  # the captured version is still whole
    assert changes[-1] == ([("alpha", 2)], [("alpha", 1)])
    assert not [p for p in (repo / "tasks").iterdir() if p.name.startswith(".upload-")]
    old.release()
    tv3 = _upload(reg, tiny_trunk, tmp_path, "alpha", seed=10)
    assert tv3.version == 3
    assert sorted(p.name for p in (repo / "tasks" / "alpha").iterdir()) == ["2", "3"]  # keep_versions=2


def test_register_refuses_a_bundle_of_another_trunk(repo, tiny_trunk, tmp_path):
    from stadapter import load_trunk

    reg = TaskRegistry(repo, tiny_trunk)
    other = load_trunk(make_trunk_dir(tmp_path / "other", seed=3))
    src = make_bundle(other, tmp_path / "b", name="delta")
    up = reg.new_upload_dir()
    for f in src.iterdir():
        shutil.copy(f, up / f.name)
    with pytest.raises(BundleError, match="trunk"):
        reg.register_upload(up)
    assert not up.exists() and not (repo / "tasks" / "delta" / "1").exists()


def test_unregister_stops_new_requests_and_deletes_after_inflight(repo, tiny_trunk):
    reg = TaskRegistry(repo, tiny_trunk)
    reg.sync()
    tv = reg.acquire("beta")
    reg.unregister("beta")
    with pytest.raises(TaskNotFound):
        reg.acquire("beta")
    assert not (repo / "tasks" / "beta").exists()
    tomb = [p for p in (repo / "tasks").iterdir() if p.name.startswith(".deleted-beta")]
    assert len(tomb) == 1  # the files stay until the in-flight request ends
    tv.release()  # deletes in a background thread (the last release may run on the event loop)
    deadline = time.monotonic() + 10
    while tomb[0].exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not tomb[0].exists()
    reg2 = TaskRegistry(repo, tiny_trunk)
    reg2.sync()
    assert sorted(reg2.tasks) == ["alpha"]  # a restart does not bring it back


def test_sync_picks_up_another_replicas_changes(repo, tiny_trunk, tmp_path):
    a, b = TaskRegistry(repo, tiny_trunk), TaskRegistry(repo, tiny_trunk)
    a.sync(), b.sync()
    _upload(a, tiny_trunk, tmp_path, "gamma")
    a.unregister("beta")
    published, retired = b.sync()
    assert [t.key for t in published] == [("gamma", 1)] and [t.key for t in retired] == [("beta", 1)]
    assert sorted(b.tasks) == ["alpha", "gamma"]


def test_batcher_mixes_tasks_groups_by_frames_and_matches_single_runs(repo, tiny_trunk):
    reg = TaskRegistry(repo, tiny_trunk)
    reg.sync()
    alpha, beta = reg.tasks["alpha"], reg.tasks["beta"]
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, torch.device("cpu"), torch.float32))
    g = torch.Generator().manual_seed(0)
    clips = [(alpha, torch.randn(1, 4, 3, 32, 32, generator=g)), (beta, torch.randn(2, 4, 3, 32, 32, generator=g)),
             (alpha, torch.randn(1, 4, 3, 32, 32, generator=g)), (beta, torch.randn(1, 2, 3, 32, 32, generator=g))]

    async def go():
        b = Batcher(runner, ServerConfig(model_repository=repo, max_batch_size=8).limits, max_delay_s=0.2)
        b.start()
        res = await asyncio.gather(*(b.submit(tv, v, None) for tv, v in clips))
        await b.close()
        return res

    results = asyncio.run(go())
    # the three T=4 clips share one forward (two tasks); the T=2 clip runs alone
    assert [r.batch_clips for r in results] == [3, 3, 3, 1]
    for (tv, views), r in zip(clips, results, strict=True):
        with torch.no_grad():
            alone = tiny_trunk(views, tv.host_stack).softmax(-1).mean(0)
        torch.testing.assert_close(r.probs, alone, atol=1e-5, rtol=1e-4)


def test_batcher_splits_at_max_rows_and_drops_expired(repo, tiny_trunk):
    import time

    reg = TaskRegistry(repo, tiny_trunk)
    reg.sync()
    alpha = reg.tasks["alpha"]
    runner = ModelRunner(tiny_trunk, AdapterSlots(1 << 20, torch.device("cpu"), torch.float32))
    v = torch.zeros(1, 4, 3, 32, 32)

    async def go():
        b = Batcher(runner, ServerConfig(model_repository=repo, max_batch_size=2).limits, max_delay_s=0.05)
        b.start()
        res = await asyncio.gather(*(b.submit(alpha, v, None) for _ in range(5)),
                                   b.submit(alpha, v, time.monotonic() - 1), return_exceptions=True)
        await b.close()
        return res

    res = asyncio.run(go())
    assert sorted(r.batch_clips for r in res[:5]) == [1, 2, 2, 2, 2]
    assert type(res[5]).__name__ == "DeadlineExpired"


class _Ctx:
    def __init__(self, md):
        self._md = md

    def invocation_metadata(self):
        return self._md


def test_auth_admin_token_rules():
    a = Auth("s3cret")
    a.check_admin(_Ctx([("authorization", "Bearer s3cret")]))
    for md in ([], [("authorization", "Bearer wrong")], [("authorization", "Basic s3cret")]):
        with pytest.raises(Unauthenticated):
            a.check_admin(_Ctx(md))
    with pytest.raises(Exception, match="STADAPTER_ADMIN_TOKEN") as e:
        Auth(None).check_admin(_Ctx([("authorization", "Bearer x")]))
    assert status_for(e.value)[0] == grpc.StatusCode.PERMISSION_DENIED
    Auth(None, allow_insecure_admin=True).check_admin(_Ctx([]))
    Auth("s3cret").check_classify(_Ctx([]))  # no classify token configured
    with pytest.raises(Unauthenticated):
        Auth("s3cret", classify_token="c").check_classify(_Ctx([]))


@pytest.mark.parametrize("exc, code", [
    (VideoError("bad clip"), grpc.StatusCode.INVALID_ARGUMENT),
    (VideoOutOfMemory("cannot decode clip: out of memory"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BundleError("bad bundle"), grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError("bad config"), grpc.StatusCode.INVALID_ARGUMENT),
    (BadRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (TaskNotFound("x"), grpc.StatusCode.NOT_FOUND),
    (QueueFull("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining("x"), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL),
])
def test_status_for(exc, code):
    got, message = status_for(exc)
    assert got == code
    assert "secret detail" not in message


def test_config_flags_and_validation(tmp_path):
    cfg = parse_args(["--model-repository", str(tmp_path), "--port", "0", "--max-batch-size", "8", "--dtype", "float16"])
    assert isinstance(cfg, ServerConfig) and cfg.port == 0 and cfg.max_batch_size == 8 and cfg.dtype == "float16"
    assert cfg.warmup and not parse_args(["--model-repository", str(tmp_path), "--no-warmup"]).warmup
    with pytest.raises(ValueError, match="max_batch_size"):
        ServerConfig(model_repository=tmp_path, max_batch_size=0)
    with pytest.raises(ValueError, match="TLS"):
        ServerConfig(model_repository=tmp_path, tls_cert=tmp_path / "c.pem")
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), "--max-queue-size", "0"])
    with pytest.raises(ValueError, match="largest clip could never be accepted"):
        ServerConfig(model_repository=tmp_path, max_clip_bytes=1000, max_inflight_clip_bytes=999)


def test_host_dtype_flag(tmp_path, capsys):
    assert parse_args(["--model-repository", str(tmp_path)]).host_dtype == "stored"  # as today unless asked
    assert parse_args(["--model-repository", str(tmp_path), "--host-dtype", "serving"]).host_dtype == "serving"
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), "--host-dtype", "bf16"])
    assert "--host-dtype: invalid choice: 'bf16' (choose from" in capsys.readouterr().err
    with pytest.raises(ValueError, match="host_dtype must be stored[|]serving, got 'float8'"):
        ServerConfig(model_repository=tmp_path, host_dtype="float8")


def test_quantize_flag(tmp_path):
    assert parse_args(["--model-repository", str(tmp_path)]).quantize == "auto"  # int8 where it pays and is close
    assert parse_args(["--model-repository", str(tmp_path), "--quantize", "none"]).quantize == "none"
    assert parse_args(["--model-repository", str(tmp_path), "--quantize", "int8"]).quantize == "int8"
    with pytest.raises(ValueError, match="quantize must be auto[|]none[|]int8, got 'int4'"):
        ServerConfig(model_repository=tmp_path, quantize="int4")


def test_window_decoders_flag(tmp_path, capsys):
    assert parse_args(["--model-repository", str(tmp_path)]).window_decoders == 1
    assert parse_args(["--model-repository", str(tmp_path), "--window-decoders", "2"]).window_decoders == 2
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), "--window-decoders", "0"])
    assert "window_decoders must be a positive int, got 0" in capsys.readouterr().err


def test_help_names_every_protocol_and_each_flags_default():
    from server.config import build_parser

    text = " ".join(build_parser().format_help().split())
    for port in ("--port", "--http-port", "--metrics-port"):
        assert port in text.split("options:")[0]  # the description says which port serves what
    assert "Open Inference Protocol" in text and "multipart" in text
    with_default = [a for a in build_parser()._actions if a.default not in (None, argparse.SUPPRESS)]
    assert text.count("(default: ") == len(with_default) > 30  # each flag that has a default names it, once
    for a in with_default:
        assert f"(default: {a.default})" in text, a.option_strings


def test_warmup_runs_each_served_shape_once_per_path(repo, tiny_trunk):
    """Same-shape tasks share a group: a one-task and a two-task forward; another frame count is its own group."""
    from stadapter import SamplingConfig

    make_bundle(tiny_trunk, repo / "tasks" / "gamma" / "1", name="gamma", seed=4,
                sampling=SamplingConfig(num_frames=2, input_size=32))
    reg = TaskRegistry(repo, tiny_trunk)
    reg.sync()
    slots = AdapterSlots(1 << 20, torch.device("cpu"), torch.float32)
    runner = ModelRunner(tiny_trunk, slots)
    assert runner.warmup(list(reg.tasks.values())) == 3
    assert slots.activations == 3 and slots.used == 3 and slots.bytes > 0  # all three tasks are now in slots
    assert runner.warmup([]) == 0


def test_runner_in_bfloat16_agrees_with_float32(repo, tiny_trunk_dir):
    """The GPU default dtype, checked on CPU: cache converts adapters, inputs are cast, probabilities stay float32."""
    from stadapter import load_trunk

    g = torch.Generator().manual_seed(1)
    views = torch.randn(2, 4, 3, 32, 32, generator=g)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        trunk = load_trunk(tiny_trunk_dir, dtype=dtype)
        reg = TaskRegistry(repo, trunk)
        reg.sync()
        runner = ModelRunner(trunk, AdapterSlots(1 << 20, torch.device("cpu"), dtype))
        res = runner.forward([(reg.tasks["alpha"], views), (reg.tasks["beta"], views[:1])])
        out[dtype] = res.probs
    for a, b in zip(out[torch.float32], out[torch.bfloat16], strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=3e-2, rtol=0)


def test_versions_are_never_reused_after_unregister_or_restart(repo, tiny_trunk, tmp_path):
    """Unregister then register again used to give version 1 again, so replica A kept the old weights."""
    a, b = TaskRegistry(repo, tiny_trunk), TaskRegistry(repo, tiny_trunk)
    a.sync(), b.sync()
    assert _upload(a, tiny_trunk, tmp_path, "gamma", seed=5).version == 1
    b.sync()
    old = b.get("gamma")
    a.unregister("gamma")
    assert _upload(a, tiny_trunk, tmp_path, "gamma", seed=6).version == 2
    b.sync()  # b never saw the unregister: it must still pick up the new weights
    assert b.get("gamma").version == 2 and b.get("gamma").digest != old.digest
    a.unregister("gamma")
    restarted = TaskRegistry(repo, tiny_trunk)
    restarted.sync()
    assert _upload(restarted, tiny_trunk, tmp_path, "gamma", seed=7).version == 3


def test_replicas_compare_content_not_only_numbers(repo, tiny_trunk, tmp_path):
    a, b = TaskRegistry(repo, tiny_trunk), TaskRegistry(repo, tiny_trunk)
    a.sync()
    first = _upload(a, tiny_trunk, tmp_path, "gamma", seed=5)
    b.sync()
    assert b.get("gamma").digest == first.digest
    # another writer (an older server, a hand copy) puts different weights under the same number
    folder = repo / "tasks" / "gamma" / "1"
    other = make_bundle(tiny_trunk, tmp_path / "other", name="gamma", seed=9)
    shutil.copy(other / "adapter.safetensors", folder / "adapter.safetensors")
    from server.registry.registry import DIGEST_FILE, bundle_digest

    (folder / DIGEST_FILE).write_text(bundle_digest(folder) + "\n")
    published, _ = b.sync()
    assert [tv.key for tv in published] == [("gamma", 1)] and b.get("gamma").digest != first.digest
    assert b.sync() == ([], [])  # and it is not reloaded again on the next poll
