"""What replicas share per task name beside the task folders: the lock that serialises changes of a task, and the
high-water mark of the version numbers given to it. Both stay bounded however many names come and go.

Locks, ``tasks/.locks/NN.lock``: one of :data:`LOCK_SHARDS` files, picked by a hash of the task name. A file per
name piled up one file for every name ever registered, and the only way to bound that is to delete lock files;
but a lock file cannot be deleted safely: a replica that opened it just before the unlink locks the old inode
while the next one creates and locks a new file under the same name, and both "hold" the lock. A fixed set of
files is never deleted, so mutual exclusion holds by construction; two names in one shard merely wait for each
other's register (which takes milliseconds, and is rare). The file's name comes from a hash, never from client
text. Lock files of the per-name scheme (``.locks/<task>``, from older servers) are left alone, for the same
reason: an older replica of a rolling update may still lock them.

High-water marks, ``tasks/.versions/<task>``: the highest version ever given to the task, kept after it is
unregistered, so registering the name again never reuses a number (a replica that still serves the old weights
under that number would otherwise keep them). They must outlive the task folder, which is why they pile up. The
:meth:`TaskMarks.sweep` keeps the marks of every name that has a task folder and of the newest
:data:`RETIRED_MARKS_KEPT` names that have none; the older ones are folded into one floor,
``tasks/.versions/.floor``: the highest mark folded. A name without a mark of its own starts above the floor,
so no number is reused, at the cost of a new name starting above 1 once that many names have come and gone.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import ContextManager, Optional

from server.registry.folders import HIGH_WATER_DIR, LOCKS_DIR, task_path
from stadapter.config import ConfigError, check_task_name
from stadapter.fsutil import atomic_write_text, exclusive_lock, try_exclusive_lock

LOCK_SHARDS = 64  # tasks/.locks/NN.lock files; a task's is picked by a hash of its name
RETIRED_MARKS_KEPT = 256  # high-water marks kept for names with no task folder; older ones go into the floor
FLOOR_FILE = ".floor"  # tasks/.versions/.floor: the highest mark folded (not a task name: it starts with ".")
SWEEP_LOCK = "sweep.lock"  # in tasks/.locks: one replica folds marks at a time (the floor is read-modify-write)


class TaskMarks:
    """The locks and high-water marks of the task names in ``tasks_dir`` (names already checked)."""

    def __init__(self, tasks_dir: Path):
        self.tasks_dir = tasks_dir
        self.locks_dir = tasks_dir / LOCKS_DIR
        self.marks_dir = tasks_dir / HIGH_WATER_DIR

    def lock_path(self, name: str) -> Path:
        return self.locks_dir / f"{zlib.crc32(name.encode()) % LOCK_SHARDS:02d}.lock"

    def lock(self, name: str) -> ContextManager[None]:
        """One writer of task ``name`` at a time among all replicas on this repository (a retry that reached
        another replica mid-publish then finds the version its upload id published, not a free number)."""
        self.locks_dir.mkdir(exist_ok=True)
        return exclusive_lock(self.lock_path(name))

    def high_water(self, name: str) -> int:
        """The highest version ever given to ``name``: its own mark, else the floor (0 when neither exists)."""
        own = _read_mark(task_path(self.marks_dir, name))
        return own if own is not None else _read_mark(self.marks_dir / FLOOR_FILE) or 0

    def raise_high_water(self, name: str, version: int) -> None:
        """Record ``version`` as given for ``name`` (atomically; never lowered), so unregistering and
        registering again, on this replica or another, or after a restart, never reuses a number."""
        path = task_path(self.marks_dir, name)
        self.marks_dir.mkdir(exist_ok=True)
        if (_read_mark(path) or 0) < version:
            atomic_write_text(path, f"{version}\n")

    def sweep(self, keep: int = RETIRED_MARKS_KEPT) -> int:
        """Fold the marks of names that have no task folder, all but the newest ``keep``, into the floor; returns
        how many were folded.

        Each name is folded holding its lock (tried, not waited for: a name being changed is left for the next
        sweep), so no register or unregister of it runs meanwhile and "no task folder" stays true until its mark
        is gone. The floor is raised (atomically) before the mark is unlinked: a reader sees the mark or a floor
        at least as high, never neither. Sweeps on several replicas take turns on :data:`SWEEP_LOCK`: two folding
        at once could each write the floor they read and lower it.
        """
        retired = self._retired_marks()
        if len(retired) <= keep:
            return 0
        folded = 0
        self.locks_dir.mkdir(exist_ok=True)
        with try_exclusive_lock(self.locks_dir / SWEEP_LOCK) as sweeping:
            if not sweeping:
                return 0
            for path in _oldest_first(retired)[:len(retired) - keep]:
                with try_exclusive_lock(self.lock_path(path.name)) as held:
                    if not held or os.path.lexists(self.tasks_dir / path.name):
                        continue  # being changed, or registered again: not retired after all
                    mark = _read_mark(path)
                    floor = _read_mark(self.marks_dir / FLOOR_FILE) or 0
                    if mark is not None and mark > floor:
                        atomic_write_text(self.marks_dir / FLOOR_FILE, f"{mark}\n")
                    path.unlink(missing_ok=True)
                    folded += 1
        return folded

    def _retired_marks(self) -> list[Path]:
        """Marks of names that have no task folder (files that are not task names, such as the floor, skipped)."""
        try:
            entries = list(self.marks_dir.iterdir())
        except OSError:
            return []
        return [p for p in entries if _is_task_name(p.name) and not os.path.lexists(self.tasks_dir / p.name)]


def _is_task_name(name: str) -> bool:
    try:
        check_task_name(name)
    except ConfigError:
        return False
    return True


def _oldest_first(paths: list[Path]) -> list[Path]:
    def age(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return float("inf")  # vanished: last, and skipped when reached

    return sorted(paths, key=age)


def _read_mark(path: Path) -> Optional[int]:
    """The number in a mark file; None when it is missing or unreadable (a torn or foreign file gives no number)."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None
