"""A stored version's two reads: its metadata (the scan: ``task.json``, digest, sizes; no weights) and its weights
(first use: the bundle reader and validator that a register runs, :func:`stadapter.bundle.load_bundle`)."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Optional

import torch

from server.errors import BrokenTask
from server.registry.folders import DIGEST_FILE, read_digest_file, recorded_digest, stored_digest
from server.registry.scan_index import INDEX_FILE, Metadata, ScanIndex, Stamp, file_stamp, stat_stamp
from server.registry.version import TaskVersion, WeightsSource
from stadapter.bank import AdapterStack
from stadapter.bundle import (
    ADAPTER_FILE,
    BundleError,
    BundleLimits,
    TaskBundle,
    check_spec_fits_trunk,
    load_bundle,
    read_spec_and_stat,
)
from stadapter.trunk import VideoTrunk

MAX_HEADER_BYTES = 100 << 20  # safetensors' own cap on a header
PARSED_CONFIGS_KEPT = 1024  # distinct adapter and sampling configs a reader keeps parsed


class VersionReader:
    """Reads stored versions from their metadata alone (the scan), through a :class:`ScanIndex` (a file read once is
    stat'ed, not read, while unchanged) and with the trunk check done once per distinct adapter shape."""

    def __init__(self, repository: Path, trunk: VideoTrunk, limits: BundleLimits, source: WeightsSource):
        self.trunk, self.limits, self.source = trunk, limits, source
        self.index = ScanIndex(repository / INDEX_FILE)
        self._fits: set[tuple] = set()  # what check_spec_fits_trunk passed: (fingerprint, input size, adapter, classes)
        self._parsed: dict[tuple[str, str], object] = {}  # adapter and sampling configs read (TaskSpec.from_dict)

    def version_at(self, path: Path) -> TaskVersion:
        """The version stored in ``path`` from its metadata alone: ``task.json``, checked against the trunk as far
        as it goes without the weights (a bad one or another trunk's raises :class:`BundleError`, as a full read
        would), the recorded digest, the tensor bytes from the weights file's header. The weights stay on disk
        until ``source`` loads them."""
        meta = self.index.metadata(path, self.read_metadata)
        spec = meta.spec
        fit = (spec.trunk_fingerprint, spec.sampling.input_size, spec.adapter, spec.num_classes)
        if fit not in self._fits:
            check_spec_fits_trunk(spec, self.trunk, path)
            self._fits.add(fit)
        return TaskVersion(spec, None, path, meta.nbytes, meta.digest or "", source=self.source)

    def recorded_digest(self, path: Path) -> Optional[str]:
        """The digest recorded in ``path`` (as :func:`~server.registry.folders.recorded_digest`), from the index
        while the folder's files are unchanged."""
        try:
            return self.index.recorded_digest(path, self.read_metadata)
        except (BundleError, OSError, ValueError):
            return recorded_digest(path)

    def read_weights(self, tv: TaskVersion, dtype: Optional[torch.dtype] = None) -> AdapterStack:
        """``tv``'s weights, read and checked as a register checks them (files, dtypes, NaN/Inf, the trunk's
        fingerprint and shapes) and as the task its metadata said, kept in ``dtype`` (None: as stored); a bad
        bundle is :class:`BrokenTask`. ``task.json`` comes from the index while its stamp holds (the scan read it)."""
        try:
            spec = self.index.metadata(tv.path, self.read_metadata).spec
            if spec.name != tv.name or spec.version != tv.version:
                raise BundleError(f"{tv.path}: task.json now says {spec.name!r} version {spec.version}")
            bundle = load_bundle(tv.path, self.trunk, self.limits, spec)
            stack = owned_stack(bundle, self.trunk.num_blocks, dtype)
            if not tv.digest:  # a folder stored without a recorded digest: its files' digest, now that they are read
                tv.digest = stored_digest(tv.path)
        except (BundleError, OSError, ValueError) as e:
            raise BrokenTask(f"task {tv.name} version {tv.version} cannot be served: its bundle on disk does not load "
                             f"({e}); register the task again") from e
        return stack

    def read_metadata(self, path: Path) -> tuple[Metadata, Optional[Stamp]]:
        """``path``'s metadata, and its files' stamps from the ``fstat`` of each file as it was read (a file that
        could not be opened is stat'ed; None when that fails too, and the entry is not kept)."""
        if len(self._parsed) > PARSED_CONFIGS_KEPT:
            self._parsed.clear()
        spec, spec_st = read_spec_and_stat(path, self.limits, self._parsed)
        base = os.fspath(path)
        adapter, digest_file = os.path.join(base, ADAPTER_FILE), os.path.join(base, DIGEST_FILE)
        nbytes, adapter_st = tensor_bytes_and_stat(adapter)
        digest, digest_st = read_digest_file(digest_file)
        try:
            stamps: Optional[Stamp] = (stat_stamp(spec_st),
                                       stat_stamp(adapter_st) if adapter_st else file_stamp(adapter),
                                       stat_stamp(digest_st) if digest_st else file_stamp(digest_file))
        except OSError:
            stamps = None
        return Metadata(spec, nbytes, digest), stamps


def tensor_bytes_and_stat(path: str | os.PathLike) -> tuple[int, Optional[os.stat_result]]:
    """The bytes of the tensors a safetensors file holds, and the ``fstat`` of the file read (None: it could not be
    opened). The bytes are those after its header, which the format requires its tensors to cover without a gap
    (safetensors refuses a file whose offsets leave one), so the header's JSON need not be parsed; a scan asks this
    of thousands of versions. The file's size when even the header's length cannot be read (the load that follows
    reports what is wrong with the file; ``O_NONBLOCK``: a FIFO in its place neither blocks the scan nor is read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        try:
            return os.stat(path).st_size, None
        except OSError:
            return 0, None
    try:
        st = os.fstat(fd)
        try:
            head = os.pread(fd, 8, 0) if stat.S_ISREG(st.st_mode) else b""
        except OSError:
            head = b""
    finally:
        os.close(fd)
    if len(head) < 8:
        return st.st_size, st
    (n,) = struct.unpack("<Q", head)
    return (st.st_size - 8 - n if n <= MAX_HEADER_BYTES and 8 + n <= st.st_size else st.st_size), st


def loaded_version(path: Path, trunk: VideoTrunk, limits: BundleLimits, source: WeightsSource,
                   dtype: Optional[torch.dtype] = None) -> TaskVersion:
    """The version stored in ``path`` with its weights read now (in ``dtype``: the host tier's)."""
    bundle = load_bundle(path, trunk, limits)
    stack = owned_stack(bundle, trunk.num_blocks, dtype)
    return TaskVersion(bundle.spec, stack, path, bundle.nbytes, stored_digest(path), source=source)


def owned_stack(bundle: TaskBundle, num_blocks: int, dtype: Optional[torch.dtype] = None) -> AdapterStack:
    """The bundle's stack in memory of its own, its floating-point tensors in ``dtype`` (None: as stored;
    ``--host-dtype``). The bundle's tensors are views of the bytes :func:`~stadapter.bundle.read_bundle` read (not of
    the file's pages: a file overwritten in place under a running server must not take it down), which Python holds
    read-only; the copy is writable and makes the host tier's bytes the memory it holds."""
    def own(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype, copy=True) if dtype is not None and t.is_floating_point() else t.clone()

    stack = bundle.stack(num_blocks)
    return AdapterStack({k: w.map(own) for k, w in stack.slots.items()}, own(stack.head_w), own(stack.head_b),
                        stack.num_classes, stack.activation)
