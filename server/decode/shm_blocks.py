"""Frames between processes as shared-memory blocks, never pickled: the decoder writes, the server reads and unlinks.

The reader picks each block's name, so it can unlink the block on every path (a writer
killed half-way included).
"""

from __future__ import annotations

import contextlib
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING

import numpy as np

from stadapter.video import as_tensor

if TYPE_CHECKING:
    from torch import Tensor


def write_block(name: str, arr: np.ndarray) -> None:
    """A new block ``name`` holding ``arr``; MemoryError when /dev/shm is full (the server is short, not the clip)."""
    try:
        shm = SharedMemory(name=name, create=True, size=max(arr.nbytes, 1))
    except OSError as e:
        raise MemoryError(f"no room for the frames in shared memory: {e}") from e
    np.ndarray(arr.shape, arr.dtype, buffer=shm.buf)[...] = arr
    shm.close()


def read_block(name: str, shape: tuple[int, ...], dtype: str) -> Tensor:
    """A copy of block ``name``'s array, as a tensor (in the server process: the workers only write); the block is
    unlinked after, on every path."""
    try:
        shm = SharedMemory(name=name)
        try:
            out = np.empty(shape, np.dtype(dtype))
            out[...] = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
        finally:
            shm.close()
    finally:
        unlink_block(name)
    return as_tensor(out)


def unlink_block(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shm = SharedMemory(name=name)
        shm.close()
        shm.unlink()
