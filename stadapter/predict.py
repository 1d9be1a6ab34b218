"""``python -m stadapter.predict --trunk DIR --task BUNDLE CLIP...``: top-k labels per clip."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from .api import VideoClassifier, load_classifier
from .bundle import BundleError
from .config import ConfigError
from .trunk import TrunkError
from .video import VideoError, decode_clip


def topk(probs: torch.Tensor, labels: list[str], k: int) -> list[dict]:
    values, idx = probs.topk(min(k, len(labels)))
    return [{"label": labels[i], "score": round(float(v), 6)} for v, i in zip(values.tolist(), idx.tolist(), strict=True)]


def predict_clip(clf: VideoClassifier, source, k: int = 5, **sampling_overrides) -> list[dict]:
    """Decode one clip with the task's sampling (plus overrides) and return its top-k."""
    sampling = clf.spec.sampling.replace(**sampling_overrides) if sampling_overrides else clf.spec.sampling
    views = decode_clip(source, sampling)  # [V, T, 3, S, S]
    return topk(clf.predict_views(views), clf.labels, k)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stadapter.predict", description="Classify video clips offline.")
    p.add_argument("--trunk", required=True, help="trunk folder (trunk.json)")
    p.add_argument("--task", required=True, help="task bundle folder (task.json + adapter.safetensors)")
    p.add_argument("clips", nargs="+", help="video files (any container/codec FFmpeg reads)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--temporal-views", type=int, help="override the task's temporal views")
    p.add_argument("--spatial-views", type=int, choices=(1, 3), help="override the task's spatial views")
    p.add_argument("--seek", choices=("exact", "keyframe"),
                   help="override the task's seek: keyframe = the fast sampling mode (each sample moves to the "
                        "cheapest frame of its segment)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per clip on stdout")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    overrides = {
        k: v for k, v in (("temporal_views", args.temporal_views), ("spatial_views", args.spatial_views),
                          ("seek", args.seek)) if v is not None
    }
    try:
        clf = load_classifier(args.trunk, args.task, device=args.device)
        clf.spec.sampling.replace(**overrides)  # refuse bad overrides once, not per clip
    except (TrunkError, BundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for clip in args.clips:
        try:
            top = predict_clip(clf, clip, args.top_k, **overrides)
        except (VideoError, ConfigError) as e:
            failed += 1
            if args.json:
                print(json.dumps({"clip": clip, "error": str(e)}))
            else:
                print(f"{clip}: error: {e}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"clip": clip, "task": clf.spec.name, "version": clf.spec.version, "top": top}))
        else:
            print(f"{clip}  [{clf.spec.name} v{clf.spec.version}]")
            for t in top:
                print(f"  {t['score']:7.4f}  {t['label']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
