"""Test servers forked from a process that has already imported the server (a "zygote"), not started fresh.

Each ``python -m server`` pays its imports (torch, open_clip, the server) before it listens: seconds per server,
and the suite starts dozens. :func:`start` asks one helper process per test session (:mod:`zygote_main`, started
at the first request) to fork a server instead; the server then runs exactly what ``python -m server ARGS``
runs, with the requested environment, working folder and log. What it returns answers like a ``Popen``
(``pid``, ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``, ``returncode``): the zygote reaps its
children and reports each exit status.

:func:`start` returns None, and the caller starts a real subprocess, when:

- ``STADAPTER_TEST_ZYGOTE=0`` is set (the zygote is off for the session);
- the start's environment differs from the zygote's in a variable not in :data:`SAFE_AFTER_IMPORT` (one read
  at interpreter start or at import: ``OMP_NUM_THREADS``, ``MALLOC_*``, ``PYTHON*`` but ``PYTHONWARNINGS``
  (:data:`APPLIED_AFTER_FORK`), ``CUDA_VISIBLE_DEVICES``...),
  or it runs in another folder;
- the zygote could not import, was not single-threaded, or has gone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from zygote_main import WARNINGS_ENV

from server.decode.worker import TEST_HOOK_ENV
from stadapter_api.wire import ADMIN_TOKEN_ENV

OFF_ENV = "STADAPTER_TEST_ZYGOTE"
#: Environment variables read only while serving (not at interpreter start or import), so a forked server may
#: differ from the zygote in them; a difference in any other one starts a real subprocess.
SAFE_AFTER_IMPORT = frozenset({ADMIN_TOKEN_ENV, TEST_HOOK_ENV, "PYTEST_CURRENT_TEST"})
#: Read at interpreter start, but applied by the forked child as the interpreter would (:mod:`zygote_main`), so a
#: forked server may differ from the zygote in it too; the zygote itself starts without it.
APPLIED_AFTER_FORK = frozenset({WARNINGS_ENV})
#: What every start adds to the tests' own environment (``server.process``, ``tests/serverproc.py``).
ADDED_TO_EVERY_START = frozenset({"PYTHONUNBUFFERED", "PYTHONPATH", "OMP_NUM_THREADS"})
READY_TIMEOUT_S = 180.0
TESTS = Path(__file__).resolve().parent


def enabled() -> bool:
    return os.environ.get(OFF_ENV, "1") != "0"


def _import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in SAFE_AFTER_IMPORT | APPLIED_AFTER_FORK}


def _plain(env: dict[str, str]) -> bool:
    """Whether a start's environment is the tests' own plus only what every start adds: the zygote is made from the
    first such start, so one that sets or unsets something read at start (``MALLOC_ARENA_MAX``) neither becomes the
    zygote's environment nor forks, whichever test runs first."""
    free = ADDED_TO_EVERY_START | SAFE_AFTER_IMPORT | APPLIED_AFTER_FORK
    return all(os.environ.get(k) == v for k, v in env.items() if k not in free) and \
        all(k in env for k in os.environ if k not in free)


class ZygoteProcess:
    """A forked server, as a ``Popen`` shows a child (the zygote is its parent and reports its exit)."""

    def __init__(self, zygote: "Zygote", pid: int, args: list[str]):
        self._zygote = zygote
        self.pid = pid
        self.args = args
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self._zygote.pump(0.0)
            self.returncode = self._zygote.exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 0.1 if end is None else min(0.1, end - time.monotonic())
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
            self._zygote.pump(left)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped, so the pid is still this child's (or its zombie's)
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The test process's end of one zygote (:mod:`zygote_main`)."""

    def __init__(self, env: dict[str, str], cwd: str):
        self.env = _import_env(env)
        self.cwd = cwd
        self.exits: dict[int, int] = {}
        self._replies: dict[int, dict] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import zygote_main; del sys.path[0]; "
                "zygote_main.serve(int(sys.argv[1]))")
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())], cwd=cwd, env=self.env,
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.alive = False
        self.error = ""
        self.imports_set: dict[str, str] = {}
        ready = self._read(READY_TIMEOUT_S)
        if ready is None or not ready.get("ready") or ready.get("threads") != 1:
            self.error = f"the zygote did not get ready: {ready}"
            self.close()
        else:
            self.alive = True
            self.imports_set = ready.get("imports_set", {})

    def _read(self, timeout: float) -> Optional[dict]:
        """One message within ``timeout`` s (None: none, or the zygote has gone)."""
        if not select.select([self._sock], [], [], max(timeout, 0.0))[0]:
            return None
        try:
            data = self._sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self.alive = False
            return None
        return json.loads(data)

    def pump(self, timeout: float) -> None:
        """Take in what the zygote said (waiting up to ``timeout`` s for the first message)."""
        with self._lock:
            msg = self._read(timeout)
            while msg is not None:
                if "exit" in msg:
                    self.exits[msg["exit"]] = msg["code"]
                else:
                    self._replies[msg["id"]] = msg
                msg = self._read(0.0)

    def fits(self, env: dict[str, str], cwd: str) -> bool:
        """Whether a fork runs as ``python -m server`` with ``env`` in ``cwd`` would: the same environment but for
        the variables read only while serving, and those the zygote's imports set to the very value ``env`` has
        (the tests' process has them once it has imported the same modules; a fresh server's imports would set
        them to that value)."""
        if not self.alive or cwd != self.cwd:
            return False
        wanted = _import_env(env)
        differ = {k for k in set(wanted) | set(self.env) if wanted.get(k) != self.env.get(k)}
        return all(k in wanted and self.imports_set.get(k) == wanted[k] for k in differ)

    def start(self, argv: list[str], env: dict[str, str], log_fd: int) -> Optional[ZygoteProcess]:
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            req = json.dumps({"id": rid, "argv": argv, "env": env, "cwd": self.cwd}).encode()
            try:
                socket.send_fds(self._sock, [req], [log_fd])
            except OSError:
                self.alive = False
                return None
            end = time.monotonic() + 30
            while rid not in self._replies and self.alive and time.monotonic() < end:
                self.pump(0.5)
            reply = self._replies.pop(rid, {})
        if "pid" not in reply:
            return None
        return ZygoteProcess(self, reply["pid"], ["-m", "server", *argv])

    def close(self) -> None:
        """Close the socket: the zygote SIGKILLs the servers still running and exits."""
        self.alive = False
        self._sock.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_zygote: Optional[Zygote] = None


def start(cmd: list[str], env: dict[str, str], cwd: str, log_fd: int) -> Optional[ZygoteProcess]:
    """Fork ``cmd`` (``[python, "-m", "server", *ARGS]``) from the session's zygote; None: start it yourself."""
    global _zygote
    if not enabled() or cmd[:3] != [sys.executable, "-m", "server"]:
        return None
    if _zygote is None:
        if not _plain(env):
            return None
        _zygote = Zygote(env, cwd)
    if not _zygote.fits(env, cwd):
        return None
    return _zygote.start(cmd[3:], env, log_fd)


def forks(env: dict[str, str], cwd: str) -> bool:
    """Whether the session's zygote (started by then) forks a server with ``env`` in ``cwd``."""
    return enabled() and _zygote is not None and _zygote.fits(env, cwd)


def shutdown() -> None:
    """Stop the session's zygote (its servers still running are SIGKILLed): at exit, after the servers' reaping."""
    if _zygote is not None:
        _zygote.close()
