"""Ctrl-C in a terminal sends SIGINT to the server's whole process group, its decoder workers included: the server
drains and stops, and the workers, whose lifetime the server owns, neither die mid-decode nor print a
``KeyboardInterrupt`` traceback (issue 23: what a newcomer sees at Ctrl-C)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import media
import pytest
from serverproc import ServerProcess, make_repository, wait_for

from clients import Client


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            kids = [int(k) for k in (task / "children").read_text().split()]
            out += kids
            todo += kids
    return out


@pytest.mark.integration
def test_ctrl_c_to_the_process_group_stops_the_server_and_its_workers_without_tracebacks(tmp_path):
    repo = make_repository(tmp_path / "repo")
    srv = ServerProcess(repo, "--decode-workers", "2", "--poll-interval-s", "0", "--no-warmup", fork=False)
    try:
        with Client(srv.address) as c:  # both workers have decoded a clip
            for _ in range(2):
                assert c.classify(media.make_clip(num_frames=8), "alpha").task == "alpha"
        workers = _descendants(srv.proc.pid)
        assert workers, "the server has no decoder processes"
        for pid in [srv.proc.pid, *workers]:  # what the terminal does: one SIGINT to every process of the group
            os.kill(pid, signal.SIGINT)
        code = srv.proc.wait(timeout=60)
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), "the workers have exited")
        log = srv.log()
        assert code == 0 and "stopped" in log, log[-3000:]
        assert "KeyboardInterrupt" not in log and "Traceback" not in log, log[-3000:]
    finally:
        srv.close()
