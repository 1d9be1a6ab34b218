"""SDK, CLI and load generator against the real server (``python -m server``) on 127.0.0.1.

One module-scoped server on a tiny repository (admin token set) serves most tests;
the TLS test starts its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import media
import pytest
from serverproc import ServerProcess, make_repository, self_signed_cert  # noqa: E402

from clients import AsyncClient, Client, ClientError, RetryPolicy, cli, loadgen  # noqa: E402  # noqa: E402

pytestmark = pytest.mark.integration
TOKEN = "clients-test-token"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    good = [media.make_clip(d / f"clip{i}.mp4", num_frames=12 + 4 * i, size=(64, 48)) for i in range(2)]
    bad = d / "garbage.mp4"
    bad.write_bytes(media.garbage(2048))
    return {"good": good, "bad": bad}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients-repo")
    repo = make_repository(root / "repo")
    (root / "token").write_text(TOKEN + "\n")
    with ServerProcess(repo, "--admin-token-file", str(root / "token"), "--poll-interval-s", "0",
                       env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        srv.token_file = root / "token"
        yield srv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- SDK -----------------------------------------------------------------------------------------


def test_classify_path_bytes_and_stream_agree(server, clips):
    path = clips["good"][0]
    with Client(server.address) as c:
        a = c.classify(path, "alpha", top_k=3)
        b = c.classify(path.read_bytes(), "alpha", top_k=1)
    with Client(server.address, stream_threshold_bytes=256, chunk_bytes=300) as streamed:
        s = streamed.classify(path, "alpha", top_k=3)
    assert a.task == "alpha" and a.task_version == 1 and len(a.predictions) == 3
    assert [p.label for p in a.predictions] == [p.label for p in s.predictions]
    assert b.top.label == a.top.label and b.top.score == pytest.approx(a.top.score, abs=1e-6)
    assert sum(p.score for p in a.predictions) == pytest.approx(1.0, abs=1e-4)  # 3 classes, top 3
    assert a.timings["total_ms"] > 0 and a.timings["batch_size"] >= 1


def test_sampling_overrides_reach_the_server(server, clips):
    with Client(server.address) as c:
        base = c.classify(clips["good"][1], "beta", top_k=4)
        more = c.classify(clips["good"][1], "beta", top_k=4, sampling={"num_frames": 4, "temporal_views": 2})
        with pytest.raises(ClientError) as e:
            c.classify(clips["good"][1], "beta", sampling={"spatial_views": 2})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {p.label for p in base.predictions} == {p.label for p in more.predictions}
    assert [round(p.score, 4) for p in base.predictions] != [round(p.score, 4) for p in more.predictions]


def test_batch_classify_gives_each_clip_its_own_result(server, clips):
    with Client(server.address) as c:
        out = c.batch_classify([clips["good"][0], clips["bad"], clips["good"][1]], ["alpha", "alpha", "beta"])
    assert [type(r).__name__ for r in out] == ["ClassifyResult", "ClientError", "ClassifyResult"]
    assert out[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert out[0].task == "alpha" and out[2].task == "beta"


def test_errors_unknown_task_bad_clip_bad_token_no_token(server, clips):
    with Client(server.address) as c:
        with pytest.raises(ClientError) as e:
            c.classify(clips["good"][0], "no-such-task")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "no-such-task" in e.value.message
        with pytest.raises(ClientError) as e:
            c.classify(clips["bad"], "alpha")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and not e.value.local
        with pytest.raises(ClientError) as e:
            c.unregister("alpha")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert c.classify(clips["good"][0], "alpha").task == "alpha"  # the server is fine afterwards
    with Client(server.address, token="wrong") as c:
        with pytest.raises(ClientError) as e:
            c.register(server.repository / "tasks" / "alpha" / "1")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_register_describe_and_unregister(server, clips, tmp_path):
    bundle = tmp_path / "gamma"
    shutil.copytree(server.repository / "tasks" / "beta" / "1", bundle)
    spec = json.loads((bundle / "task.json").read_text())
    spec["name"] = "gamma"
    (bundle / "task.json").write_text(json.dumps(spec))
    with Client(server.address, token=TOKEN, chunk_bytes=1000) as c:
        info = c.register(bundle)
        assert (info.name, info.version, len(info.labels)) == ("gamma", 1, 4)
        assert c.describe_task("gamma").adapter_bytes == info.adapter_bytes > 0
        assert "gamma" in [t.name for t in c.list_tasks().tasks]
        assert c.classify(clips["good"][0], "gamma").task == "gamma"
        assert c.unregister("gamma") == ("gamma", 1)
        with pytest.raises(ClientError) as e:
            c.describe_task("gamma")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ClientError, match="lacks"):
            c.register(tmp_path)  # not a bundle: refused locally


def test_server_down_is_unavailable_after_bounded_retries():
    address = f"127.0.0.1:{free_port()}"
    with Client(address, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)) as c:
        t = time.monotonic()
        with pytest.raises(ClientError) as e:
            c.health(timeout=10)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t < 5


def test_async_client(server, clips):
    async def go():
        async with AsyncClient(server.address) as c:
            status = await c.health()
            results = await asyncio.gather(*(c.classify(p, t) for p in clips["good"] for t in ("alpha", "beta")))
            tasks = await c.list_tasks()
            try:
                await c.classify(clips["good"][0], "nope")
            except ClientError as e:
                return status, results, tasks, e
        raise AssertionError("unknown task did not raise")

    status, results, tasks, err = asyncio.run(go())
    assert status == "SERVING"
    assert [r.task for r in results] == ["alpha", "beta", "alpha", "beta"]
    assert {t.name for t in tasks.tasks} >= {"alpha", "beta"}
    assert err.code == grpc.StatusCode.NOT_FOUND


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_stops_quietly_when_its_reader_leaves(server, clips):
    """``stadapter windows --json | head``: the reader closes the pipe; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-m", "clients", "windows", str(clips["good"][1]), "--task", "alpha",
                               "--window-s", "0.2", "--json", "--address", server.address],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports a writer whose reader left


