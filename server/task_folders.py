"""The repository's task folders on disk: version folders, content digests, tombstones, leftovers.

What every replica reads and writes in ``<repo>/tasks`` (the registry decides what to serve;
this module only names and moves folders).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from stadapter.bundle import ADAPTER_FILE, TASK_FILE

UPLOAD_FILES = (TASK_FILE, ADAPTER_FILE)


def version_dirs(task_dir: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    try:
        entries = list(task_dir.iterdir())
    except OSError:
        return out
    for p in entries:
        if p.name.isdigit() and not p.name.startswith(".") and p.is_dir() and int(p.name) >= 1:
            out[int(p.name)] = p
    return out


DIGEST_FILE = "content.sha256"  # beside a stored bundle's files: written at register, read by every replica
UPLOAD_ID_FILE = "upload.id"  # beside a stored bundle's files: the client's upload id, for idempotent retries
HIGH_WATER_DIR = ".versions"  # tasks/.versions/<task>: the highest version ever given, kept past unregister
LOCKS_DIR = ".locks"  # tasks/.locks/<task>: the file every replica locks to change that task


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
    try:
        return (folder / DIGEST_FILE).read_text().strip()
    except OSError:
        return None


SWEEP_INTERVAL_S = 60.0  # how often sync() looks for leftovers
LEFTOVER_IDLE_S = 600.0  # an upload or deletion folder untouched this long is a leftover


def last_write(folder: Path) -> float:
    """The newest mtime of a folder and the files in it (now, when it vanished or cannot be read)."""
    try:
        times = [folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.iterdir()]
    except OSError:
        return time.time()  # vanished or unreadable mid-scan: leave it for the next sweep
    return max(times)


def remove_in_background(path: Path) -> None:
    """Delete a folder tree off the caller's thread (a large bundle takes a while to unlink). A delete cut
    short by an exit leaves a ``.deleted-*`` folder, which the sweeper removes later."""
    threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, name="rmtree",
                     daemon=True).start()


def tombstone_dir(tasks_dir: Path, path: Path, label: str) -> Optional[Path]:
    """Rename ``path`` to ``tasks/.deleted-<label>-*`` (ignored by scans); None if it is already gone."""
    dest = tasks_dir / f".deleted-{label}-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    return dest
