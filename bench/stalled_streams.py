"""Memory of stalled streams: does the server's RSS stay near the clip bytes it counts as held?

    python -m bench.stalled_streams [--streams 8] [--mb 32] [--chunk-kb 1024] [--phase both|all] [--out stalled.json]

A real server (``--max-clip-bytes`` = one stream's size, ``--max-inflight-clip-bytes`` =
all of them) gets ``streams`` ClassifyStream calls that each send ``mb`` MiB in
``chunk_kb`` chunks and then stop sending. Once the server's own gauge
``stadapter_clip_in_flight_bytes`` shows every byte held, the bench reads the server
process's RSS (``/proc/<pid>/status`` VmRSS, and VmHWM for the peak) and reports the
growth over the idle server as a multiple of the bytes held (goal: <= 1.5). Then the
streams are cancelled and the gauge must return to 0. Phase ``unary`` sends each clip
whole in one ``Classify`` message instead, to a decoder that hangs. Decoder workers are separate
processes and never see these clips (the streams never end).

Prints a table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = "motion"  # a task of the committed model_repository/ (the embedded trunk)

MiB = 1 << 20


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _gauge(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name), -1.0)


def run(streams: int, mb: int, chunk_kb: int, idle_timeout_s: float, phase: str = "stalled") -> dict:
    """``phase``: ``stalled`` (streams stop before their end), ``decoding`` (streams end; the clip waits on a
    decoder that hangs through the test hook, so the whole clip sits in the server as a request) or ``unary``
    (the same wait, each clip sent whole in one ``Classify`` message)."""
    import grpc

    from server.demo import copy_repository
    from server.process import ServerProcess
    from stadapter_api.v1 import inference_pb2 as pb
    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    per_stream = mb * MiB
    budget = streams * per_stream
    from server.decode.pool import HANG_MAGIC, TEST_HOOK_ENV

    chunk = os.urandom(chunk_kb << 10)
    first = HANG_MAGIC + chunk[len(HANG_MAGIC):] if phase != "stalled" else chunk
    env = {TEST_HOOK_ENV: "hang-on-magic"} if phase != "stalled" else {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_repository(ROOT / "model_repository", Path(tmp) / "repo")
        args = ["--max-clip-bytes", str(per_stream), "--max-inflight-clip-bytes", str(budget), "--no-warmup",
                "--poll-interval-s", "0", "--decode-workers", "1", "--decode-timeout-s", "600"]
        if idle_timeout_s > 0:
            args += ["--stream-idle-timeout-s", str(idle_timeout_s)]
        with ServerProcess(repo, *args, timeout=120, env=env) as srv:
            pid = srv.proc.pid
            time.sleep(1.0)
            base_kb, base_hwm_kb = _status_kb(pid, "VmRSS"), _status_kb(pid, "VmHWM")
            gate = threading.Event()

            def chunks():
                sent = 0
                while sent < per_stream:
                    n = min(len(chunk), per_stream - sent)
                    yield pb.ClassifyChunk(task=TASK, data=first[:n]) if sent == 0 else pb.ClassifyChunk(data=chunk[:n])
                    sent += n
                if phase == "stalled":
                    gate.wait(600)  # everything sent but the end of the stream

            channel = grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 64 * MiB)])
            stub = pb_grpc.VideoClassifierStub(channel)
            t0 = time.monotonic()
            if phase == "unary":
                whole = (first + chunk * (per_stream // len(chunk)))[:per_stream]
                futures = [stub.Classify.future(pb.ClassifyRequest(task=TASK, clip=whole), timeout=600)
                           for _ in range(streams)]
                del whole
            else:
                futures = [stub.ClassifyStream.future(chunks(), timeout=600) for _ in range(streams)]
            held = 0.0
            while time.monotonic() - t0 < 300:
                held = _gauge(srv.metrics_url, "stadapter_clip_in_flight_bytes")
                if held >= budget or any(f.done() for f in futures):
                    break
                time.sleep(0.2)
            fill_s = time.monotonic() - t0
            time.sleep(1.0)
            rss_kb, hwm_kb = _status_kb(pid, "VmRSS"), _status_kb(pid, "VmHWM")
            refused = [f.exception().code().name for f in futures if f.done() and f.exception() is not None]
            for f in futures:
                f.cancel()
            gate.set()
            end = time.monotonic() + 30
            after = held
            while time.monotonic() < end:
                after = _gauge(srv.metrics_url, "stadapter_clip_in_flight_bytes")
                if after == 0:
                    break
                time.sleep(0.1)
            rss_after_kb = _status_kb(pid, "VmRSS")
            channel.close()
    growth = (rss_kb - base_kb) * 1024
    return {
        "phase": phase, "streams": streams, "mb_per_stream": mb, "chunk_kb": chunk_kb, "budget_bytes": budget,
        "held_bytes_gauge": held, "fill_s": round(fill_s, 2), "refused": refused,
        "rss_idle_mb": round(base_kb / 1024, 1), "rss_stalled_mb": round(rss_kb / 1024, 1),
        "rss_growth_mb": round(growth / MiB, 1), "growth_over_held": round(growth / max(held, 1), 3),
        # VmHWM still holds the start-up peak unless the streams passed it
        "peak_growth_over_held": round(((hwm_kb if hwm_kb > base_hwm_kb else rss_kb) - base_kb) * 1024
                                       / max(held, 1), 3),
        "held_after_cancel": after, "rss_after_cancel_mb": round(rss_after_kb / 1024, 1),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--mb", type=int, default=32, help="MiB each stream sends before it stalls")
    ap.add_argument("--chunk-kb", type=int, default=1024)
    ap.add_argument("--idle-timeout-s", type=float, default=600.0, help="server flag (0: leave it out)")
    ap.add_argument("--phase", choices=("stalled", "decoding", "unary", "both", "all"), default="both",
                    help="both: stalled and decoding; all: the three")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    phases = {"both": ("stalled", "decoding"), "all": ("stalled", "decoding", "unary")}.get(a.phase, (a.phase,))
    res = {p: run(a.streams, a.mb, a.chunk_kb, a.idle_timeout_s, p) for p in phases}
    print(f"{'phase':>9} {'streams':>8} {'held MiB':>9} {'RSS growth MiB':>15} {'growth/held':>12} {'peak/held':>10} "
          f"{'held after cancel':>18}", file=sys.stderr)
    for p, r in res.items():
        print(f"{p:>9} {r['streams']:>8} {r['held_bytes_gauge'] / MiB:>9.1f} {r['rss_growth_mb']:>15.1f} "
              f"{r['growth_over_held']:>12.3f} {r['peak_growth_over_held']:>10.3f} {r['held_after_cancel']:>18.0f}",
              file=sys.stderr)
    print(json.dumps(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
