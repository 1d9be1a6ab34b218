"""The zygote process: imports what ``python -m server`` imports once, then forks a server per request.

Run by :mod:`zygote` (``python -c``, with one end of a ``SOCK_SEQPACKET`` socket pair as ``argv[1]``); the
other end is the test process's. Messages are JSON packets:

- zygote -> tests: ``{"ready": true, "threads": N, "imports_set": {...}}`` once imported (or ``{"ready": false, "error": ...}``);
- tests -> zygote: ``{"id": I, "argv": [...], "env": {...}, "cwd": "..."}`` with the log's fd attached;
- zygote -> tests: ``{"id": I, "pid": P}`` (or ``{"id": I, "error": ...}``: the tests start a real subprocess);
- zygote -> tests: ``{"exit": P, "code": C}`` when it has reaped child P (``C`` as ``Popen.returncode`` says it).

The zygote forks only while it is the one thread of its process (checked in ``threading`` and in
``/proc/self/task`` before each fork), creates no event loop, channel or server, and touches no device. It exits
when its socket closes or its parent goes, and SIGKILLs its children first (each child also has
``PR_SET_PDEATHSIG``). The child runs ``server`` as ``python -m server`` runs it (``runpy``, as ``__main__``, so
the decoders it spawns re-import ``server.__main__``, not this module) and leaves with ``os._exit``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading
import warnings

MAX_PACKET = 1 << 20
PR_SET_PDEATHSIG = 1
WARNINGS_ENV = "PYTHONWARNINGS"


def _threads() -> int:
    """Threads of this process: those ``threading`` knows and those the kernel knows (a C library's own)."""
    return max(threading.active_count(), len(os.listdir("/proc/self/task")))


def _preimport() -> None:
    """What a server imports before it listens (not ``server.__main__`` itself: ``runpy`` runs it fresh, as ``-m``
    does, and warns when it was imported already)."""
    import open_clip  # noqa: F401
    import torch  # noqa: F401

    import server.app  # noqa: F401
    import server.config  # noqa: F401


def _set_by_imports(before: dict[str, str]) -> dict[str, str]:
    """The environment variables the imports set (``open_clip`` sets ``TOKENIZERS_PARALLELISM``, torch's inductor
    ``TORCHINDUCTOR_CACHE_DIR``): the tests' own process gets them when it imports the same modules."""
    return {k: v for k, v in os.environ.items() if before.get(k) != v}


def _send(sock: socket.socket, msg: dict) -> None:
    try:
        sock.send(json.dumps(msg).encode())
    except OSError:  # the tests have gone: the loop sees the closed socket next
        pass


def _exit_code(e: SystemExit) -> int:
    """What the interpreter makes of an uncaught ``SystemExit`` (a message goes to stderr, exit 1)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _apply_warning_options(value: str, base: list) -> None:
    """What the interpreter does with ``PYTHONWARNINGS=value`` at its start, done in a forked child: the options go
    to ``sys.warnoptions`` (which ``multiprocessing`` passes on to the decoders it spawns as ``-W``) and become
    filters in front of the default ones (``base``, the filters before the zygote imported anything), behind those
    the imports added since, as they would have been added after the options."""
    options = [o for o in value.split(",") if o]  # the interpreter splits on commas and skips empty items
    sys.warnoptions[:] = options
    current = list(warnings.filters)
    at = next((i for i in range(len(current) - len(base) + 1) if current[i:i + len(base)] == base), 0)
    warnings.filters[:] = current[at:]
    warnings._processoptions(options)  # type: ignore[attr-defined]  # each inserted in front, as at start
    warnings.filters[:0] = current[:at]
    warnings._filters_mutated()  # type: ignore[attr-defined]


def _run_server(argv: list[str], env: dict[str, str], cwd: str, log_fd: int, zygote: int,
                base_filters: list, imports_set: dict[str, str]) -> None:
    """In the forked child: become ``python -m server ARGV`` (fds, cwd, environment, signals), run, and exit."""
    import atexit
    import ctypes
    import runpy
    import traceback

    code = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != zygote:  # it went before the line above: nobody would reap or stop this server
            os._exit(1)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for k, v in imports_set.items():  # what a fresh server's imports would set, done here before the fork
            os.environ.setdefault(k, v)
        if env.get(WARNINGS_ENV):
            _apply_warning_options(env[WARNINGS_ENV], base_filters)
        sys.argv = ["-m", *argv]
        sys.path[0] = cwd  # what -m puts first
        _fresh_state()
        try:
            runpy.run_module("server", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except KeyboardInterrupt:  # the interpreter dies of the SIGINT it did not handle
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
            code = 1
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()  # what the interpreter does at exit: wait for the non-daemon threads
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code & 0xFF)


def _fresh_state() -> None:
    """What differs between a fork and a fresh interpreter and could be seen: seeds and multiprocessing's key
    (``random`` reseeds itself at a fork)."""
    import multiprocessing.process

    multiprocessing.process.current_process().authkey = os.urandom(32)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    parent = os.getppid()
    base_filters = list(warnings.filters)  # no warning options: the zygote starts without them
    before = dict(os.environ)
    try:
        _preimport()
    except BaseException as e:
        _send(sock, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: set[int] = set()
    me = os.getpid()
    imports_set = _set_by_imports(before)
    _send(sock, {"ready": True, "threads": _threads(), "imports_set": imports_set})
    try:
        while os.getppid() == parent:
            readable, _, _ = select.select([sock, wake_r], [], [], 1.0)
            if wake_r in readable:
                while True:
                    try:
                        if not os.read(wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
            _reap(sock, children)
            if sock not in readable:
                continue
            data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, 1)
            if not data:
                break  # the tests closed their end
            req = json.loads(data)
            threads = _threads()
            if threads != 1 or len(fds) != 1:
                _send(sock, {"id": req["id"], "error": f"{threads} threads, {len(fds)} fds: not forking"})
                for f in fds:
                    os.close(f)
                continue
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for f in (wake_r, wake_w, sock.fileno()):
                    os.close(f)
                _run_server(req["argv"], req["env"], req["cwd"], fds[0], me, base_filters, imports_set)
            os.close(fds[0])
            children.add(pid)
            _send(sock, {"id": req["id"], "pid": pid})
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _reap(sock: socket.socket, children: set[int]) -> None:
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            children.discard(pid)
            continue
        if done:
            children.discard(pid)
            _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve(int(sys.argv[1]))
