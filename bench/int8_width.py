"""Where int8 block linears start to pay on this CPU: bf16 packed against int8 trunks of several widths.

    python -m bench.int8_width [--shapes 128x48/8,256x112,...] [--layers 2] [--frames 8] [--iters 9] [--out F.json]

Each shape is ``WIDTHxSIZE`` (patch 16) or ``WIDTHxSIZE/PATCH``: a random trunk of that width and image size
(heads of 64, or 32 below a width of 256; MLP 4x; ``layers`` blocks), one clip of ``frames`` frames through
``VideoTrunk.forward_features`` as the server prepares it on a CPU (bf16 with the block weights packed, or their
linears in int8: ``--quantize none`` / ``int8``), the two interleaved round by round, medians. The ratio is what
``server.config.INT8_MIN_WIDTH`` (``--quantize auto``'s smallest int8 width) is read from. Prints a table to stderr
and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from bench.report import emit_json
from bench.timing import timed_samples

SHAPES = "128x48/8,256x112,384x112,512x112,768x112,256x224,384x224,512x224,768x224"


def trunk_of(width: int, size: int, patch: int, layers: int, int8: bool):
    from server.config import ServerConfig
    from server.engine.model import prepare_trunk
    from stadapter.factory import arch_record, build_visual
    from stadapter.trunk import VideoTrunk

    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": size, "layers": layers, "width": width,
                                           "head_width": 64 if width >= 256 else 32, "patch_size": patch,
                                           "mlp_ratio": 4.0}}
    torch.manual_seed(0)
    trunk = VideoTrunk(build_visual(cfg, False), arch_record(cfg, False)).to(torch.bfloat16)
    prepare_trunk(trunk, torch.device("cpu"), torch.bfloat16, ServerConfig.cpu_chunk_bytes, int8=int8)
    return trunk


def parse_shape(text: str) -> tuple[int, int, int]:
    dims, _, patch = text.partition("/")
    width, size = dims.split("x")
    return int(width), int(size), int(patch or 16)


def measure(shape: str, layers: int, frames: int, iters: int) -> dict:
    width, size, patch = parse_shape(shape)
    trunks = {name: trunk_of(width, size, patch, layers, name == "int8") for name in ("bf16-packed", "int8")}
    clip = torch.randn(1, frames, 3, size, size, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        wall, _ = timed_samples({k: (lambda t=t: t.forward_features(clip)) for k, t in trunks.items()}, iters)
    med = {k: sorted(v)[len(v) // 2] for k, v in wall.items()}
    return {"shape": shape, "width": width, "image_size": size, "patch": patch,
            "tokens_per_frame": (size // patch) ** 2 + 1, "median_s": med,
            "int8_over_bf16_packed": med["bf16-packed"] / med["int8"]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int8_width", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated WIDTHxSIZE[/PATCH]")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--iters", type=int, default=9, help="timed rounds (after one untimed forward each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(s, args.layers, args.frames, args.iters) for s in args.shapes.split(",")]
    for r in rows:
        print(f"width {r['width']:5d}  {r['image_size']:4d} px  {r['tokens_per_frame']:4d} tokens  bf16 packed "
              f"{1e3 * r['median_s']['bf16-packed']:8.1f} ms  int8 {1e3 * r['median_s']['int8']:8.1f} ms  "
              f"int8 speed-up {r['int8_over_bf16_packed']:.2f}x", file=sys.stderr)
    emit_json({"layers": args.layers, "frames": args.frames, "iters": args.iters, "threads": args.threads,
               "shapes": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
