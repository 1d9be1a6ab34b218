"""Large buffers straight from the kernel: glibc's malloc set to serve allocations of a megabyte or more with mmap.

Every clip passes through buffers the server does not choose: gRPC's receive path copies a message's
slices into one Python ``bytes`` object, a stream's chunks fill a growing ``bytearray``, the model's
tensors come and go. glibc serves a large allocation with its own mmap (given back to the kernel
when freed) only above a threshold that it raises to the size of each such block freed (up to 32 MiB
on 64-bit), so after the first megabyte-sized clip the next ones are carved from the heap, between
small long-lived objects, and the holes they leave are not returned: the server's RSS crept with
every refused megabyte-sized input and did not plateau (``python -m bench.refused_rss``). A fixed
threshold turns that raise off. An operator's ``MALLOC_MMAP_THRESHOLD_`` wins (glibc reads it at start).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("server")

MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def use_mmap_for_large_buffers(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold to ``threshold`` bytes for this process; False where it was not set (not
    glibc, or the environment already sets it)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if ok:
        log.info("malloc: blocks of %d bytes or more are mmapped (given back to the kernel when freed)", threshold)
    return ok
