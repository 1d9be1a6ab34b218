"""The repository's task folders on disk: version folders, content digests, tombstones, leftovers.

What every replica reads and writes in ``<repo>/tasks`` (the registry decides what to serve;
this module only names and moves folders).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from server.errors import BadRequest
from stadapter.bundle import ADAPTER_FILE, TASK_FILE
from stadapter.config import TASK_NAME_RULE, ConfigError, brief, check_task_name
from stadapter.fsutil import fsync_tree, read_regular_file

UPLOAD_FILES = (TASK_FILE, ADAPTER_FILE)
UPLOAD_PREFIX, TOMBSTONE_PREFIX = ".upload-", ".deleted-"  # an upload being written; a folder being deleted
LEFTOVER_PREFIXES = (UPLOAD_PREFIX, TOMBSTONE_PREFIX)  # what the sweeper removes once idle (cut short by an exit)


def version_dirs(task_dir: Path) -> dict[int, Path]:
    """The version folders of a task folder by number."""
    return {v: task_dir / name for v, name in _version_entries(task_dir)}


def _version_entries(task_dir: "str | os.PathLike[str]") -> Iterator[tuple[int, str]]:
    """(number, folder name) of each version folder in a task folder: one listing (an entry's type comes with it,
    and only a symlink is stat'ed to see where it points); none when the folder cannot be listed."""
    try:
        with os.scandir(task_dir) as it:
            for e in it:
                if e.name.isdigit() and int(e.name) >= 1 and _is_dir(e):
                    yield int(e.name), e.name
    except OSError:
        return


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


DIGEST_FILE = "content.sha256"  # beside a stored bundle's files: written at register, read by every replica
UPLOAD_ID_FILE = "upload.id"  # beside a stored bundle's files: the client's upload id, for idempotent retries
HIGH_WATER_DIR = ".versions"  # tasks/.versions/<task>: the highest version ever given (server.registry.marks)
LOCKS_DIR = ".locks"  # tasks/.locks/NN.lock: the files replicas lock to change a task (server.registry.marks)


def task_path(folder: Path, name: str) -> Path:
    """``folder/name`` for a task name, refused unless it is one plain entry of ``folder``.

    A belt under :func:`stadapter.config.check_task_name`, which every name passes first: whatever that rule
    becomes, no name reaches a path outside ``folder``. Lexical, not resolved: a task folder that is a symlink
    (to another disk) is still served.
    """
    if not name or name in (".", "..") or "\0" in name or Path(name).name != name or os.sep in name:
        raise BadRequest(f"task name {brief(name)} is not one folder name: use {TASK_NAME_RULE}")
    return folder / name


def bundle_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for fname in UPLOAD_FILES:
        h.update(fname.encode() + b"\0")
        with open(folder / fname, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def stored_digest(folder: Path) -> str:
    """The digest recorded at register (computed from the files for folders stored without one)."""
    return recorded_digest(folder) or bundle_digest(folder)


def recorded_digest(folder: Path) -> str | None:
    """The digest recorded at register, or None for a folder stored without one."""
    return read_digest_file(os.path.join(os.fspath(folder), DIGEST_FILE))[0]


def read_digest_file(path: str) -> tuple[str | None, os.stat_result | None]:
    """The digest a folder's digest file ``path`` records (None when it cannot be read, or is not a file: a FIFO in
    its place neither blocks a scan nor is read), with the ``fstat`` of the file read (None: it could not be opened
    or read; a scan stamps what it read with it)."""
    try:
        data, st = read_regular_file(path)
    except OSError:
        return None, None
    return (data.decode().strip() if data is not None else None), st


SWEEP_INTERVAL_S = 60.0  # how often sync() looks for leftovers
LEFTOVER_IDLE_S = 600.0  # an upload or deletion folder untouched this long is a leftover


def last_write(folder: Path) -> float:
    """The newest mtime of a folder and the files in it (now, when it vanished or cannot be read). A symlink's
    own times (its ctime is when it was renamed to a tombstone): what it points at is not the repository's."""
    try:
        if folder.is_symlink():
            st = folder.lstat()
            return max(st.st_mtime, st.st_ctime)
        times = [folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.iterdir()]
    except OSError:
        return time.time()  # vanished or unreadable mid-scan: leave it for the next sweep
    return max(times)


def remove_tree(path: Path) -> None:
    """Delete a tombstone or a leftover: a folder tree; a symlink or a file, by unlinking it.

    A task folder may be a symlink to a folder elsewhere: unregistering it renames the link, and only the
    link goes; the folder it points at is the operator's and is never entered (``shutil.rmtree`` refuses a
    link, and with ``ignore_errors`` it silently left every such ``.deleted-*`` link behind)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        with contextlib.suppress(OSError):  # as rmtree's ignore_errors: a sweep that cannot delete tries again later
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_in_background(path: Path) -> None:
    """Delete a tombstone off the caller's thread (a large bundle takes a while to unlink). A delete cut
    short by an exit leaves a ``.deleted-*`` entry, which the sweeper removes later."""
    threading.Thread(target=remove_tree, args=(path,), name="rmtree", daemon=True).start()


def tombstone_dir(tasks_dir: Path, path: Path, label: str) -> Optional[Path]:
    """Rename ``path`` to ``tasks/.deleted-<label>-*`` (ignored by scans); None if it is already gone.

    A version folder of a task linked to another filesystem cannot be renamed into ``tasks/``: its tombstone
    is made beside it, in the task's folder (where :func:`leftovers` finds it if its delete is cut short)."""
    name = f"{TOMBSTONE_PREFIX}{label}-{uuid.uuid4().hex[:8]}"
    try:
        return _renamed(path, tasks_dir / name)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    return _renamed(path, path.parent / name)


def _renamed(path: Path, dest: Path) -> Optional[Path]:
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    return dest


def upload_path(folder: Path) -> Path:
    """A fresh name for an upload being written in ``folder`` (ignored by scans, swept if left)."""
    return folder / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}"


def move_into_place(staged: Path, dest: Path) -> None:
    """Rename the folder ``staged`` to ``dest``, which must not exist yet (the rename fails if another replica
    just took it). Across filesystems (a task folder linked to another volume) the folder is copied beside
    ``dest`` first (``.upload-*``), synced and renamed from there, so ``dest`` still appears whole or not at all."""
    try:
        os.rename(staged, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    near = upload_path(dest.parent)
    try:
        shutil.copytree(staged, near, symlinks=True)
        fsync_tree(near)
        os.rename(near, dest)
    except BaseException:
        remove_tree(near)
        raise
    remove_tree(staged)


def leftovers(tasks_dir: Path) -> list[Path]:
    """``.upload-*`` and ``.deleted-*`` entries in ``tasks_dir`` and in its task folders that are symlinks (another
    filesystem's leftovers are made there: :func:`tombstone_dir`, :func:`move_into_place`). One listing of
    ``tasks_dir``: only the symlinked task folders are looked into (a repository may hold thousands of tasks)."""
    out: list[Path] = []
    try:
        with os.scandir(tasks_dir) as it:
            entries = list(it)
        out += [tasks_dir / e.name for e in entries if e.name.startswith(LEFTOVER_PREFIXES)]
        for e in entries:
            if not e.name.startswith(".") and e.is_symlink() and _is_dir(e):
                out += [p for p in (tasks_dir / e.name).iterdir() if p.name.startswith(LEFTOVER_PREFIXES)]
    except OSError:
        pass  # vanished or unreadable mid-sweep: the next sweep tries again
    return out


def latest_versions(tasks_dir: Path) -> dict[str, tuple[int, Path]]:
    """The latest version folder of each task folder in ``tasks_dir``."""
    out: dict[str, tuple[int, Path]] = {}
    try:
        with os.scandir(tasks_dir) as it:
            task_dirs = [e.name for e in it if not e.name.startswith(".") and _is_dir(e)]
    except OSError:
        return out
    base = os.fspath(tasks_dir)
    for name in task_dirs:
        v, folder = _latest(os.path.join(base, name))
        if v:
            out[name] = (v, tasks_dir.joinpath(name, folder))  # one path made per task: a poll lists thousands
    return out


def _latest(task_dir: str) -> tuple[int, str]:
    """The highest version number among a task folder's version folders and that folder's name ((0, ""): none)."""
    return max(_version_entries(task_dir), default=(0, ""))


def task_ref(task: str) -> tuple[str, Optional[int]]:
    """``name`` -> (name, None); ``name@N`` -> (name, N). Anything else is BadRequest (INVALID_ARGUMENT) with
    the rule it broke, the client's text quoted short."""
    name, pinned, number = task.partition("@")
    try:
        check_task_name(name)
    except ConfigError as e:
        raise BadRequest(str(e)) from None
    if not pinned:
        return name, None
    if not number.isdigit() or not 0 < int(number) < 1 << 31:
        raise BadRequest(f"bad task version in {brief(task)}: a pin is name@N with N a version number")
    return name, int(number)
