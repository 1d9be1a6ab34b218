"""Import checkpoints of the public ST-Adapter code (github.com/linziyi96/st-adapter).

That code saves ``{"model": state_dict, "optimizer": ..., "next_epoch": ...}`` where
the state dict holds only the trainable tensors::

    transformer.resblocks.{i}.adapter_pre_{attn,mlp}.{fc1,conv,fc2}.{weight,bias}
    fc.{weight,bias}

(``module.``-prefixed when saved from a DDP wrapper). These are exactly the keys
of our ``adapter.safetensors``, so conversion is: read the tensors without
unpickling objects, infer the :class:`AdapterConfig` from their names and
shapes, check them against the trunk and the labels, and write a bundle.

The conversion steps are small free functions (no file I/O except in
:func:`read_checkpoint`, :func:`read_labels` and :func:`convert_checkpoint`);
``python -m stadapter.convert`` is a thin CLI over them.

The public model runs OpenAI CLIP weights with QuickGELU; a trunk built with
plain GELU gives other features, so the CLI warns when the trunk is not QuickGELU.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import labels as labels_file
from .bank import expected_shapes
from .bundle import BundleError, save_bundle
from .config import Activation, AdapterConfig, ConfigError, SamplingConfig, TaskSpec
from .factory import load_trunk
from .trunk import TrunkError
from .weights import FLOAT_DTYPES, WeightsError, check_tensors, read_weights

ADAPTER_KEY_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.adapter_(pre_attn|pre_mlp)\.(fc1|conv|fc2)\.(weight|bias)$")
HEAD_KEYS = ("fc.weight", "fc.bias")
SLOT_TENSORS = ("fc1.weight", "fc1.bias", "conv.weight", "conv.bias", "fc2.weight", "fc2.bias")


class ConvertError(ValueError):
    """A checkpoint or labels file cannot be converted; the message names what is wrong."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model tensors of a public checkpoint (``.pth`` via ``weights_only`` load, or ``.safetensors``).

    Takes ``obj["model"]`` when present (other top-level entries such as the
    optimizer state are ignored), else the object itself; strips ``module.``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"checkpoint {path} does not exist or is not a file")
    try:
        obj = read_weights(path)
    except WeightsError as e:
        raise ConvertError(
            f"{path} is not a readable PyTorch checkpoint (loaded with weights_only=True, no arbitrary objects): {e}"
        ) from e
    return extract_model_state(obj, str(path))


