"""The suite's zygote (tests/zygote.py): a forked test server behaves as ``python -m server`` does, and falls back
to a real subprocess where a fork could differ."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zygote
from serverproc import ServerProcess, ServerStartError, make_repository, wait_for

from server.process import ROOT
from stadapter_api.wire import ADMIN_TOKEN_ENV

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not zygote.enabled(), reason=f"{zygote.OFF_ENV}=0: the zygote is off")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("zygote") / "repo")


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def test_a_forked_server_serves_and_exits_as_python_m_server_does(repo):
    with ServerProcess(repo, "--no-warmup", env={ADMIN_TOKEN_ENV: "tok"}) as srv:
        assert isinstance(srv.proc, zygote.ZygoteProcess)
        assert srv.proc.poll() is None and srv.proc.returncode is None
        with pytest.raises(subprocess.TimeoutExpired):
            srv.proc.wait(0.1)
        assert srv.stop() == 0
        log = srv.log()
    assert "stopped" in log
    assert "no admin token configured" not in log and "RuntimeWarning" not in log and "Traceback" not in log, log
    with ServerProcess(repo, "--no-warmup") as srv:
        assert srv.stop(signal.SIGKILL) == -signal.SIGKILL and srv.proc.wait(1) == -signal.SIGKILL


def test_a_bad_flag_exits_2_with_the_usage_message_python_m_server_prints(repo, monkeypatch):
    said = []
    for fork in (True, False):
        if not fork:  # fork=False must not ask the zygote
            monkeypatch.setattr(zygote, "start", lambda *a: pytest.fail("fork=False asked the zygote"))
        with pytest.raises(ServerStartError, match="exited with 2") as e:
            ServerProcess(repo, "--no-such-flag", fork=fork)
        said.append(str(e.value))
    assert said[0] == said[1] and said[0].endswith("error: unrecognized arguments: --no-such-flag"), said


def test_an_environment_read_at_interpreter_start_or_import_gets_a_real_subprocess(repo):
    with ServerProcess(repo, "--no-warmup", env={"MALLOC_ARENA_MAX": "2"}) as srv:  # first or not, never the zygote's
        assert isinstance(srv.proc, subprocess.Popen)
    with ServerProcess(repo, "--no-warmup") as plain:  # the session's zygote, made now if this test runs alone
        assert isinstance(plain.proc, zygote.ZygoteProcess)
    with ServerProcess(repo, "--no-warmup", env={"MALLOC_ARENA_MAX": "2"}) as srv:
        assert isinstance(srv.proc, subprocess.Popen)
        with open(f"/proc/{srv.proc.pid}/environ", "rb") as f:
            assert b"MALLOC_ARENA_MAX=2" in f.read().split(b"\0")
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key, value in (("OMP_NUM_THREADS", "2"), ("PYTHONMALLOC", "malloc"), ("CUDA_VISIBLE_DEVICES", "")):
        assert not zygote.forks({**base, key: value}, str(ROOT)), key
    assert zygote.forks({**base, ADMIN_TOKEN_ENV: "tok"}, str(ROOT))
    assert zygote.forks({**base, "PYTHONWARNINGS": "always"}, str(ROOT))  # applied by the child: next test
    assert not zygote.forks({**base, ADMIN_TOKEN_ENV: "tok"}, "/")


def test_a_variable_the_imports_set_in_the_tests_process_too_does_not_stop_the_fork():
    """open_clip sets ``TOKENIZERS_PARALLELISM=false`` at import, in the zygote and in the tests' process once it
    imports it: the servers started after that still fork (a fresh server's own import would set the same)."""
    base = {**{k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}
    own = zygote.Zygote(base, str(ROOT))
    try:
        assert own.alive, own.error
        assert own.fits({**base, "TOKENIZERS_PARALLELISM": "false"}, str(ROOT))
        assert not own.fits({**base, "TOKENIZERS_PARALLELISM": "true"}, str(ROOT))  # not what the import sets
    finally:
        own.close()


_SHOW_WARNINGS = ("import sys, warnings; "
                  "print([(a, getattr(m, 'pattern', m), c.__name__, getattr(mo, 'pattern', mo), n) "
                  "for a, m, c, mo, n in warnings.filters], sys.warnoptions)")


def test_a_forked_child_applies_pythonwarnings_as_the_interpreter_does_at_its_start():
    value = "always,,ignore::DeprecationWarning, error::UserWarning:json"
    imported = "warnings.filterwarnings('ignore', message='from an import'); "  # as torch's imports add filters
    fresh = subprocess.run([sys.executable, "-c", f"import warnings; {imported}{_SHOW_WARNINGS}"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONWARNINGS": value}, timeout=60, check=True)
    forked = subprocess.run([sys.executable, "-c", f"import sys, warnings; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
                             "import zygote_main; base = list(warnings.filters); "
                             f"{imported}zygote_main._apply_warning_options({value!r}, base); {_SHOW_WARNINGS}"],
                            capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                 if k != "PYTHONWARNINGS"}, timeout=60, check=True)
    assert "'always'" in fresh.stdout and "from an import" in fresh.stdout
    assert forked.stdout == fresh.stdout, (forked.stdout, fresh.stdout)


def test_the_decoders_of_a_forked_server_start_from_a_fresh_interpreter(repo):
    with ServerProcess(repo, "--no-warmup", "--decode-workers", "2") as srv:
        assert isinstance(srv.proc, zygote.ZygoteProcess)
        wait_for(lambda: len(_children(srv.proc.pid)) >= 2, "two decoder processes")
        for pid in _children(srv.proc.pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
            assert cmdline[0].decode() == sys.executable and b"multiprocessing" in b" ".join(cmdline), cmdline
            assert "libtorch" not in maps, f"decoder {pid} maps torch"


def test_the_zygote_forks_while_one_thread_and_its_servers_die_with_it(repo):
    own = zygote.Zygote({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, str(ROOT))
    assert own.alive, own.error
    assert len(os.listdir(f"/proc/{own.proc.pid}/task")) == 1
    with open(os.devnull, "wb") as log:
        proc = own.start(["--model-repository", str(repo), "--port", "0", "--metrics-port", "0", "--http-port", "-1"],
                         {**own.env}, log.fileno())
    assert proc is not None and len(os.listdir(f"/proc/{own.proc.pid}/task")) == 1
    own.close()  # the tests' end of the socket closes: the zygote kills its servers and exits
    assert own.proc.returncode == 0

    def gone() -> bool:
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_for(gone, "the zygote's server to die with it")
