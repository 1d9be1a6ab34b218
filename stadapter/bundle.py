"""Task bundles: ``adapter.safetensors`` + ``task.json`` in one folder per task version.

Reading never unpickles anything. Every check that can fail raises
:class:`BundleError` with a message naming what is wrong (file, key, shape,
value), so a server can hand it to the client as it is.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

from safetensors import SafetensorError
from safetensors.torch import load
from torch import Tensor

from stadapter_api.wire import ADAPTER_FILE, TASK_FILE

from .bank import AdapterStack, TaskAdapters, expected_shapes
from .config import ConfigError, TaskSpec, brief
from .fsutil import atomic_dir, read_regular_file
from .weights import BUNDLE_DTYPES, WeightsError, check_finite, check_tensors, write_safetensors


class BundleError(ValueError):
    """A task bundle is malformed or does not fit the trunk."""


@dataclass(frozen=True)
class BundleLimits:
    max_tensor_bytes: int = 1 << 30  # adapter.safetensors
    max_json_bytes: int = 4 << 20  # task.json


@dataclass(frozen=True)
class TaskBundle:
    spec: TaskSpec
    tensors: Mapping[str, Tensor]
    path: Optional[Path] = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def stack(self, num_blocks: int) -> AdapterStack:
        """This task's weights as a K=1 stack for :class:`~stadapter.trunk.VideoTrunk`."""
        return AdapterStack.from_state_dict(self.spec.adapter, self.tensors, num_blocks)


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def save_bundle(
    out_dir: str | os.PathLike,
    spec: TaskSpec,
    weights: TaskAdapters | Mapping[str, Tensor],
    replace: bool = False,
) -> Path:
    """Write a bundle atomically (temp folder, fsync, rename). Returns the folder."""
    state = weights.state_dict() if isinstance(weights, TaskAdapters) else dict(weights)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if "fc.weight" in state and state["fc.weight"].shape[0] != spec.num_classes:
        raise BundleError(f"head has {state['fc.weight'].shape[0]} rows but task {spec.name!r} has {spec.num_classes} labels")
    if not spec.created:
        spec = spec.replace(created=now_iso())
    with atomic_dir(out_dir, replace=replace) as tmp:
        write_safetensors(state, tmp / ADAPTER_FILE, metadata={"format": "stadapter-task-v1", "task": spec.name})
        (tmp / TASK_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return Path(out_dir)


def read_spec(bundle_dir: str | os.PathLike, limits: BundleLimits = BundleLimits()) -> TaskSpec:
    return read_spec_and_stat(bundle_dir, limits)[0]


def read_spec_and_stat(bundle_dir: str | os.PathLike, limits: BundleLimits = BundleLimits(),
                       parsed: Optional[dict[tuple[str, str], Any]] = None) -> tuple[TaskSpec, os.stat_result]:
    """:func:`read_spec`, with the ``fstat`` of the file it read (what a cache of specs stamps its entry with).
    ``parsed``: configs parsed before (:meth:`TaskSpec.from_dict`)."""
    path = os.path.join(os.fspath(bundle_dir), TASK_FILE)
    try:  # a registry's scan reads thousands
        data, st = _read_file(path, limits.max_json_bytes)
    except (FileNotFoundError, NotADirectoryError):
        raise _missing(path) from None
    try:
        return TaskSpec.from_dict(json.loads(data.decode("utf-8")), parsed), st
    except ConfigError as e:
        raise BundleError(f"{path}: {e}") from e
    except RecursionError as e:  # arrays or objects nested thousands deep
        raise BundleError(f"{path} nests JSON too deeply to read") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer of thousands of digits
        raise BundleError(f"{path} is not valid JSON: {brief(str(e), 200)}") from e


def _read_file(path: str, limit: int) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file ``path`` and its ``fstat`` (:func:`~stadapter.fsutil.read_regular_file`);
    FileNotFoundError when it is absent or not a regular file, :class:`BundleError` when it holds more than ``limit``
    bytes (by its ``fstat``, or by the bytes read: it may grow)."""
    data, st = read_regular_file(path, limit)
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(path)
    if data is None:
        raise BundleError(f"{path} is {st.st_size} bytes, above the limit of {limit}")
    if len(data) > limit:
        raise BundleError(f"{path} is over {limit} bytes, the limit")
    return data, st


def _missing(path: str) -> BundleError:
    return BundleError(f"{path} is missing (a bundle folder holds {TASK_FILE} and {ADAPTER_FILE})")


def read_bundle(bundle_dir: str | os.PathLike, limits: BundleLimits = BundleLimits(),
                spec: Optional[TaskSpec] = None) -> TaskBundle:
    """Read and check a bundle on its own (files, JSON, dtypes, finite values, head size). ``spec``: its
    ``task.json`` as the caller already read it (None: read now)."""
    bundle_dir = Path(bundle_dir)
    spec = read_spec(bundle_dir, limits) if spec is None else spec
    path = bundle_dir / ADAPTER_FILE
    try:  # read whole into this process's memory: a file mapped instead could be changed or cut under it (SIGBUS)
        data, _ = _read_file(str(path), limits.max_tensor_bytes)
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f"{path} is missing") from None
    except OSError as e:  # permissions, an I/O error: the bundle cannot serve, and the message says why
        raise BundleError(f"{path} cannot be read: {e}") from e
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise BundleError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        check_tensors(tensors, dtypes=BUNDLE_DTYPES, finite=False)
        check_finite(data, tensors)
    except WeightsError as e:
        raise BundleError(f"{path}: {e}") from e
    head = tensors.get("fc.weight")
    if head is None:
        raise BundleError(f"{path}: the classification head 'fc.weight' is missing")
    if head.shape[0] != spec.num_classes:
        raise BundleError(f"{path}: head has {head.shape[0]} classes but task.json lists {spec.num_classes} labels")
    return TaskBundle(spec, tensors, bundle_dir)


def check_fits_trunk(bundle: TaskBundle, trunk) -> None:
    """Refuse a bundle trained on another trunk or shaped for another one.

    ``trunk`` is a :class:`~stadapter.trunk.VideoTrunk` (or anything with
    ``fingerprint``, ``dim``, ``num_blocks``, ``image_size``).
    """
    shapes = check_spec_fits_trunk(bundle.spec, trunk, bundle.path or bundle.spec.name)
    try:
        check_tensors(bundle.tensors, shapes, finite=False, what="the adapter config")
    except WeightsError as e:
        raise BundleError(f"{bundle.path or bundle.spec.name}: {e}") from e


def check_spec_fits_trunk(spec: TaskSpec, trunk, where: object = None) -> dict[str, tuple[int, ...]]:
    """The part of :func:`check_fits_trunk` that needs ``task.json`` alone (the trunk's fingerprint, input size,
    an adapter config it can hold); returns the tensor shapes the weights must have."""
    where = where or spec.name
    if spec.trunk_fingerprint != trunk.fingerprint:
        raise BundleError(
            f"{where}: trained on trunk {spec.trunk_fingerprint[:12]}…, but the served trunk is {trunk.fingerprint[:12]}…"
        )
    if spec.sampling.input_size != trunk.image_size:
        raise BundleError(f"{where}: input_size {spec.sampling.input_size} differs from the trunk's {trunk.image_size}")
    try:
        return expected_shapes(spec.adapter, trunk.dim, trunk.num_blocks, spec.num_classes)
    except ConfigError as e:
        raise BundleError(f"{where}: {e}") from e


def load_bundle(bundle_dir: str | os.PathLike, trunk, limits: BundleLimits = BundleLimits(),
                spec: Optional[TaskSpec] = None) -> TaskBundle:
    """:func:`read_bundle` + :func:`check_fits_trunk`."""
    bundle = read_bundle(bundle_dir, limits, spec)
    check_fits_trunk(bundle, trunk)
    return bundle
