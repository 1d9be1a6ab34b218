"""Replicas sharing one repository: a register retried on another replica with the same upload id.

Behind a load balancer an SDK retry of RegisterTask may reach another replica while the
first is still publishing. Both see no version with that upload id yet; without a lock that
spans replicas both publish, and one upload becomes two versions. Here two registries on one
folder (two replicas: their in-process locks are their own) race on the same upload id.
"""

from __future__ import annotations

import shutil
import threading

from factories import upload_copy

from server.registry.folders import version_dirs
from server.registry.registry import TaskRegistry

ROUNDS = 6


def test_one_upload_id_racing_on_two_replicas_is_one_version(two_task_repo, tiny_trunk, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(two_task_repo / "tasks" / "alpha" / "1", source)
    replicas = [TaskRegistry(two_task_repo, tiny_trunk, keep_versions=100) for _ in range(2)]
    for r in replicas:
        r.sync()
    for round_ in range(ROUNDS):
        upload_id = f"race-{round_}"
        before = set(version_dirs(two_task_repo / "tasks" / "alpha"))
        barrier = threading.Barrier(2)
        got: list[int] = []
        errors: list[BaseException] = []

        def register(r: TaskRegistry, barrier=barrier, got=got, errors=errors, upload_id=upload_id) -> None:
            upload = upload_copy(r, source)
            barrier.wait()
            try:
                got.append(r.register_upload(upload, upload_id).version)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=register, args=(r,)) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        added = set(version_dirs(two_task_repo / "tasks" / "alpha")) - before
        assert len(added) == 1, f"round {round_}: upload id {upload_id} published versions {sorted(added)}"
        assert got == [added.pop()] * 2


def test_the_lock_files_are_not_tasks(two_task_repo, tiny_trunk, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(two_task_repo / "tasks" / "beta" / "1", source)
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    reg.register_upload(upload_copy(reg, source), "one")
    reg.unregister("beta")
    assert sorted(reg.scan()) == ["alpha"]
    assert sorted(TaskRegistry(two_task_repo, tiny_trunk).sync()[0], key=lambda tv: tv.name)[0].name == "alpha"
