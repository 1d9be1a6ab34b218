"""Frozen configuration records shared by every room.

Each record validates itself in ``__post_init__`` and round-trips through plain
JSON dicts (``to_dict`` / ``from_dict``); unknown keys are refused by name so a
typo in ``task.json`` cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, TypeVar

Activation = Literal["none", "gelu", "quickgelu", "relu"]
SamplingMode = Literal["uniform", "stride"]
SeekMode = Literal["exact", "keyframe"]
SEEK_MODES = ("exact", "keyframe")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
TASK_NAME_RULE = "1-64 chars of a-z 0-9 _ . - starting with a letter or digit"

T = TypeVar("T")

QUOTE_LIMIT = 64  # characters of client-supplied text an error message repeats


def brief(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters: errors quote client text without echoing all of it
    (a 20,000-character name must not turn the real error into a metadata-size failure)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _fields(config: Any) -> dict[str, Any]:
    """A flat config's fields by name, as ``dataclasses.asdict`` gives them without its deep copy (its fields are
    scalars and tuples, which the caller turns into lists): a registry's scan writes thousands of specs."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


class ConfigError(ValueError):
    """A configuration value is out of range or a key is unknown."""


def check_task_name(name: object) -> str:
    """``name`` if it is a task name (:data:`TASK_NAME_RULE`), else :class:`ConfigError` saying the rule.

    The one check of a task name, wherever one comes in (``task.json`` at register, a request's task, a
    repository call's model name): a name is a single folder below ``tasks/``, so one that passes can
    never be ``..``, hold a ``/`` or a NUL, or be too long for a file name.
    """
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):  # fullmatch: "$" would allow a final \n
        raise ConfigError(f"task name {brief(name)} is invalid: use {TASK_NAME_RULE}")
    return name