def extract_model_state(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """``obj["model"]`` (or ``obj``) as a flat name -> tensor dict without DDP's ``module.`` prefix."""
    if isinstance(obj, Mapping) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{source}: expected a state dict (or {{'model': state_dict}}), got {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise ConvertError(f"{source}: the model state holds non-tensor entries {not_tensors[:5]}")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    if len(state) != len(obj):
        raise ConvertError(f"{source}: keys collide once the 'module.' prefix is removed")
    return state


def infer_adapter_config(
    state: Mapping[str, Tensor], num_blocks: int, activation: Activation = "none"
) -> tuple[AdapterConfig, int]:
    """(AdapterConfig, num_classes) from a public checkpoint's tensor names and shapes.

    width = rows of ``fc1.weight``; kernel = trailing dims of ``conv.weight``;
    placement = which of ``adapter_pre_attn`` / ``adapter_pre_mlp`` occur; layers =
    how many blocks carry adapters, which must be the last ones of a trunk with
    ``num_blocks`` blocks (the public code adapts ``i >= layers - adapter_layers``).
    """
    slots: dict[tuple[int, str], set[str]] = {}
    unexpected = []
    for key in state:
        m = ADAPTER_KEY_RE.match(key)
        if m:
            slots.setdefault((int(m.group(1)), m.group(2)), set()).add(f"{m.group(3)}.{m.group(4)}")
        elif key not in HEAD_KEYS:
            unexpected.append(key)
    if unexpected:
        raise ConvertError(
            f"unexpected tensors {sorted(unexpected)[:5]} ({len(unexpected)} in all): a public ST-Adapter checkpoint "
            "holds only transformer.resblocks.{i}.adapter_pre_{attn,mlp}.* and fc.{weight,bias}"
        )
    missing_head = [k for k in HEAD_KEYS if k not in state]
    if missing_head:
        raise ConvertError(f"the classification head {missing_head} is missing from the checkpoint")
    if not slots:
        raise ConvertError("the checkpoint holds no adapter tensors (transformer.resblocks.{i}.adapter_pre_*)")
    for (i, pos), names in sorted(slots.items()):
        lacking = [n for n in SLOT_TENSORS if n not in names]
        if lacking:
            raise ConvertError(f"adapter transformer.resblocks.{i}.adapter_{pos} lacks {lacking}")

    blocks = sorted({i for i, _ in slots})
    positions = {pos for _, pos in slots}
    uneven = [i for i in blocks if {pos for j, pos in slots if j == i} != positions]
    if uneven:
        raise ConvertError(
            f"blocks {uneven} do not carry the same adapters ({sorted(positions)}) as the others; "
            "the public code places the same adapters in every adapted block"
        )
    n = len(blocks)
    if blocks[-1] >= num_blocks:
        raise ConvertError(f"adapters sit in blocks {blocks}, but this trunk has only {num_blocks} blocks (0..{num_blocks - 1})")
    want = list(range(num_blocks - n, num_blocks))
    if blocks != want:
        raise ConvertError(
            f"adapters sit in blocks {blocks}, but must sit in the last {n} contiguous blocks {want} "
            f"of this {num_blocks}-block trunk"
        )

    p0 = f"transformer.resblocks.{blocks[0]}.adapter_{sorted(positions)[0]}"
    conv_w = state[f"{p0}.conv.weight"]
    if conv_w.dim() != 5 or conv_w.shape[1] != 1:
        raise ConvertError(f"{p0}.conv.weight has shape {tuple(conv_w.shape)}; expected a depthwise [r, 1, kt, kh, kw]")
    width = int(state[f"{p0}.fc1.weight"].shape[0])
    head = state["fc.weight"]
    if head.dim() != 2:
        raise ConvertError(f"fc.weight has shape {tuple(head.shape)}; expected [num_classes, dim]")
    try:
        cfg = AdapterConfig(
            width=width,
            kernel=tuple(int(k) for k in conv_w.shape[2:]),  # type: ignore[arg-type]
            pre_attn="pre_attn" in positions,
            pre_mlp="pre_mlp" in positions,
            layers=n,
            activation=activation,
        )
    except ConfigError as e:
        raise ConvertError(f"inferred adapter config is invalid: {e}") from e
    return cfg, int(head.shape[0])


def check_state(state: Mapping[str, Tensor], cfg: AdapterConfig, dim: int, num_blocks: int, num_classes: int) -> None:
    """Every tensor has the shape the config and trunk imply, a float dtype and finite values."""
    shapes = expected_shapes(cfg, dim, num_blocks, num_classes)
    try:
        check_tensors(state, shapes, FLOAT_DTYPES, what="the inferred config")
    except WeightsError as e:
        raise ConvertError(f"{e} (trunk width d={dim}, adapter width r={cfg.width}, kernel {cfg.kernel}, "
                           f"{num_classes} classes)") from e


def convert_state(
    state: Mapping[str, Tensor], dim: int, num_blocks: int, activation: Activation = "none"
) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """Public checkpoint tensors -> (AdapterConfig, bundle tensors in float32).

    The key names already match ``adapter.safetensors``; only the dtype changes
    (the public code trains adapters in fp32 under AMP; fp16/bf16 widen losslessly).
    """
    cfg, num_classes = infer_adapter_config(state, num_blocks, activation)
    check_state(state, cfg, dim, num_blocks, num_classes)
    return cfg, {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def read_labels(path: str | os.PathLike) -> tuple[str, ...]:
    """One label per line, in class-index order (:func:`stadapter.labels.read_labels`, the reader training uses)."""
    try:
        return labels_file.read_labels(path)
    except labels_file.LabelsError as e:
        raise ConvertError(str(e)) from e


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    trunk,
    labels: Sequence[str],
    task: str,
    out_dir: str | os.PathLike,
    sampling: SamplingConfig,
    version: int = 1,
    activation: Activation = "none",
    description: str = "",
    replace: bool = False,
) -> TaskSpec:
    """Read a public checkpoint, check it against ``trunk`` (a loaded VideoTrunk) and ``labels``, write a bundle."""
    cfg, tensors = convert_state(read_checkpoint(checkpoint), trunk.dim, trunk.num_blocks, activation)
    num_classes = tensors["fc.weight"].shape[0]
    if num_classes != len(labels):
        raise ConvertError(f"the checkpoint's head has {num_classes} classes but the labels file lists {len(labels)} labels")
    if sampling.input_size != trunk.image_size:
        raise ConvertError(f"input size {sampling.input_size} differs from the trunk's image size {trunk.image_size}")
    try:
        spec = TaskSpec(
            name=task,
            labels=tuple(labels),
            adapter=cfg,
            sampling=sampling,
            trunk_fingerprint=trunk.fingerprint,
            version=version,
            description=description or f"converted from {Path(checkpoint).name}",
            metrics={"source": "public st-adapter checkpoint"},
        )
    except ConfigError as e:
        raise ConvertError(str(e)) from e
    save_bundle(out_dir, spec, tensors, replace=replace)
    return spec


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stadapter.convert",
        description="Convert a checkpoint of the public ST-Adapter code into a task bundle.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint-N.pth ({'model': state_dict, ...}) or .safetensors")
    p.add_argument("--trunk", required=True, help="trunk folder the checkpoint was trained on (trunk.json)")
    p.add_argument("--labels", required=True, help="text file, one class name per line in class-index order")
    p.add_argument("--task", required=True, help="task name (a-z 0-9 _ . -)")
    p.add_argument("--out", required=True, help="bundle folder to write, e.g. model_repository/tasks/NAME/1")
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--sampling", choices=("uniform", "stride"), default="uniform",
                   help="uniform segments (SSv2 recipe) or fixed stride (K400 recipe)")
    p.add_argument("--stride", type=int, default=16, help="frame step for --sampling stride")
    p.add_argument("--temporal-views", type=int, default=1)
    p.add_argument("--spatial-views", type=int, choices=(1, 3), default=1)
    p.add_argument("--activation", choices=("none", "gelu", "quickgelu", "relu"), default="none",
                   help="activation after the adapter conv (the public code has none)")
    p.add_argument("--description", default="")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    args = p.parse_args(argv)

    try:
        trunk = load_trunk(args.trunk)
        labels = read_labels(args.labels)
        sampling = SamplingConfig(
            num_frames=args.num_frames,
            mode=args.sampling,
            stride=args.stride,
            temporal_views=args.temporal_views,
            spatial_views=args.spatial_views,
            input_size=trunk.image_size,
        )
        if not trunk.arch.get("quick_gelu", False):
            print(
                "warning: the trunk uses plain GELU; the public ST-Adapter code runs OpenAI CLIP weights with QuickGELU "
                "(trunk init --quick-gelu yes)",
                file=sys.stderr,
            )
        spec = convert_checkpoint(
            args.checkpoint, trunk, labels, args.task, args.out, sampling,
            args.version, args.activation, args.description, args.force,
        )
    except FileExistsError as e:
        print(f"error: {e} (pass --force to replace it)", file=sys.stderr)
        return 2
    except (ConvertError, TrunkError, BundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a = spec.adapter
    print(
        f"wrote {args.out}: task {spec.name} v{spec.version}, {spec.num_classes} classes, adapters "
        f"{'+'.join(a.positions())} in the last {a.layers} blocks, width {a.width}, kernel {list(a.kernel)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
