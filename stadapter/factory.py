"""Trunk folders: create them from open_clip models, and load them back.

A trunk folder holds ``trunk.json`` (a :class:`TrunkSpec`), optionally
``model_config.json`` (an open_clip model config for a custom ViT) and, unless
the weights come from a named open_clip tag, ``visual.safetensors``.

QuickGELU: OpenAI's CLIP weights were trained with QuickGELU, and open_clip
builds plain GELU unless told otherwise, which silently degrades the model.
``init`` resolves the activation once (from the model config or the tag's
pretrained config; a local weights file must say it explicitly) and records it
in ``trunk.json``; loading always uses the recorded value, and the value is part
of the fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .config import ConfigError, TrunkSpec
from .fsutil import atomic_dir
from .trunk import TrunkError, VideoTrunk, trunk_fingerprint
from .weights import WeightsError, read_weights, write_safetensors

TRUNK_JSON = "trunk.json"
VISUAL_WEIGHTS = "visual.safetensors"
MODEL_CONFIG = "model_config.json"
# Small ViTs that ship with the library (tests, the embedded demo trunk).
LIBRARY_CONFIGS = Path(__file__).parent / "model_configs"


def read_model_config(model: str, config_file: Optional[Path] = None) -> dict[str, Any]:
    """open_clip model config: from a JSON file, else the library's configs, else open_clip's registry."""
    if config_file is not None:
        try:
            cfg = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrunkError(f"cannot read model config {config_file}: {e}") from e
        cfg = cfg.get("model_cfg", cfg)
    elif (LIBRARY_CONFIGS / f"{model}.json").is_file():
        cfg = json.loads((LIBRARY_CONFIGS / f"{model}.json").read_text())
    else:
        import open_clip

        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise TrunkError(f"unknown open_clip model {model!r}; pass a model config JSON for a custom ViT")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict):
        raise TrunkError(f"model config for {model!r} has no 'vision_cfg' object")
    if "timm_model_name" in cfg["vision_cfg"] or isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)):
        raise TrunkError(f"model {model!r} is not an open_clip ViT (timm or ResNet towers are not supported)")
    return cfg


def arch_record(model_cfg: Mapping[str, Any], quick_gelu: bool) -> dict[str, Any]:
    return {"vision_cfg": dict(model_cfg["vision_cfg"]), "embed_dim": model_cfg.get("embed_dim"), "quick_gelu": bool(quick_gelu)}


def build_visual(model_cfg: Mapping[str, Any], quick_gelu: bool) -> nn.Module:
    """Build only the vision tower (randomly initialised) from an open_clip model config."""
    # open_clip's own vision-tower builder; it exists since open_clip 2.x.
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(model_cfg.get("embed_dim", 512), dict(model_cfg["vision_cfg"]), quick_gelu=quick_gelu)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors from a safetensors file or a torch checkpoint (``weights_only``: never unpickles objects)."""
    path = Path(path)
    try:
        obj = read_weights(path)
    except WeightsError as e:
        raise TrunkError(
            f"{path} is not a readable weights file (safetensors, or a torch state dict loaded with "
            f"weights_only=True; OpenAI's TorchScript .pt files are not read: use --pretrained openai): {e}"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TrunkError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}
    if any(k.startswith("visual.") for k in state):  # a whole CLIP checkpoint: keep the image tower
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


