"""A stored version's two reads: its metadata (the scan: ``task.json``, digest, sizes; no weights) and its weights
(first use: the bundle reader and validator that a register runs, :func:`stadapter.bundle.load_bundle`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from server.errors import BrokenTask
from server.registry.folders import recorded_digest, stored_digest
from server.registry.version import TaskVersion, WeightsSource
from stadapter.bank import AdapterStack
from stadapter.bundle import (
    ADAPTER_FILE,
    BundleError,
    BundleLimits,
    TaskBundle,
    check_spec_fits_trunk,
    load_bundle,
    read_spec,
)
from stadapter.trunk import VideoTrunk

MAX_HEADER_BYTES = 100 << 20  # safetensors' own cap on a header


def version_at(path: Path, trunk: VideoTrunk, limits: BundleLimits, source: WeightsSource) -> TaskVersion:
    """The version stored in ``path`` from its metadata alone: ``task.json``, checked against the trunk as far as
    it goes without the weights (a bad one or another trunk's raises :class:`BundleError`, as a full read would),
    the recorded digest, the tensor bytes from the weights file's header. The weights stay on disk until
    ``source`` loads them."""
    spec = read_spec(path, limits)
    check_spec_fits_trunk(spec, trunk, path)
    return TaskVersion(spec, None, path, tensor_bytes(path / ADAPTER_FILE), recorded_digest(path) or "", source=source)


def tensor_bytes(path: Path) -> int:
    """The bytes of the tensors a safetensors file holds, from its header (the file's size when the header
    cannot be read: the load that follows reports what is wrong with it)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        return sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0])
                   for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        try:
            return path.stat().st_size
        except OSError:
            return 0


def read_weights(tv: TaskVersion, trunk: VideoTrunk, limits: BundleLimits) -> AdapterStack:
    """``tv``'s weights, read and checked as a register checks them (files, dtypes, NaN/Inf, the trunk's
    fingerprint and shapes) and as the task its metadata said; a bad bundle is :class:`BrokenTask`."""
    try:
        bundle = load_bundle(tv.path, trunk, limits)
        if bundle.spec.name != tv.name or bundle.spec.version != tv.version:
            raise BundleError(f"{tv.path}: task.json now says {bundle.spec.name!r} version {bundle.spec.version}")
        stack = owned_stack(bundle, trunk.num_blocks)
        if not tv.digest:  # a folder stored without a recorded digest: its files' digest, now that they are read
            tv.digest = stored_digest(tv.path)
    except (BundleError, OSError, ValueError) as e:
        raise BrokenTask(f"task {tv.name} version {tv.version} cannot be served: its bundle on disk does not load "
                         f"({e}); register the task again") from e
    return stack


def owned_stack(bundle: TaskBundle, num_blocks: int) -> AdapterStack:
    """The bundle's stack in this process's own memory. safetensors maps the weights file, so its tensors are the
    file's pages: a file overwritten in place under a running server (a copy over it, a disk repair) then killed
    the process with SIGBUS on its next use. A copy also makes the host tier's bytes the memory it holds."""
    stack = bundle.stack(num_blocks)
    return AdapterStack({k: w.map(lambda t: t.clone()) for k, w in stack.slots.items()}, stack.head_w.clone(),
                        stack.head_b.clone(), stack.num_classes, stack.activation)
