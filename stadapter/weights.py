"""Reading weight files that may be hostile, and checking the tensors they hold: one place for each.

Trunk weights (:mod:`stadapter.factory`), public checkpoints (:mod:`stadapter.convert`)
and task bundles (:mod:`stadapter.bundle`) all come from outside. They are read
only as safetensors or with ``torch.load(weights_only=True)``, which never
unpickles arbitrary objects, and their tensors are checked by one routine (with a
vectorised form of its NaN/Inf check for a whole file, :func:`check_finite`). Each
caller wraps :class:`WeightsError` into its own error type with its own context.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from .config import brief

# What a bundle may store; a checkpoint may also hold float64, which convert narrows.
BUNDLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*BUNDLE_DTYPES, torch.float64)


class WeightsError(ValueError):
    """A weights file or its tensors are unusable; the message says what is wrong (callers add where)."""


def load_error_reason(e: BaseException) -> str:
    """Short reason why ``torch.load`` / safetensors refused a file (without torch's advice to unpickle anyway)."""
    text = " ".join(str(e).split())
    if "WeightsUnpickler error:" in text:  # the one useful line, e.g. "Unsupported global: GLOBAL builtins.open ..."
        text = "refused to unpickle: " + text.split("WeightsUnpickler error:")[1].split(" Please use")[0].strip()
        text = text.split(" Check the documentation of torch.load")[0]
    else:
        text = text.split(" This file can still be loaded")[0].split(" In PyTorch 2.6")[0]
    return f"{type(e).__name__}: {text[:300]}"


def read_weights(path: str | os.PathLike) -> object:
    """A ``.safetensors`` file (name -> tensor) or a torch checkpoint loaded with ``weights_only=True``.

    Raises :class:`WeightsError` with :func:`load_error_reason` for anything the loaders refuse.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - untrusted bytes: the loaders raise many kinds (pickle, zip, EOF, ...)
        raise WeightsError(load_error_reason(e)) from e


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` alone must set one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then restore at once
    os.umask(mask)
    return mask


def write_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """``safetensors.torch.save_file``, then the mode any new file of this process gets (0666 less the umask).

    safetensors creates its files 0600 whatever the umask, so a trunk or bundle made by one user could not be
    read by the container user that serves it.
    """
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    os.chmod(path, 0o666 & ~current_umask())


def check_tensors(
    tensors: Mapping[str, Tensor],
    shapes: Optional[Mapping[str, tuple[int, ...]]] = None,
    dtypes: Optional[Collection[torch.dtype]] = None,
    finite: bool = True,
    what: str = "the expected layout",
) -> None:
    """Refuse tensors whose names or shapes differ from ``shapes``, whose dtype is not in ``dtypes``, or (with
    ``finite``) that hold NaN or Inf. ``None`` skips that check; ``what`` names the layout in the message."""
    if shapes is not None:
        missing = sorted(set(shapes) - set(tensors))
        unexpected = sorted(set(tensors) - set(shapes))
        if missing or unexpected:
            raise WeightsError(f"tensors do not match {what}: missing {brief(missing)}, unexpected {brief(unexpected)}")
        wrong = [(k, tuple(tensors[k].shape), s) for k, s in shapes.items() if tuple(tensors[k].shape) != tuple(s)]
        if wrong:
            k, got, want = wrong[0]
            raise WeightsError(f"tensor {k!r} has shape {got}, expected {want} ({len(wrong)} mismatched)")
    for name, t in tensors.items():
        if dtypes is not None and t.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise WeightsError(f"tensor {brief(name)} has dtype {t.dtype}; allowed: {allowed}")
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"tensor {brief(name)} holds NaN or Inf values")


# Per floating dtype, how the bytes of its values are read to find NaN and Inf: as numpy's float of the same width
# (np.isfinite), or, for bfloat16 (numpy has none), as unsigned integers whose exponent bits are all set in NaN and
# Inf alone. safetensors stores little-endian.
_FINITE_VIEW: dict[torch.dtype, tuple[np.dtype, Optional[int]]] = {
    torch.float32: (np.dtype("<f4"), None), torch.float16: (np.dtype("<f2"), None),
    torch.bfloat16: (np.dtype("<u2"), 0x7F80)}
_FINITE_CHUNK = 1 << 18  # values per pass: its temporaries stay small (a large bundle's would be fresh pages)


def check_finite(data: bytes, tensors: Mapping[str, Tensor]) -> None:
    """Refuse NaN or Inf in ``tensors``, the tensors of the safetensors file whose bytes are ``data``. Where they
    share one floating dtype (a bundle as training writes it) the file's data section, which holds exactly their
    bytes, is checked in a few vectorised passes; otherwise each tensor is (:func:`check_tensors`)."""
    dtypes = {t.dtype for t in tensors.values()}
    view = _FINITE_VIEW.get(dtypes.pop()) if len(dtypes) == 1 else None
    if view is None:
        check_tensors(tensors)
        return
    as_type, exponent = view
    start = 8 + int.from_bytes(data[:8], "little")  # the header's length, the header, then the data section
    values = np.frombuffer(data, dtype=as_type, offset=start) if start < len(data) else np.empty(0, as_type)
    for i in range(0, len(values), _FINITE_CHUNK):
        part = values[i:i + _FINITE_CHUNK]
        if not (np.isfinite(part).all() if exponent is None else ((part & exponent) != exponent).all()):
            check_tensors(tensors)  # raises, naming the tensor
            raise WeightsError("a tensor holds NaN or Inf values")  # not reached: the section is the tensors' bytes
