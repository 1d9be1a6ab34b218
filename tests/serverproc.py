"""Start the real gRPC server as a subprocess for integration tests (and build a tiny repository).

Usage::

    repo = make_repository(tmp_path / "repo")            # tiny trunk + tasks "alpha", "beta"
    with ServerProcess(repo, "--allow-insecure-admin") as srv:
        channel = grpc.insecure_channel(srv.address)       # "127.0.0.1:PORT"
        ...                                                # srv.metrics_url, srv.proc
    # leaving the block sends SIGTERM and waits for the exit

The server binds 127.0.0.1 with ``--port 0 --metrics-port 0`` and reports the
ports it really bound in ``--ready-file`` (the same JSON line it prints).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASKS: tuple[tuple[str, int], ...] = (("alpha", 3), ("beta", 4))


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


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """``python -m server`` in a subprocess on 127.0.0.1 with OS-picked ports.

    Args:
        repository: model repository folder.
        *args: extra server flags (e.g. ``"--allow-insecure-admin"``, ``"--max-batch-size", "8"``).
        env: environment changes (e.g. ``{"STADAPTER_ADMIN_TOKEN": "s3cret"}``; a None value unsets it).
        timeout: seconds to wait for the ready file.
        launcher: the command before the server flags (default ``[sys.executable, "-m", "server"]``).
    """

    def __init__(self, repository: str | os.PathLike, *args: str, env: Optional[dict] = None, timeout: float = 60.0,
                 launcher: Optional[Sequence[str]] = None):
        self.repository = Path(repository)
        self._dir = tempfile.TemporaryDirectory(prefix="stadapter-server-")
        self.ready_file = Path(self._dir.name) / "ready.json"
        self.log_path = Path(self._dir.name) / "server.log"
        cmd = [*(launcher or (sys.executable, "-m", "server")), "--model-repository", str(self.repository),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
               "--ready-file", str(self.ready_file), *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        full_env.setdefault("OMP_NUM_THREADS", "1")
        pp = full_env.get("PYTHONPATH", "")
        full_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.info = self._wait_ready(timeout)
        except BaseException:
            self.stop(signal.SIGKILL, 5)
            raise
        self.grpc_port: int = int(self.info["grpc_port"])
        self.metrics_port: int = int(self.info["metrics_port"])
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _wait_ready(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ready_file.exists():
                text = self.ready_file.read_text()
                if text.strip():
                    try:
                        return json.loads(text)
                    except json.JSONDecodeError:
                        pass  # written non-atomically by someone else: retry
            if self.proc.poll() is not None:
                raise ServerStartError(f"server exited with {self.proc.returncode} before ready:\n{self.log()}")
            time.sleep(0.05)
        raise ServerStartError(f"server not ready after {timeout:.0f}s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> Optional[int]:
        """Send ``sig``, wait up to ``timeout`` s (then SIGKILL); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
