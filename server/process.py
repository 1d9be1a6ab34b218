"""``python -m server`` as a child process on 127.0.0.1: the one launcher the demo, the benches and the tests share.

The child binds OS-picked ports (``--port 0 --metrics-port 0 --http-port 0``) and reports the
ports it really bound in ``--ready-file`` (the JSON line it also prints); this
waits for that file, then exposes :attr:`ServerProcess.address` and
:attr:`ServerProcess.metrics_url`. Only the standard library is used here.
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
from typing import Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """The server exited, or did not get ready in time; the message ends with its log."""


class ServerProcess:
    """Start the server and wait until it serves; a context manager that stops it (SIGTERM) on exit.

    Args:
        repository: model repository folder.
        *args: extra server flags (e.g. ``"--allow-insecure-admin"``, ``"--max-batch-size", "8"``).
        env: environment changes (a None value unsets the variable).
        timeout: seconds to wait for the ready file.
        launcher: the command before the server flags (default ``[sys.executable, "-m", "server"]``).
        workdir: where the ready file and the log go (default: a temporary folder removed by :meth:`close`).
    """

    def __init__(self, repository: str | os.PathLike, *args: str, env: Optional[Mapping[str, Optional[str]]] = None,
                 timeout: float = 60.0, launcher: Optional[Sequence[str]] = None,
                 workdir: Optional[str | os.PathLike] = None):
        self.repository = Path(repository)
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="stadapter-server-")
        folder = Path(workdir) if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.ready_file = folder / "ready.json"
        self.log_path = folder / "server.log"
        cmd = [*(launcher or (sys.executable, "-m", "server")), "--model-repository", str(self.repository),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0",
               "--ready-file", str(self.ready_file), *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        pp = full_env.get("PYTHONPATH", "")
        full_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
        self._log = open(self.log_path, "wb")
        self.proc = self._launch(cmd, full_env)
        try:
            self.info = self._wait_ready(timeout)
        except BaseException:
            self.stop(signal.SIGKILL, 5)
            raise
        self.grpc_port: int = int(self.info["grpc_port"])
        self.metrics_port: int = int(self.info["metrics_port"])
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        http = self.info.get("http_port")  # None when the flags turn HTTP off (--http-port -1)
        self.http_port: Optional[int] = int(http) if http is not None else None
        self.http_url = f"http://127.0.0.1:{http}" if http is not None else ""

    def _launch(self, cmd: list[str], env: dict[str, str]) -> "subprocess.Popen[bytes]":
        """Start ``cmd`` in the repository root with ``env``, its stdout and stderr going to the log (the tests'
        subclass may start the server another way; what it returns must answer like a ``Popen``)."""
        return subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT)

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
                raise ServerStartError(f"server exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            time.sleep(0.05)
        raise ServerStartError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

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
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
