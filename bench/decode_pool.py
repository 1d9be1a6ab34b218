"""Decode backends side by side: sandboxed worker processes vs in-process threads, at 1 and 2 workers.

    python -m bench.decode_pool [--clips 48] [--size 320x240] [--out decode_pool.json]
    python -m bench.decode_pool --shm-bytes [--size 320x240]


The server decodes through one of two backends (``--decode-backend``): ``process`` (the
default: spawned workers, frames back through shared memory, a crash or hang costs one
worker) or ``thread``. Both get the same pre-encoded clips (10 s, 30 fps, GOP 30, the
``pan`` content), all submitted at once, 8 uniform frames at 224 px each; the figure is
clips decoded per second, and the ratio process/thread at equal workers (goal >= 0.9).
Prints a table to stderr and JSON to stdout.

``--shm-bytes``: instead, the shared-memory bytes one clip's frames take between a worker and the
server, per sampling: the size of each block the workers write, measured as the server opens it,
beside the bytes of the same clip's float32 model input (what crossed before frames travelled as
uint8: ``decode_clip_array``), and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Iterator

from bench.report import emit_json
from server.decode import pool as pool_module
from server.decode.pool import ProcessDecodePool, ThreadDecoder
from stadapter.config import SamplingConfig
from stadapter.video import VideoLimits, decode_clip_array
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


SHM_SAMPLINGS = {  # name -> sampling of the --shm-bytes rows
    "8 x 224, 1 view": SamplingConfig(num_frames=8, input_size=224),
    "8 x 224, 3 x 3 views": SamplingConfig(num_frames=8, input_size=224, temporal_views=3, spatial_views=3),
    "16 x 224, 1 view": SamplingConfig(num_frames=16, input_size=224),
    "64 x 224, 1 view": SamplingConfig(num_frames=64, input_size=224),
}


@contextlib.contextmanager
def _block_sizes() -> Iterator[list[int]]:
    """The size of every block the pool reads meanwhile, opened by name before the pool copies it out."""
    sizes: list[int] = []
    real = pool_module.read_block

    def measured(name: str, shape: tuple[int, ...], dtype: str):
        shm = SharedMemory(name=name)
        sizes.append(shm.size)
        shm.close()
        return real(name, shape, dtype)

    pool_module.read_block = measured  # type: ignore[assignment]
    try:
        yield sizes
    finally:
        pool_module.read_block = real


async def _shm_rows(clip: bytes) -> list[dict]:
    pool = ProcessDecodePool(1)
    await pool.start()
    rows = []
    try:
        for name, cfg in SHM_SAMPLINGS.items():
            with _block_sizes() as sizes:
                await pool.decode(clip, cfg, VideoLimits(), 60.0)
            float32 = decode_clip_array(clip, cfg).nbytes
            rows.append({"sampling": name, "shm_bytes_per_clip": sizes[0], "float32_bytes_per_clip": float32,
                         "float32_over_shm": round(float32 / sizes[0], 3)})
    finally:
        pool.close()
    return rows


def _shm_main(size: str, out) -> dict:
    w, h = map(int, size.split("x"))
    clip = make_clip(None, 300, fps=30, size=(w, h), gop=30, pattern="pan")
    rows = asyncio.run(_shm_rows(clip))
    result = {"clip": f"{size} 10 s 30 fps GOP 30 pan", "shm": rows}
    print(f"{'sampling':>22}  {'shm bytes/clip':>14}  {'float32 bytes/clip':>18}  {'float32/shm':>11}", file=sys.stderr)
    for r in rows:
        print(f"{r['sampling']:>22}  {r['shm_bytes_per_clip']:>14}  {r['float32_bytes_per_clip']:>18}  "
              f"{r['float32_over_shm']:>11.2f}", file=sys.stderr)
    emit_json(result, out)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--size", default="320x240")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path)
    p.add_argument("--shm-bytes", action="store_true", help="the shared-memory bytes per clip instead (see above)")
    a = p.parse_args(argv)
    if a.shm_bytes:
        return _shm_main(a.size, a.out)
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