def load_visual_state(visual: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    own = visual.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise TrunkError(
            f"{source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad[:5]]}"
        )
    visual.load_state_dict(state, strict=True)


def resolve_quick_gelu(model: str, pretrained: str, model_cfg: Mapping[str, Any], is_file: bool) -> Optional[bool]:
    """What the weights need, or None when a local file does not tell."""
    if model_cfg.get("quick_gelu"):
        return True
    if pretrained and not is_file:
        import open_clip

        return bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
    return None


def _check_tag(model: str, tag: str) -> None:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag not in tags:
        raise TrunkError(f"{tag!r} is neither a file nor a pretrained tag of {model!r} (tags: {tags})")


def write_trunk(
    out_dir: str | os.PathLike,
    visual: nn.Module,
    model: str,
    model_cfg: Mapping[str, Any],
    quick_gelu: bool,
    custom_config: bool,
    pretrained_tag: str = "",
    replace: bool = False,
) -> TrunkSpec:
    """Write a trunk folder atomically, weights included (also those of a named tag: a server then starts offline)."""
    state = {k: v.detach().cpu().contiguous() for k, v in visual.state_dict().items()}
    spec = TrunkSpec(
        model=model,
        pretrained=VISUAL_WEIGHTS,
        quick_gelu=bool(quick_gelu),
        fingerprint=trunk_fingerprint(state, arch_record(model_cfg, quick_gelu)),
        model_config=MODEL_CONFIG if custom_config else "",
        source=pretrained_tag,
    )
    with atomic_dir(out_dir, replace=replace) as tmp:
        write_safetensors(state, tmp / VISUAL_WEIGHTS)
        if custom_config:
            (tmp / MODEL_CONFIG).write_text(json.dumps(dict(model_cfg), indent=2) + "\n")
        (tmp / TRUNK_JSON).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return spec


def init_trunk(
    model: str,
    pretrained: str,
    out_dir: str | os.PathLike,
    model_config: Optional[str | os.PathLike] = None,
    quick_gelu: Optional[bool] = None,
    seed: int = 0,
    replace: bool = False,
) -> TrunkSpec:
    """Create a trunk folder.

    Args:
        model: open_clip model name, or a name for the custom ``model_config``.
        pretrained: a named open_clip tag (weights via open_clip's download cache),
            a local weights file (copied into the folder as safetensors), or
            ``random`` (seeded random weights; for tests and for pre-training).
        quick_gelu: None = derive it; a local file with no QuickGELU hint needs it explicitly.
    """
    model_cfg = read_model_config(model, Path(model_config) if model_config else None)
    is_file = pretrained not in ("", "random") and Path(pretrained).is_file()
    derived = resolve_quick_gelu(model, pretrained if pretrained != "random" else "", model_cfg, is_file)
    if derived is not None and quick_gelu is not None and derived != quick_gelu:
        raise TrunkError(f"{model} with {pretrained!r} was trained with quick_gelu={derived}; refusing quick_gelu={quick_gelu}")
    if derived is None and quick_gelu is None:
        if is_file:
            raise TrunkError(
                f"{pretrained}: a weights file does not say which activation it was trained with; "
                "pass --quick-gelu yes for OpenAI CLIP weights, --quick-gelu no otherwise"
            )
        derived = False
    qg = derived if derived is not None else bool(quick_gelu)
    custom = model_config is not None
    if pretrained in ("", "random"):
        torch.manual_seed(seed)
        visual = build_visual(model_cfg, qg)
        return write_trunk(out_dir, visual, model, model_cfg, qg, custom, replace=replace)
    if is_file:
        visual = build_visual(model_cfg, qg)
        load_visual_state(visual, read_state_dict(Path(pretrained)), pretrained)
        return write_trunk(out_dir, visual, model, model_cfg, qg, custom, replace=replace)
    if custom:
        raise TrunkError("a custom model config takes a weights file or 'random', not a named tag")
    _check_tag(model, pretrained)
    import open_clip

    visual = open_clip.create_model(model, pretrained=pretrained, force_quick_gelu=qg).visual
    return write_trunk(out_dir, visual, model, model_cfg, qg, False, pretrained_tag=pretrained, replace=replace)


def read_trunk_spec(trunk_dir: str | os.PathLike) -> TrunkSpec:
    path = Path(trunk_dir) / TRUNK_JSON
    try:
        return TrunkSpec.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, ConfigError) as e:
        raise TrunkError(f"cannot read trunk spec {path}: {e}") from e


def load_trunk(
    trunk_dir: str | os.PathLike,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    verify: bool = True,
) -> VideoTrunk:
    """Load a trunk folder, check its fingerprint, move it to ``device`` / ``dtype``."""
    trunk_dir = Path(trunk_dir)
    spec = read_trunk_spec(trunk_dir)
    model_cfg = read_model_config(spec.model, trunk_dir / spec.model_config if spec.model_config else None)
    weights = trunk_dir / spec.pretrained if spec.pretrained else None
    if weights is not None and weights.is_file():
        visual = build_visual(model_cfg, spec.quick_gelu)
        load_visual_state(visual, read_state_dict(weights), str(weights))
    elif spec.pretrained:
        _check_tag(spec.model, spec.pretrained)
        import open_clip

        visual = open_clip.create_model(spec.model, pretrained=spec.pretrained, force_quick_gelu=spec.quick_gelu).visual
    else:
        raise TrunkError(f"{trunk_dir / TRUNK_JSON}: 'pretrained' is empty; name a tag or a weights file")
    arch = arch_record(model_cfg, spec.quick_gelu)
    fp = trunk_fingerprint(visual.state_dict(), arch)
    if verify and spec.fingerprint and fp != spec.fingerprint:
        raise TrunkError(f"trunk {trunk_dir}: weights fingerprint {fp[:12]}… differs from trunk.json's {spec.fingerprint[:12]}…")
    trunk = VideoTrunk(visual, arch, fp, spec=spec)
    return trunk.to(device=device, dtype=dtype)


def trunk_cli(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stadapter.trunk", description="Create a trunk folder.")
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="write trunk.json (+ weights) for an open_clip ViT")
    init.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-16")
    init.add_argument("--pretrained", required=True, help="named tag (openai), a weights file, or 'random'")
    init.add_argument("--model-config", help="open_clip model-config JSON for a custom ViT")
    init.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto")
    init.add_argument("--seed", type=int, default=0, help="seed for --pretrained random")
    init.add_argument("--out", required=True)
    init.add_argument("--force", action="store_true", help="replace an existing folder")
    show = sub.add_parser("show", help="print trunk.json and verify the fingerprint")
    show.add_argument("dir")
    args = p.parse_args(argv)
    try:
        if args.cmd == "init":
            qg = {"auto": None, "yes": True, "no": False}[args.quick_gelu]
            spec = init_trunk(args.model, args.pretrained, args.out, args.model_config, qg, args.seed, args.force)
            print(json.dumps(spec.to_dict(), indent=2))
        else:
            trunk = load_trunk(args.dir)
            assert trunk.spec is not None  # load_trunk records the folder's spec
            print(json.dumps({**trunk.spec.to_dict(), "parameters": trunk.num_parameters, "verified": True}, indent=2))
    except (TrunkError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

