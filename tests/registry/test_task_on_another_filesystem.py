"""A task folder that is a symlink to another filesystem (a volume an operator mounted for one customer's tasks).

A rename cannot cross filesystems: registering a version into such a task (the upload is staged in ``tasks/``)
and unregistering one of its versions (the tombstone went to ``tasks/``) failed with EXDEV, answered INTERNAL.
Both now stage on the task's own filesystem, and the sweeper finds leftovers there too.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from factories import make_bundle

from server.registry.registry import TaskRegistry

OTHER_FS = Path("/dev/shm")


def _other_filesystem(tmp_path: Path) -> Path:
    if not OTHER_FS.is_dir() or os.stat(OTHER_FS).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    return OTHER_FS


@pytest.fixture()
def elsewhere(tmp_path):
    root = Path(os.path.join(_other_filesystem(tmp_path), f"stadapter-test-{os.getpid()}-{time.monotonic_ns()}"))
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def linked_repo(tiny_trunk, tiny_trunk_dir, tmp_path, elsewhere):
    """A repository whose task ``gamma`` (versions 1 and 2) lives on another filesystem, through a symlink."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_trunk_dir, repo / "trunk")
    make_bundle(tiny_trunk, repo / "tasks" / "alpha" / "1", name="alpha", seed=1)
    for v in (1, 2):
        make_bundle(tiny_trunk, elsewhere / "gamma" / str(v), name="gamma", version=v, seed=v)
    (repo / "tasks" / "gamma").symlink_to(elsewhere / "gamma", target_is_directory=True)
    return repo


def _wait_until_gone(folder: Path, prefix: str) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [p.name for p in folder.iterdir() if p.name.startswith(prefix)]
        if not left:
            return left
        time.sleep(0.02)
    return left


def test_unregistering_one_version_of_a_task_on_another_filesystem(tiny_trunk, linked_repo, elsewhere):
    reg = TaskRegistry(linked_repo, tiny_trunk)
    reg.sync()
    assert reg.get("gamma").version == 2
    assert reg.unregister("gamma@2") == ("gamma", 2)  # was OSError EXDEV: the tombstone crossed filesystems
    assert reg.get("gamma").version == 1, "the older version is served in its place"
    assert sorted(p.name for p in (elsewhere / "gamma").iterdir() if not p.name.startswith(".")) == ["1"]
    assert _wait_until_gone(elsewhere / "gamma", ".deleted-") == [], "the tombstone was never deleted"
    assert _wait_until_gone(linked_repo / "tasks", ".deleted-") == []
    assert (linked_repo / "tasks" / "gamma").is_symlink(), "the link itself stays: the task still has a version"


def test_registering_a_version_into_a_task_on_another_filesystem(tiny_trunk, linked_repo, elsewhere):
    reg = TaskRegistry(linked_repo, tiny_trunk)
    reg.sync()
    up = reg.new_upload_dir()
    source = elsewhere / "gamma" / "1"
    shutil.copy(source / "adapter.safetensors", up)
    (up / "task.json").write_text((source / "task.json").read_text())
    tv = reg.register_upload(up)  # was OSError EXDEV: the staged upload sat on the repository's filesystem
    assert (tv.name, tv.version) == ("gamma", 3)
    assert json.loads((elsewhere / "gamma" / "3" / "task.json").read_text())["version"] == 3
    assert not up.exists(), "the staged upload was left behind"
    assert [p.name for p in (elsewhere / "gamma").iterdir() if p.name.startswith(".")] == []
    assert TaskRegistry(linked_repo, tiny_trunk).scan()["gamma"][0] == 3


def test_the_sweeper_removes_leftovers_inside_a_linked_task_folder(tiny_trunk, linked_repo, elsewhere):
    """A delete or an upload cut short by an exit leaves its entry in the linked folder, where the sweep looks."""
    (elsewhere / "gamma" / ".deleted-gamma-2-0badc0de").mkdir()
    (elsewhere / "gamma" / ".upload-0badc0de").mkdir()
    TaskRegistry(linked_repo, tiny_trunk).cleanup_temp(idle_s=-1)
    assert sorted(p.name for p in (elsewhere / "gamma").iterdir()) == ["1", "2"]