def _from_dict(cls: type[T], data: Mapping[str, Any], tuple_fields: tuple[str, ...] = ()) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {brief(unknown)}; known: {sorted(names)}")
    kwargs = {k: (tuple(v) if k in tuple_fields and isinstance(v, list) else v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # wrong types deep inside, e.g. a string for a tuple
        raise ConfigError(f"{cls.__name__}: {e}") from e


@dataclass(frozen=True)
class AdapterConfig:
    """Where and how big the ST-Adapters are (one config per task).

    Args:
        width: bottleneck width r of each adapter (384 for ViT-B in the paper).
        kernel: depthwise conv kernel (time, height, width); odd sizes, 'same' padding.
            A temporal size of 1 removes temporal reasoning (the paper's ablation).
        pre_attn: adapter before multi-head self-attention in each adapted block.
        pre_mlp: adapter before the MLP in each adapted block.
        layers: adapt the last ``layers`` blocks; 0 means every block.
        activation: optional nonlinearity after the conv (the public code has none).
    """

    width: int = 384
    kernel: tuple[int, int, int] = (3, 1, 1)
    pre_attn: bool = True
    pre_mlp: bool = False
    layers: int = 0
    activation: Activation = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or self.width < 1:
            raise ConfigError(f"AdapterConfig.width must be a positive int, got {brief(self.width)}")
        k = tuple(self.kernel)
        if len(k) != 3 or not all(isinstance(v, int) and v >= 1 and v % 2 == 1 for v in k):
            raise ConfigError(f"AdapterConfig.kernel must be three odd positive ints, got {brief(self.kernel)}")
        object.__setattr__(self, "kernel", k)
        if not (self.pre_attn or self.pre_mlp):
            raise ConfigError("AdapterConfig: at least one of pre_attn / pre_mlp must be true")
        if not isinstance(self.layers, int) or self.layers < 0:
            raise ConfigError(f"AdapterConfig.layers must be an int >= 0, got {brief(self.layers)}")
        if self.activation not in ("none", "gelu", "quickgelu", "relu"):
            raise ConfigError(f"AdapterConfig.activation must be none|gelu|quickgelu|relu, got {brief(self.activation)}")

    def positions(self) -> tuple[str, ...]:
        """Adapter slots used in each adapted block, in forward order."""
        return tuple(p for p, on in (("pre_attn", self.pre_attn), ("pre_mlp", self.pre_mlp)) if on)

    def adapted_blocks(self, num_blocks: int) -> tuple[int, ...]:
        """Indices of the trunk blocks that carry adapters (the last ``layers``)."""
        n = num_blocks if self.layers == 0 else self.layers
        if n > num_blocks:
            raise ConfigError(f"AdapterConfig.layers={self.layers} but the trunk has only {num_blocks} blocks")
        return tuple(range(num_blocks - n, num_blocks))

    def to_dict(self) -> dict[str, Any]:
        d = _fields(self)
        d["kernel"] = list(self.kernel)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdapterConfig":
        return _from_dict(cls, data, ("kernel",))


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are taken from a clip and turned into model input.

    Args:
        num_frames: frames per view (T).
        mode: ``uniform`` = one frame from each of T equal segments (SSv2 style);
            ``stride`` = T frames ``stride`` apart around the clip centre (K400 style).
        stride: frame step for ``stride`` mode.
        temporal_views: views along time at evaluation (spread over the clip).
        spatial_views: 1 = centre crop, 3 = start/centre/end crops along the long side.
        input_size: square side of the model input (pixels).
        resize: short side before the crop; 0 means ``input_size``.
        mean / std: per-channel normalisation of [0, 1] RGB.
        autorotate: decode frames as a viewer sees them: the display matrix (rotation by
            multiples of 90 degrees, flips) and the sample aspect ratio applied before the
            resize and crop, as players and ffmpeg do. False: the coded picture as stored.
        seek: ``exact`` (default): the frames the sampling names, each decoded from its
            keyframe. ``keyframe``: the fast mode; each sampled index moves to the cheapest
            frame to decode inside its segment (a keyframe if the segment holds one, else
            the segment's first frame) and only those are read. Keyframes are found from the
            demuxer's packet flags, without decoding; see ``stadapter.video.sampling.keyframe_indices``
            for what a segment is. Faster where samples sit far from keyframes, at the cost of
            frames that are up to a segment away from the exact ones.
    """

    num_frames: int = 8
    mode: SamplingMode = "uniform"
    stride: int = 16
    temporal_views: int = 1
    spatial_views: int = 1
    input_size: int = 224
    resize: int = 0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    autorotate: bool = True
    seek: SeekMode = "exact"

    def __post_init__(self) -> None:
        if not isinstance(self.autorotate, bool):
            raise ConfigError(f"SamplingConfig.autorotate must be true or false, got {brief(self.autorotate)}")
        if not isinstance(self.seek, str) or self.seek not in SEEK_MODES:
            raise ConfigError(f"SamplingConfig.seek must be one of {', '.join(map(repr, SEEK_MODES))}, "
                              f"got {brief(self.seek)}")
        for name in ("num_frames", "stride", "temporal_views", "input_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"SamplingConfig.{name} must be a positive int, got {brief(v)}")
        if self.num_frames > 512:
            raise ConfigError(f"SamplingConfig.num_frames={brief(self.num_frames)} is above the limit of 512")
        if self.mode not in ("uniform", "stride"):
            raise ConfigError(f"SamplingConfig.mode must be 'uniform' or 'stride', got {brief(self.mode)}")
        if self.spatial_views not in (1, 3):
            raise ConfigError(f"SamplingConfig.spatial_views must be 1 or 3, got {brief(self.spatial_views)}")
        if not isinstance(self.resize, int) or (self.resize != 0 and self.resize < self.input_size):
            raise ConfigError(
                f"SamplingConfig.resize must be 0 or >= input_size ({self.input_size}), got {brief(self.resize)}"
            )
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3:
                raise ConfigError(f"SamplingConfig.{name} needs 3 values, got {brief(v)}")
            object.__setattr__(self, name, v)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"SamplingConfig.std must be positive, got {brief(self.std)}")

    @property
    def short_side(self) -> int:
        return self.resize or self.input_size

    @property
    def num_views(self) -> int:
        return self.temporal_views * self.spatial_views

    def replace(self, **changes: Any) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = _fields(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingConfig":
        return _from_dict(cls, data, ("mean", "std"))


@dataclass(frozen=True)
class TrunkSpec:
    """What ``model_repository/trunk/trunk.json`` says about the frozen image trunk.

    Args:
        model: open_clip model name (``ViT-B-16``) or the stem of ``model_config``.
        pretrained: a named open_clip tag (``openai``), a weights file relative to
            the trunk folder, or empty for random weights (tests only).
        quick_gelu: the activation the weights were trained with. OpenAI CLIP
            weights need True; it is resolved once at ``init`` and recorded here.
        fingerprint: sha256 over the trunk's architecture and tensors.
        model_config: optional open_clip model-config JSON file (relative path)
            describing a custom ViT.
        source: where the stored weights came from (a named tag such as ``openai``, copied
            into the folder at ``init`` so the trunk loads offline); informational.
    """

    model: str
    pretrained: str = ""
    quick_gelu: bool = False
    fingerprint: str = ""
    model_config: str = ""
    format_version: int = 1
    source: str = ""

    def __post_init__(self) -> None:
        if not self.model or not isinstance(self.model, str):
            raise ConfigError(f"TrunkSpec.model must be a non-empty string, got {brief(self.model)}")
        if self.format_version != 1:
            raise ConfigError(f"TrunkSpec.format_version {brief(self.format_version)} is not supported (expected 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrunkSpec":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TaskSpec:
    """Everything ``task.json`` records about one version of one task."""

    name: str
    labels: tuple[str, ...]
    adapter: AdapterConfig
    sampling: SamplingConfig
    trunk_fingerprint: str
    version: int = 1
    description: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = 1

    def __post_init__(self) -> None:
        check_task_name(self.name)
        labels = tuple(self.labels)
        if not labels:
            raise ConfigError(f"task {self.name!r}: labels are empty")
        bad = [label for label in labels if not isinstance(label, str) or not label.strip() or len(label) > 256]
        if bad:
            raise ConfigError(f"task {self.name!r}: labels must be non-empty strings of <= 256 chars, got {brief(bad)}")
        dupes = sorted({label for label in labels if labels.count(label) > 1})
        if dupes:
            raise ConfigError(f"task {self.name!r}: duplicate labels {brief(dupes)}")
        object.__setattr__(self, "labels", labels)
        if not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"task {self.name!r}: version must be an int >= 1, got {brief(self.version)}")
        if not isinstance(self.trunk_fingerprint, str) or not re.fullmatch(r"[0-9a-f]{64}", self.trunk_fingerprint):
            raise ConfigError(f"task {self.name!r}: trunk_fingerprint must be 64 hex chars, got {brief(self.trunk_fingerprint)}")
        if self.format_version != 1:
            raise ConfigError(f"task {self.name!r}: format_version {brief(self.format_version)} is not supported (expected 1)")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def replace(self, **changes: Any) -> "TaskSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "labels": list(self.labels),
            "adapter": self.adapter.to_dict(),
            "sampling": self.sampling.to_dict(),
            "trunk_fingerprint": self.trunk_fingerprint,
            "metrics": dict(self.metrics),
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], parsed: Optional[dict[tuple[str, str], Any]] = None) -> "TaskSpec":
        """``parsed``: adapter and sampling configs already parsed, by their JSON values' ``repr`` (which tells
        ``1`` from ``1.0`` and ``true``), filled as they are parsed; a caller that reads thousands of ``task.json``
        files holding the same few configs (a registry's scan) passes one and parses each of those once."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"task.json must hold a JSON object, got {type(data).__name__}")
        d = dict(data)
        try:
            d["adapter"] = _sub_config(AdapterConfig, d["adapter"], parsed)
            d["sampling"] = _sub_config(SamplingConfig, d["sampling"], parsed)
        except KeyError as e:
            raise ConfigError(f"task.json is missing the key {e.args[0]!r}") from None
        for key in ("name", "labels", "trunk_fingerprint"):
            if key not in d:
                raise ConfigError(f"task.json is missing the key {key!r}")
        return _from_dict(cls, d, ("labels",))


def _sub_config(cls: Any, value: Any, parsed: Optional[dict[tuple[str, str], Any]]) -> Any:
    """``cls.from_dict(value)``, or the config ``parsed`` holds for an equal JSON value."""
    if parsed is None:
        return cls.from_dict(value)
    key = (cls.__name__, repr(value))
    config = parsed.get(key)
    if config is None:
        config = parsed[key] = cls.from_dict(value)
    return config
