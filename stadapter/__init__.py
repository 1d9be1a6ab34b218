"""ST-Adapter model library: one frozen open_clip ViT trunk, many small video task adapters.

Pure torch + PyAV: no server code, no global state. See README.md for usage.
"""

from .api import VideoClassifier, load_classifier
from .bank import AdapterStack, TaskAdapters, expected_shapes
from .bundle import BundleError, BundleLimits, TaskBundle, load_bundle, read_bundle, save_bundle
from .config import AdapterConfig, ConfigError, SamplingConfig, TaskSpec, TrunkSpec
from .factory import init_trunk, load_trunk
from .trunk import TrunkError, VideoTrunk, trunk_fingerprint

__all__ = [
    "AdapterConfig",
    "AdapterStack",
    "BundleError",
    "BundleLimits",
    "ConfigError",
    "SamplingConfig",
    "TaskAdapters",
    "TaskBundle",
    "TaskSpec",
    "TrunkError",
    "TrunkSpec",
    "VideoClassifier",
    "VideoTrunk",
    "expected_shapes",
    "init_trunk",
    "load_bundle",
    "load_classifier",
    "load_trunk",
    "read_bundle",
    "save_bundle",
    "trunk_fingerprint",
]
