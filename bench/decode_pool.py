"""Decode backends side by side: sandboxed worker processes vs in-process threads, at 1 and 2 workers.

    python -m bench.decode_pool [--clips 48] [--size 320x240] [--out decode_pool.json]

The server decodes through one of two backends (``--decode-backend``): ``process`` (the
default: spawned workers, frames back through shared memory, a crash or hang costs one
worker) or ``thread``. Both get the same pre-encoded clips (10 s, 30 fps, GOP 30, the
``pan`` content), all submitted at once, 8 uniform frames at 224 px each; the figure is
clips decoded per second, and the ratio process/thread at equal workers (goal >= 0.9).
Prints a table to stderr and JSON to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from bench.report import emit_json
from server.decode.pool import ProcessDecodePool, ThreadDecoder
from stadapter.config import SamplingConfig
from stadapter.video import VideoLimits
from stadapter.video.synthetic import make_clip


async def _clips_per_s(decoder, clips: list[bytes], cfg: SamplingConfig) -> float:
    limits = VideoLimits()
    await asyncio.gather(*(decoder.decode(c, cfg, limits, 60.0) for c in clips[:2]))  # warm both paths
    t0 = time.perf_counter()
    await asyncio.gather(*(decoder.decode(c, cfg, limits, 60.0) for c in clips))
    return len(clips) / (time.perf_counter() - t0)


async def _run(workers: int, backend: str, clips: list[bytes], cfg: SamplingConfig) -> float:
    if backend == "thread":
        decoder = ThreadDecoder(workers)
    else:
        decoder = ProcessDecodePool(workers)
        await decoder.start()
    try:
        return await _clips_per_s(decoder, clips, cfg)
    finally:
        decoder.close()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--size", default="320x240")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    w, h = map(int, a.size.split("x"))
    distinct = [make_clip(None, 300, fps=30, size=(w, h), gop=30, pattern="pan", start_pts=i) for i in range(4)]
    clips = [distinct[i % len(distinct)] for i in range(a.clips)]
    cfg = SamplingConfig(num_frames=8, input_size=224)
    rows = []
    for n in a.workers:
        thread = asyncio.run(_run(n, "thread", clips, cfg))
        process = asyncio.run(_run(n, "process", clips, cfg))
        rows.append({"workers": n, "thread_clips_per_s": round(thread, 2), "process_clips_per_s": round(process, 2),
                     "process_over_thread": round(process / thread, 3)})
    result = {"clip": f"{a.size} 10 s 30 fps GOP 30 pan", "clips": a.clips, "rows": rows}
    print(f"{'workers':>7}  {'thread clips/s':>14}  {'process clips/s':>15}  {'process/thread':>14}", file=sys.stderr)
    for r in rows:
        print(f"{r['workers']:>7}  {r['thread_clips_per_s']:>14.2f}  {r['process_clips_per_s']:>15.2f}  "
              f"{r['process_over_thread']:>14.3f}", file=sys.stderr)
    emit_json(result, a.out)
    return result


if __name__ == "__main__":
    main()
