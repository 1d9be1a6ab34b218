"""How a server starts: its decoder processes import and its warm-up runs while the registry's first scan reads the
repository (each can take seconds: a scan of thousands of task folders, a fresh interpreter's imports, the forwards
of every served shape), a start that fails after the decoders were spawned leaves none behind, and a server told to
stop right after it said it is ready drains."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys
import threading

import pytest
from serverproc import ServerProcess

from server.app import Server
from server.config import ServerConfig
from server.decode.pool import ProcessDecodePool
from server.engine import slots as slots_module
from server.engine.model import ModelRunner
from server.engine.slots import SlotMemoryError
from server.registry.loading import VersionReader
from server.registry.registry import TaskRegistry
from server.registry.scan_index import INDEX_FILE

MiB = 1 << 20


def config(repo, **kw) -> ServerConfig:
    return ServerConfig(model_repository=str(repo), host="127.0.0.1", port=0, metrics_port=0, http_port=-1,
                        decode_workers=1, poll_interval_s=0, **{"warmup": False, "decode_backend": "process", **kw})


def served_after_start(cfg) -> list[str]:
    """The tasks a server started on ``cfg`` serves, once ready (then drained)."""
    async def start_then_drain() -> list[str]:
        srv = await Server.start(cfg)
        try:
            return sorted(srv.registry.tasks)
        finally:
            await srv.drain()

    return asyncio.run(start_then_drain())


def test_the_decoders_start_while_the_first_scan_runs(two_task_repo, monkeypatch):
    """The scan is held until the decoder pool has begun to start: before, the pool was started only after the
    scan (and the warm-up) had finished, so the held scan waited in vain."""
    pool_starting = threading.Event()
    scan_saw_pool: list[bool] = []
    real_start, real_sync = ProcessDecodePool.start, TaskRegistry.sync

    async def start(self, *args, **kwargs):
        pool_starting.set()
        await real_start(self, *args, **kwargs)

    def sync(self, *args, **kwargs):
        if not scan_saw_pool:  # the start's scan (a poll would be later)
            scan_saw_pool.append(pool_starting.wait(timeout=5))
        return real_sync(self, *args, **kwargs)

    monkeypatch.setattr(ProcessDecodePool, "start", start)
    monkeypatch.setattr(TaskRegistry, "sync", sync)

    assert served_after_start(config(two_task_repo)) == ["alpha", "beta"]
    assert scan_saw_pool == [True]


def test_the_warm_up_begins_while_the_first_scan_runs(two_task_repo, monkeypatch):
    """The scan's second read is held until a warm-up forward has run: before, the warm-up began only once the
    scan had ended (it needed every task's shapes), so the held read waited in vain. A version's shapes are known
    as soon as the scan has read it, and the warm-up runs what they complete."""
    forwarded = threading.Event()
    read_saw_forward: list[bool] = []
    reads: list[str] = []
    real_forward, real_version_at = ModelRunner.forward, VersionReader.version_at

    def forward(self, *args, **kwargs):
        forwarded.set()
        return real_forward(self, *args, **kwargs)

    def version_at(self, path):
        reads.append(path.parent.name)
        if len(reads) == 2:  # the first version read is what the warm-up can start on
            read_saw_forward.append(forwarded.wait(timeout=5))
        return real_version_at(self, path)

    monkeypatch.setattr(ModelRunner, "forward", forward)
    monkeypatch.setattr(VersionReader, "version_at", version_at)

    assert served_after_start(config(two_task_repo, warmup=True, decode_backend="thread")) == ["alpha", "beta"]
    assert read_saw_forward == [True]


@pytest.mark.parametrize("warmup", [False, True], ids=["no-warmup", "warmup"])
def test_a_start_refused_after_the_decoders_were_spawned_leaves_no_decoder_running(two_task_repo, monkeypatch, warmup):
    """With the warm-up on, the refusal comes from its first batch of forwards, before any forward allocates the
    slots, while the scan may still be reading: the start waits for the scan's thread, and raises the refusal."""
    monkeypatch.setattr(slots_module, "free_device_bytes", lambda device: 1 * MiB)
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(SlotMemoryError, match="--adapter-slots 100000"):
        asyncio.run(Server.start(config(two_task_repo, device="cpu", adapter_slots=100_000, warmup=warmup)))
    assert {p.pid for p in multiprocessing.active_children()} - before == set()


SLOW_AFTER_READY = """
import sys, time
import server.app as app
written = app.write_ready_file
def write_then_stall(*args):  # as when another thread holds the interpreter right after the file is written
    written(*args)
    time.sleep(1.5)
app.write_ready_file = write_then_stall
from server.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigterm_right_after_the_ready_file_drains_the_server(two_task_repo):
    """The SIGTERM handler was installed only after the ready file was written: a SIGTERM in between (a rollout
    right after a start; the bench stopping each server once ready) killed the server undrained, so it never wrote
    its scan index, whose write (a thread, once the server serves) held the interpreter there at 10,000 tasks: the
    next start then found no index. Now the handlers come before the server says it is ready."""
    srv = ServerProcess(two_task_repo, "--no-warmup", "--decode-backend", "thread", "--poll-interval-s", "0",
                        launcher=[sys.executable, "-c", SLOW_AFTER_READY], fork=False)
    with srv:  # entered once the ready file is there
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0, srv.log_tail()
        assert "stopped" in srv.log_tail()
    assert (two_task_repo / INDEX_FILE).is_file()
