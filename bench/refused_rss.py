"""Memory over many refused clips: does the server's RSS plateau when megabyte-sized inputs are refused?

    python -m bench.refused_rss [--requests 4000] [--mb 2] [--every 100] [--cases whole,stream,streams999,valid]
                                [--mmap-threshold BYTES] [--out refused.json]

A real server (the committed ``model_repository/``, so its RSS includes torch; one decode
worker) gets ``requests`` clips one after another, each refused by the decoder:

* ``whole``: ``mb`` MiB of random bytes in one ``Classify`` message (a new random clip each time);
* ``stream``: the same sent through ``ClassifyStream`` in 64 KiB chunks;
* ``streams999``: a Matroska file of 999 tiny streams padded to ``mb`` MiB (refused for ``max_streams``);
* ``valid``: a valid clip of about ``mb`` MiB, classified (the control: it should stay flat).

Every ``every`` requests the bench reads VmRSS (``/proc/<pid>/status``) of the server process
and of its decode workers (its children, found by scanning ``/proc``). It reports the start
(after a warm-up of ``every`` requests), end and max, and the plateau check: the growth over
the second half of the run as a fraction of the start (goal: within 0.10).
``--mmap-threshold`` starts the server with ``MALLOC_MMAP_THRESHOLD_`` set (glibc).

Prints a table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from bench.report import emit_json

ROOT = Path(__file__).resolve().parent.parent
TASK = "motion"  # a task of the committed model_repository/ (the embedded trunk)
MiB = 1 << 20
CHUNK = 64 << 10
CASES = ("whole", "stream", "streams999", "valid")


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the decode workers)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _ffmpeg(args: list[str]) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, capture_output=True)


def many_streams_clip(folder: Path, mb: int, streams: int = 999) -> bytes:
    """A Matroska file holding ``streams`` copies of a short video stream, padded to ``mb`` MiB with random
    bytes (the server refuses it for its stream count)."""
    one = folder / "one.mkv"
    _ffmpeg(["-f", "lavfi", "-i", "color=c=gray:s=16x16:d=0.2:r=25", "-c:v", "mpeg4", str(one)])
    out = folder / "many.mkv"
    _ffmpeg(["-i", str(one), *[a for _ in range(streams) for a in ("-map", "0:v")], "-c", "copy", str(out)])
    data = out.read_bytes()
    pad = mb * MiB - len(data)
    return data + (bytes(os.urandom(pad)) if pad > 0 else b"")


def valid_clip(folder: Path, mb: int) -> bytes:
    """A 4 s 320x240 clip of noise, about ``mb`` MiB (the bitrate sets the size)."""
    out = folder / "valid.mp4"
    kbit = mb * 8 * 1024 // 4
    _ffmpeg(["-f", "lavfi", "-i", "nullsrc=s=320x240:d=4:r=25,geq=random(1)*255:128:128", "-c:v", "libx264",
             "-b:v", f"{kbit}k", "-maxrate", f"{kbit}k", "-bufsize", f"{kbit}k", "-pix_fmt", "yuv420p", str(out)])
    return out.read_bytes()


def run(case: str, requests: int, mb: int, every: int, mmap_threshold: int) -> dict:
    import grpc

    from server.demo import copy_repository
    from server.process import ServerProcess
    from stadapter_api.v1 import inference_pb2 as pb
    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    size = mb * MiB
    env = {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {}
    with tempfile.TemporaryDirectory() as tmp:
        fixed = {"streams999": many_streams_clip, "valid": valid_clip}.get(case)
        clip = fixed(Path(tmp), mb) if fixed is not None else b""
        repo = copy_repository(ROOT / "model_repository", Path(tmp) / "repo")
        args = ["--max-clip-bytes", str(4 * size), "--no-warmup", "--poll-interval-s", "0", "--decode-workers", "1"]
        with ServerProcess(repo, *args, timeout=120, env={"OMP_NUM_THREADS": "1", **env}) as srv:
            pid = srv.proc.pid
            channel = grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 64 * MiB)])
            stub = pb_grpc.VideoClassifierStub(channel)

            def one() -> str:
                data = clip or os.urandom(size)
                try:
                    if case == "stream":
                        def chunks() -> Iterator[pb.ClassifyChunk]:
                            for i in range(0, len(data), CHUNK):
                                yield pb.ClassifyChunk(task=TASK if i == 0 else "", data=data[i:i + CHUNK])
                        stub.ClassifyStream(chunks(), timeout=60)
                    else:
                        stub.Classify(pb.ClassifyRequest(task=TASK, clip=data), timeout=60)
                except grpc.RpcError as e:
                    return e.code().name
                return "OK"

            samples: list[tuple[int, int, int]] = []  # (requests done, server kB, workers kB)
            codes: dict[str, int] = {}
            t0 = time.monotonic()
            for n in range(1, requests + 1):
                code = one()
                codes[code] = codes.get(code, 0) + 1
                if n % every == 0 or n == requests:
                    samples.append((n, rss_kb(pid), sum(rss_kb(c) for c in children(pid))))
            elapsed = time.monotonic() - t0
            channel.close()
    return summarize(case, requests, mb, mmap_threshold, codes, samples, elapsed)


def summarize(case: str, requests: int, mb: int, mmap_threshold: int, codes: dict, samples: list,
              elapsed: float) -> dict:
    """Start = the first sample (after ``every`` requests); plateau = growth over the second half / start."""
    def mb_(kb: int) -> float:
        return round(kb / 1024, 1)

    server = [s[1] for s in samples]
    workers = [s[2] for s in samples]
    half = server[len(server) // 2]
    return {
        "case": case, "requests": requests, "mb": mb, "mmap_threshold": mmap_threshold, "codes": codes,
        "requests_per_s": round(requests / elapsed, 1),
        "server_start_mb": mb_(server[0]), "server_end_mb": mb_(server[-1]), "server_max_mb": mb_(max(server)),
        "server_second_half_growth": round((server[-1] - half) / server[0], 3),
        "server_growth": round((server[-1] - server[0]) / server[0], 3),
        "workers_start_mb": mb_(workers[0]), "workers_end_mb": mb_(workers[-1]), "workers_max_mb": mb_(max(workers)),
        "samples": [[n, mb_(s), mb_(w)] for n, s, w in samples],
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--mb", type=int, default=2, help="MiB per clip")
    ap.add_argument("--every", type=int, default=100, help="requests between RSS samples")
    ap.add_argument("--cases", default="whole,stream,streams999", help=f"comma-separated, of {','.join(CASES)}")
    ap.add_argument("--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_ for the server (0: unset)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    cases = [c for c in a.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}")
    res = []
    for c in cases:
        res.append(run(c, a.requests, a.mb, a.every, a.mmap_threshold))
        print(json.dumps({k: v for k, v in res[-1].items() if k != "samples"}), file=sys.stderr)
    print(f"{'case':>11} {'req':>6} {'req/s':>6} {'server MB start':>16} {'end':>7} {'max':>7} {'2nd-half growth':>16} "
          f"{'workers MB start':>17} {'end':>7}", file=sys.stderr)
    for r in res:
        print(f"{r['case']:>11} {r['requests']:>6} {r['requests_per_s']:>6} {r['server_start_mb']:>16} "
              f"{r['server_end_mb']:>7} {r['server_max_mb']:>7} {r['server_second_half_growth']:>16.3f} "
              f"{r['workers_start_mb']:>17} {r['workers_end_mb']:>7}", file=sys.stderr)
    emit_json(res, a.out)
    return res


if __name__ == "__main__":
    main()
