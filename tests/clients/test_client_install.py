"""The client-only distribution (packaging/client): SDK + CLI + stubs, no torch, no numpy, in a fresh venv.

Builds the wheel from a copy of the sources, installs it into a new virtual
environment (grpcio and protobuf come from the package index pip is configured
with), checks the venv stays small and holds no ML stack, then classifies a clip
against a real server with the installed ``stadapter`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from media import make_clip

ROOT = Path(__file__).resolve().parents[2]
MAX_VENV_BYTES = 100 << 20

pytestmark = pytest.mark.integration


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client-dist")
    src = tmp / "src"
    (src / "packaging").mkdir(parents=True)
    shutil.copytree(ROOT / "packaging" / "client", src / "packaging" / "client")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("clients", "stadapter_api"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    wheels = tmp / "wheels"
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, src / "packaging" / "client"])
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("stadapter_client-*.whl")
    venv = tmp / "venv"
    r = _run([sys.executable, "-m", "venv", venv])
    assert r.returncode == 0, r.stderr
    r = _run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel])
    if r.returncode != 0 and ("No matching distribution" in r.stderr or "Could not find a version" in r.stderr):
        pytest.skip(f"the package index has no grpcio/protobuf for this Python: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def test_the_client_venv_is_small_and_has_no_ml_stack(client_venv):
    size = _size(client_venv)
    print(f"client venv: {size / 2**20:.1f} MiB")
    assert size < MAX_VENV_BYTES, f"client venv is {size / 2**20:.0f} MiB"
    code = ("import importlib.util, clients, clients.cli, clients.loadgen; "
            "print([m for m in ('torch', 'numpy', 'av', 'stadapter', 'server') if importlib.util.find_spec(m)])")
    r = _run([client_venv / "bin" / "python", "-c", code], cwd=client_venv)  # not the repo: only what is installed
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_installed_cli_classifies_against_a_running_server(client_venv, tmp_path, shared_server):
    clip = make_clip(tmp_path / "clip.mp4", 16)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    srv = shared_server
    r = _run([client_venv / "bin" / "stadapter", "classify", "--address", srv.address, "--task", "alpha",
              "--json", clip], cwd=client_venv, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(r.stdout)
    assert row["task"] == "alpha" and len(row["predictions"]) == 3
    r = _run([client_venv / "bin" / "stadapter", "classify", "--address", srv.address, "--task", "nope", clip],
             cwd=client_venv, env=env)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    r = _run([client_venv / "bin" / "stadapter", "triton-classify", "--task", "alpha", clip], cwd=client_venv, env=env)
    assert r.returncode == 1 and "needs the full install" in r.stderr and "Traceback" not in r.stderr
