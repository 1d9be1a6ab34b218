"""ST-Adapter model library: one frozen open_clip ViT trunk, many small video task adapters.

Pure torch + PyAV: no server code, no global state. See docs/concepts.md for usage.

The public names are imported lazily (PEP 562): ``python -m stadapter.trunk``
then runs ``stadapter/trunk/__main__.py`` without the package having imported anything first,
which would make runpy warn on every CLI call.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "VideoClassifier": "api",
    "load_classifier": "api",
    "AdapterStack": "bank",
    "TaskAdapters": "bank",
    "expected_shapes": "bank",
    "BundleError": "bundle",
    "BundleLimits": "bundle",
    "TaskBundle": "bundle",
    "load_bundle": "bundle",
    "read_bundle": "bundle",
    "save_bundle": "bundle",
    "AdapterConfig": "config",
    "ConfigError": "config",
    "SamplingConfig": "config",
    "TaskSpec": "config",
    "TrunkSpec": "config",
    "init_trunk": "factory",
    "load_trunk": "factory",
    "TrunkError": "trunk",
    "VideoTrunk": "trunk",
    "trunk_fingerprint": "trunk",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .api import VideoClassifier, load_classifier
    from .bank import AdapterStack, TaskAdapters, expected_shapes
    from .bundle import BundleError, BundleLimits, TaskBundle, load_bundle, read_bundle, save_bundle
    from .config import AdapterConfig, ConfigError, SamplingConfig, TaskSpec, TrunkSpec
    from .factory import init_trunk, load_trunk
    from .trunk import TrunkError, VideoTrunk, trunk_fingerprint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stadapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
