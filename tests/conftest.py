from __future__ import annotations

import asyncio
import shutil

import pytest
from factories import make_bundle, make_trunk_dir

from stadapter import load_trunk


@pytest.fixture(scope="session")
def tiny_trunk_dir(tmp_path_factory):
    """A random, seeded tiny trunk folder (trunk.json + visual.safetensors)."""
    return make_trunk_dir(tmp_path_factory.mktemp("trunk") / "trunk")


@pytest.fixture(scope="session")
def tiny_trunk(tiny_trunk_dir):
    return load_trunk(tiny_trunk_dir)


@pytest.fixture()
def two_task_repo(tmp_path, tiny_trunk, tiny_trunk_dir):
    """A model repository: the tiny trunk, ``alpha`` (3 classes) and ``beta`` (4 classes), version 1 each."""
    shutil.copytree(tiny_trunk_dir, tmp_path / "trunk")
    make_bundle(tiny_trunk, tmp_path / "tasks" / "alpha" / "1", name="alpha", seed=1)
    make_bundle(tiny_trunk, tmp_path / "tasks" / "beta" / "1", name="beta", labels=["x", "y", "z", "w"], seed=2)
    return tmp_path


@pytest.fixture(scope="module")
def loop():
    """An event loop of the module's own, for tests that drive async server parts from sync code."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def pool(loop):
    """One sandboxed decoder process for a module's tests."""
    from server.decode.pool import ProcessDecodePool

    p = ProcessDecodePool(1)
    loop.run_until_complete(p.start())
    yield p
    p.close()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """One real server for the whole session, for tests that only ask it questions: the tasks
    :data:`serverproc.SHARED_TASKS` (alpha and beta as ``make_repository`` makes them), no warm-up, no
    repository polling, and no admin token (register and unregister are refused). A test that changes the
    repository, reads a metric as counted from zero, needs other flags, or stops, kills or drains the server
    starts its own."""
    from serverproc import SHARED_TASKS, ServerProcess, make_repository

    repo = make_repository(tmp_path_factory.mktemp("shared-server") / "repo", tasks=SHARED_TASKS)
    with ServerProcess(repo, "--no-warmup", "--poll-interval-s", "0", env={"STADAPTER_ADMIN_TOKEN": None}) as srv:
        yield srv
