"""Atomic writes (build a file or folder under a temp name beside the target, fsync, rename, fsync the parent),
the lock that serialises writers of one shared folder across processes, and the one reader of small files that
others may have put anything in place of (:func:`read_regular_file`)."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional


def fsync_tree(path: Path) -> None:
    """fsync every file in ``path`` and the folder itself."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it becomes ``target`` in one rename.

    Readers never see a half-written folder. With ``replace=False`` an existing
    target is an error (``FileExistsError``); with ``replace=True`` the old folder
    is moved aside and deleted after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file open for writing; on success it becomes ``target`` in one rename.

    The data are fsynced before the rename and the parent folder after it, so after
    a crash ``target`` holds either the old bytes or all the new ones. On an error
    the temp file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_file`)."""
    with atomic_file(target) as f:
        f.write(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically (see :func:`atomic_file`)."""
    atomic_write_bytes(target, text.encode("utf-8"))


@contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (made if missing) for the ``with`` block.

    For writers in several processes, or on several hosts, that share a folder: ``flock`` (on
    NFS, Linux turns it into a byte-range lock that the server arbitrates). It is released when
    the block ends or the process dies, so a crashed holder never leaves the folder locked.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextmanager
def try_exclusive_lock(path: str | os.PathLike) -> Iterator[bool]:
    """:func:`exclusive_lock` without waiting: yields True while held, False (at once) when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def read_regular_file(path: str | os.PathLike, limit: Optional[int] = None) -> tuple[Optional[bytes], os.stat_result]:
    """One open of ``path`` (``O_NONBLOCK``: a FIFO or a device in its place neither blocks the reader nor is read),
    its ``fstat``, and the bytes of a regular file: one read sized by the ``fstat``, then, if it grew since, on to
    ``limit + 1`` bytes (None: to its end), so a caller can tell a file over ``limit``. None in place of the bytes
    for anything but a regular file, or one over ``limit`` by its ``fstat`` (not read). OSError when it cannot be
    opened or read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (limit is not None and st.st_size > limit):
            return None, st
        data = _read_upto(fd, st.st_size + 1, st.st_size + 1)  # a read of the limit would allocate that much
        if len(data) > st.st_size:  # grown since the fstat
            data += _read_upto(fd, None if limit is None else limit + 1 - len(data), 1 << 20)
        return data, st
    finally:
        os.close(fd)


def _read_upto(fd: int, n: Optional[int], step: int) -> bytes:
    """Up to ``n`` bytes from ``fd`` (None: all to its end), at most ``step`` per read, fewer only at its end (what
    one read returns is not copied again)."""
    chunks: list[bytes] = []
    got = 0
    while n is None or got < n:
        chunk = os.read(fd, step if n is None else min(step, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