def test_cli_top_k_defaults_to_the_servers(server, clips, capsys):
    """No --top-k: the server's --default-top-k (5) decides, as for every other client (the CLI sent 3)."""
    assert cli.main(["classify", str(clips["good"][0]), "--task", "beta", "--json", "--address", server.address]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == 4  # all of beta's 4 labels: 5 capped at 4


def test_cli_classify_table_json_and_errors(server, clips, capsys):
    a = ["--address", server.address]
    assert cli.main(["classify", *map(str, clips["good"]), "--task", "alpha", *a]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["CLIP", "TASK", "VERSION", "TOP-1"] and len(out) == 3
    assert cli.main(["classify", str(clips["good"][0]), "--task", "beta", "--top-k", "2", "--json", *a]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js[0]["task"] == "beta" and len(js[0]["predictions"]) == 2

    assert cli.main(["classify", str(clips["good"][0]), "--task", "nope", *a]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NOT_FOUND" in err[0] and "nope" in err[0]
    assert cli.main(["classify", str(clips["bad"]), str(clips["good"][0]), "--task", "alpha", "--batch", *a]) == 1
    cap = capsys.readouterr()
    assert "INVALID_ARGUMENT" in cap.err and "garbage.mp4" in cap.err and "alpha" in cap.out


def test_cli_admin_tasks_and_token_sources(server, capsys, monkeypatch, tmp_path):
    a = ["--address", server.address]
    monkeypatch.delenv("STADAPTER_ADMIN_TOKEN", raising=False)
    assert cli.main(["tasks", *a]) == 0
    assert "alpha" in capsys.readouterr().out
    bundle = str(server.repository / "tasks" / "beta" / "1")
    assert cli.main(["register", bundle, *a]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main(["register", bundle, "--token", "bad", *a]) == 1
    assert "not valid" in capsys.readouterr().err
    assert cli.main(["register", bundle, "--token-file", str(server.token_file), *a]) == 0
    assert "registered beta version 2" in capsys.readouterr().out
    monkeypatch.setenv("STADAPTER_ADMIN_TOKEN", TOKEN)
    assert cli.main(["tasks", "--json", *a]) == 0
    assert {t["name"]: t["version"] for t in json.loads(capsys.readouterr().out)["tasks"]}["beta"] == 2
    assert cli.main(["describe", "beta", *a]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["name"], d["version"], d["state"]) == ("beta", 2, "ready") and d["adapter_bytes"] > 0
    assert cli.main(["unregister", "nope", *a]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    (tmp_path / "empty").write_text("")
    assert cli.main(["tasks", "--token-file", str(tmp_path / "empty"), *a]) == 1
    assert "is empty" in capsys.readouterr().err


def test_cli_subprocess_health_and_server_down(server):
    run = lambda *args: subprocess.run([sys.executable, "-m", "clients", *args], capture_output=True, text=True,  # noqa: E731
                                       cwd=ROOT, timeout=60)
    ok = run("health", "--address", server.address)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    down = run("classify", str(ROOT / "pyproject.toml"), "--task", "alpha", "--address",
               f"127.0.0.1:{free_port()}", "--retries", "1")
    assert down.returncode == 3, down
    assert down.stderr.startswith("error: cannot reach the server at 127.0.0.1:") and down.stderr.count("\n") == 1


def test_cli_over_tls(tmp_path, clips, capsys):
    cert, key = self_signed_cert(tmp_path)
    repo = make_repository(tmp_path / "repo", tasks=(("alpha", 3),))
    with ServerProcess(repo, "--tls-cert", str(cert), "--tls-key", str(key), "--poll-interval-s", "0") as srv:
        a = ["--address", srv.address, "--tls-ca", str(cert)]
        assert cli.main(["health", *a]) == 0
        assert cli.main(["classify", str(clips["good"][0]), "--task", "alpha", *a]) == 0
        assert "alpha" in capsys.readouterr().out
        assert cli.main(["health", "--address", srv.address, "--retries", "0", "--timeout", "5"]) == 3  # plaintext


# --- load generator -------------------------------------------------------------------------------


def test_loadgen_closed_and_open_loop(server, clips, capsys, tmp_path):
    args = ["--address", server.address, "--clips", *map(str, clips["good"]), "--no-progress"]
    assert loadgen.main([*args, "--task", "alpha,beta", "--concurrency", "4", "--requests", "24",
                         "--json-out", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["requests"] == s["ok"] == 24 and s["errors"] == {} and s["mode"] == "closed"
    lat = s["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and s["throughput_rps"] > 0
    assert "throughput" in capsys.readouterr().out

    assert loadgen.main([*args, "--task", "alpha,missing", "--rate", "40", "--requests", "16", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"] == "open" and s["requests"] == 16
    assert s["ok"] + s["errors"].get("NOT_FOUND", 0) == 16 and s["errors"].get("NOT_FOUND", 0) > 0
    assert 0.3 < s["elapsed_s"] < 5  # 16 starts at 40/s: about 0.4 s
    assert loadgen.main([*args, "--task", "beta", "--rate", "20", "--duration", "0.5", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["requests"] == s["ok"] == 10  # starts at 0, 50, ..., 450 ms

    assert loadgen.main([*args, "--task", "alpha", "--concurrency", "1", "--duration", "1", "--address",
                         "10.1.2.3:50051"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
