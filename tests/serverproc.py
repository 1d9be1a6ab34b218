"""Start the real gRPC server as a subprocess for integration tests (and build a tiny repository).

Usage::

    repo = make_repository(tmp_path / "repo")            # tiny trunk + tasks "alpha", "beta"
    with ServerProcess(repo, "--allow-insecure-admin") as srv:
        channel = grpc.insecure_channel(srv.address)       # "127.0.0.1:PORT"
        ...                                                # srv.metrics_url, srv.proc
    # leaving the block sends SIGTERM; the exit is waited for later (see ServerProcess.close)

The server binds 127.0.0.1 with ``--port 0 --metrics-port 0`` and reports the
ports it really bound in ``--ready-file`` (the same JSON line it prints).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import zygote

from server.process import ROOT, ServerStartError
from server.process import ServerProcess as _ServerProcess

__all__ = ["SHARED_TASKS", "ServerProcess", "ServerStartError", "code_of", "make_repository", "metric", "scrape", "self_signed_cert",
           "wait_for", "wait_for_async"]

DEFAULT_TASKS: tuple[tuple[str, int], ...] = (("alpha", 3), ("beta", 4))
SHARED_TASKS: tuple[tuple[str, int], ...] = (*DEFAULT_TASKS, ("gamma", 2), ("delta", 2))  # conftest's shared_server


def make_repository(
    root: str | os.PathLike,
    tasks: Sequence[tuple[str, int]] = DEFAULT_TASKS,
    seed: int = 0,
) -> Path:
    """A model repository with a tiny random trunk and one bundle (version 1) per ``(name, num_classes)``.

    Each task gets different random adapter weights (seed + its position), so tasks
    give different answers for the same clip.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from factories import make_bundle, make_trunk_dir

    from stadapter import load_trunk

    root = Path(root)
    make_trunk_dir(root / "trunk", seed=seed)
    trunk = load_trunk(root / "trunk")
    for i, (name, n) in enumerate(tasks):
        make_bundle(trunk, root / "tasks" / name / "1", name=name,
                    labels=[f"{name}-{c}" for c in range(n)], seed=seed + 1 + i)
    return root


class ServerProcess(_ServerProcess):
    """:class:`server.process.ServerProcess` with one OpenMP thread per server unless ``env`` says otherwise
    (the suite runs on 2 cores next to the test process), serving in float32 unless ``args`` name a ``--dtype``:
    the tests compare served answers with the library's float32 ones at float32's tolerances, and ``--dtype auto``
    serves bf16 on a CPU with bf16 matrix instructions."""

    def __init__(self, repository: str | os.PathLike, *args: str, env: Optional[dict] = None, timeout: float = 60.0,
                 launcher: Optional[Sequence[str]] = None, fork: bool = True):
        self.fork = fork
        if "--dtype" not in args:
            args = (*args, "--dtype", "float32")
        super().__init__(repository, *args, env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})},
                         timeout=timeout, launcher=launcher)

    def _launch(self, cmd: list[str], env: dict[str, str]) -> "subprocess.Popen[bytes]":
        """Forked from the session's zygote (:mod:`zygote`) where it can be (``fork``, the default, and an
        environment the zygote can serve), else a real ``python -m server`` subprocess. A test about the server
        process itself (its memory, the real start) passes ``fork=False``."""
        if self.fork:
            proc = zygote.start(cmd, env, str(ROOT), self._log.fileno())
            if proc is not None:
                return proc  # type: ignore[return-value]  # a Popen to its users
        return super()._launch(cmd, env)

    def close(self) -> None:
        """SIGTERM, without waiting for the exit: the next test goes on while this server drains and exits (the
        drain is mostly waiting, and every test paid it). Its exit is waited for, and its folder removed, by a
        later ``close`` once it has gone, or by :func:`reap_servers` when the tests end. A test about the exit
        itself waits for it (``stop()``, ``proc.wait``) before this runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _exiting.append(self)
        reap_servers(wait=False)


_exiting: list[ServerProcess] = []


def reap_servers(wait: bool = True) -> None:
    """Finish closing the servers :meth:`ServerProcess.close` signalled: those that have exited (all of them with
    ``wait``, each given 30 s before SIGKILL)."""
    for srv in list(_exiting):
        if wait or srv.proc.poll() is not None:
            _exiting.remove(srv)
            with contextlib.suppress(subprocess.TimeoutExpired):
                srv.proc.wait(30)  # the SIGTERM was sent
            _ServerProcess.close(srv)  # SIGKILL if it is still there; the log closed, the folder removed


def _at_exit() -> None:
    reap_servers()
    zygote.shutdown()


atexit.register(_at_exit)


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(cert, key) PEM files of a one-day certificate for 127.0.0.1 / localhost; skips the test without openssl."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def code_of(fn):
    """The gRPC status code ``fn()`` ends with (``grpc.StatusCode.OK`` when it returns)."""
    import grpc

    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """A server's /metrics as ``{(sample name, sorted labels): value}`` (read it with :func:`metric`)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(m: dict, name: str, **labels) -> float:
    """One sample of a :func:`scrape` (0 when the series does not exist)."""
    return m.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``cond`` until it holds (instead of sleeping a fixed time and hoping); fail naming ``what``."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


async def wait_for_async(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """:func:`wait_for` inside an event loop (what is awaited is polled on, not blocked)."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
