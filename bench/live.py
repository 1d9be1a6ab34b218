"""Live streams (ClassifyLive): lag at real time, the concurrent streams one server sustains, and a file sent fast.

    python -m bench.live [--streams 1,2,4,8,16,24,32] [--seconds 30] [--window-s 2] [--stride-s 1]
                         [--width 320 --height 240 --fps 30] [--fast-seconds 60] [--max-p99-s 1] [--out F]

One server (``python -m server`` on a copy of the committed ``model_repository/``, the embedded trunk, task
``motion``; ``--max-live-streams`` the sweep's largest N, ``--live-idle-s`` 30; ``--server-flag`` adds more),
on 127.0.0.1 port 0; the client is one asyncio process beside it (on a small machine they share its cores).

* sweep: for each N, N concurrent streams of a seeded ``--seconds`` clip (``bench.live_plan``: H.264 with no
  B-frames, a keyframe a second, MPEG-TS), each chunk one video packet sent at its presentation time, so each
  stream plays at real time; the streams start spread evenly over one stride (cameras are not in step).
  ``lag``: from the send of the chunk that carried a window's last frame (``bench.live_plan.LagMap``; "sent":
  its ``write`` on the call returned) to the receipt of that window's result; p50 and p99 over every window
  of every stream. ``late``: how far a send fell behind its schedule (gRPC flow control holds a client whose
  server is behind), and ``lag_from_schedule``: lag measured from when the chunk was due, which is what a
  camera sees; the two lags agree while the server keeps up. A step is sustained when every stream ends OK
  with all its windows (none refused: ``RESOURCE_EXHAUSTED``) and the p99 of ``lag_from_schedule`` is under
  ``--max-p99-s``; the sweep stops at the first step that is not. Each step also reports the server's CPU
  seconds per stream-second (the server process and every process below it: the decoders, their fork server, the
  clip workers) and the load average.
* fast: the same ``--fast-seconds`` clip sent as fast as the server takes it, in 64 KiB chunks, once through
  ``ClassifyLive`` and once through ``ClassifyWindowsStream``: time to the first result and to the last, from
  the first byte sent, and when the upload ended (the live path answers while it still uploads; the windows
  path decodes only once the whole clip has come).

Prints a table to stderr and JSON to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from bench.live_plan import Chunk, LagMap, chunk_plan, make_clip, percentiles
from bench.report import emit_json

ROOT = Path(__file__).resolve().parent.parent
TASK = "motion"  # a task of the committed model_repository/ (the embedded trunk)
FAST_CHUNK_BYTES = 64 * 1024


@dataclass
class StreamRun:
    """One stream's record: each window's (end_frame, receive time), each chunk's send time, its end."""

    sent: list[float] = field(default_factory=list)
    results: list[tuple[int, float]] = field(default_factory=list)
    code: str = "OK"
    message: str = ""
    start: float = 0.0


async def one_stream(stub, chunks: Sequence[Chunk], delay_s: float, window_s: float, stride_s: float) -> StreamRun:
    """Send ``chunks`` at their times after ``delay_s``, reading the results as they come."""
    import grpc

    from stadapter_api.v1 import inference_pb2 as pb

    run = StreamRun(sent=[0.0] * len(chunks))
    await asyncio.sleep(delay_s)
    call = stub.ClassifyLive()

    async def read() -> None:
        async for r in call:
            run.results.append((r.end_frame, time.monotonic()))

    reader = asyncio.ensure_future(read())
    try:
        await call.write(pb.LiveChunk(task=TASK, window_s=window_s, stride_s=stride_s))
        run.start = time.monotonic()
        for j, c in enumerate(chunks):
            wait = run.start + c.at_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await call.write(pb.LiveChunk(data=c.data))
            run.sent[j] = time.monotonic()
        await call.done_writing()
        await reader
    except grpc.aio.AioRpcError as e:
        run.code, run.message = e.code().name, e.details() or ""
    except asyncio.InvalidStateError:  # a write after the call ended: its status is the reader's
        pass
    finally:
        if not reader.done():
            await asyncio.gather(reader, return_exceptions=True)
        if reader.done() and not reader.cancelled() and isinstance(reader.exception(), grpc.aio.AioRpcError):
            e = reader.exception()
            run.code, run.message = e.code().name, e.details() or ""  # type: ignore[union-attr]
    return run


def lags(runs: Sequence[StreamRun], chunks: Sequence[Chunk], settle_s: float = 0.0) -> dict:
    """Each window's lag from its last frame's send, and from when that send was due (see the module docstring);
    ``after_start``: the lag of the windows whose last frame is ``settle_s`` or more into its stream (the start's
    cost, a decoder process per stream, left out)."""
    lag_map = LagMap(chunks)
    sent_lag, due_lag, settled, late = [], [], [], []
    for r in runs:
        if r.start:
            late += [max(0.0, s - (r.start + c.at_s)) for s, c in zip(r.sent, chunks, strict=True) if s]
        for end_frame, got in r.results:
            j = lag_map.carrier(end_frame)
            if r.sent[j]:
                sent_lag.append(got - r.sent[j])
                due_lag.append(got - (r.start + chunks[j].at_s))
                if chunks[j].at_s >= settle_s:
                    settled.append(sent_lag[-1])
    return {"windows": len(sent_lag), "lag": percentiles(sent_lag), "lag_from_schedule": percentiles(due_lag),
            "lag_after_start": percentiles(settled), "late": percentiles(late)}


def expected_windows(seconds: float, window_s: float, stride_s: float) -> int:
    """Windows in a stream of ``seconds`` (whole windows only)."""
    return max(0, math.floor((seconds - window_s) / stride_s + 1e-9) + 1)


async def sweep_step(address: str, n: int, chunks: Sequence[Chunk], window_s: float, stride_s: float,
                     settle_s: float = 0.0) -> dict:
    import grpc

    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.VideoClassifierStub(channel)
        runs = await asyncio.gather(*(one_stream(stub, chunks, stride_s * i / n, window_s, stride_s)
                                      for i in range(n)))
    codes: dict[str, int] = {}
    for r in runs:
        codes[r.code] = codes.get(r.code, 0) + 1
    return {"streams": n, "codes": codes, "errors": sorted({f"{r.code}: {r.message}" for r in runs if r.code != "OK"}),
            "windows_per_stream": sorted({len(r.results) for r in runs}), **lags(runs, chunks, settle_s)}


def sustained(step: dict, expected: int, max_p99_s: float) -> bool:
    p99 = step["lag_from_schedule"]["p99_ms"]
    return (step["codes"] == {"OK": step["streams"]} and step["windows_per_stream"] == [expected]
            and p99 is not None and p99 < max_p99_s * 1000)


def cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and of every process below it, alive (the decoders' fork server, the clip workers)
    or reaped (a process's reaped children are in its own ``cutime``: the decoders of ended streams)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            todo += [int(k) for t in Path(f"/proc/{p}/task").iterdir() for k in (t / "children").read_text().split()]
        except OSError:  # ended meanwhile
            continue
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def load() -> float:
    return round(os.getloadavg()[0], 2)


async def fast(address: str, ts: bytes, window_s: float, stride_s: float, link_mbps: float = 0.0) -> dict:
    """The clip as fast as the server takes it (``link_mbps``: or as a link of that rate carries it):
    ClassifyLive vs ClassifyWindowsStream."""
    import grpc

    from stadapter_api.v1 import inference_pb2 as pb
    from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

    parts = [ts[i:i + FAST_CHUNK_BYTES] for i in range(0, len(ts), FAST_CHUNK_BYTES)]
    out = {}
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.VideoClassifierStub(channel)
        for name in ("ClassifyLive", "ClassifyWindowsStream"):
            live = name == "ClassifyLive"
            first = (pb.LiveChunk(task=TASK, window_s=window_s, stride_s=stride_s) if live else
                     pb.ClassifyWindowsChunk(task=TASK, window_s=window_s, stride_s=stride_s))
            message = pb.LiveChunk if live else pb.ClassifyWindowsChunk
            call = getattr(stub, name)()
            t0 = time.monotonic()
            got: list[float] = []

            async def read(call=call, got=got, t0=t0) -> None:
                async for _ in call:
                    got.append(time.monotonic() - t0)

            reader = asyncio.ensure_future(read())
            await call.write(first)
            sent = 0
            for p in parts:
                if link_mbps > 0:
                    await asyncio.sleep(max(0.0, t0 + sent * 8 / (link_mbps * 1e6) - time.monotonic()))
                await call.write(message(data=p))
                sent += len(p)
            await call.done_writing()
            uploaded = time.monotonic() - t0
            await reader
            out[name] = {"windows": len(got), "first_result_s": round(got[0], 3) if got else None,
                         "last_result_s": round(got[-1], 3) if got else None, "upload_s": round(uploaded, 3)}
    return out


def run(args: argparse.Namespace) -> dict:
    from server.demo import copy_repository
    from server.process import ServerProcess

    ns = sorted({int(x) for x in args.streams.split(",")})
    clip = make_clip(args.seconds, args.width, args.height, args.fps, args.seed)
    chunks = chunk_plan(clip)
    expected = expected_windows(len(chunks) / args.fps, args.window_s, args.stride_s)
    result: dict = {"clip": {"seconds": args.seconds, "width": args.width, "height": args.height, "fps": args.fps,
                             "bytes": len(clip), "chunks": len(chunks), "windows": expected},
                    "window_s": args.window_s, "stride_s": args.stride_s, "max_p99_s": args.max_p99_s,
                    "cpus": os.cpu_count(), "sweep": [], "largest_sustained": 0}
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        repo = copy_repository(ROOT / "model_repository", Path(tmp) / "repo")
        flags = ["--http-port", "-1", "--poll-interval-s", "0", "--max-live-streams", str(max(ns)),
                 "--live-idle-s", "30", *args.server_flag]
        result["server_flags"] = flags
        with ServerProcess(repo, *flags, timeout=300) as srv:
            for n in ns if not args.skip_sweep else []:
                load_before, cpu0, t0 = load(), cpu_s(srv.proc.pid), time.monotonic()
                step = asyncio.run(sweep_step(srv.address, n, chunks, args.window_s, args.stride_s, args.settle_s))
                wall = time.monotonic() - t0
                time.sleep(0.5)  # the streams' decoder processes reaped
                step.update(wall_s=round(wall, 2), load_before=load_before, load_after=load(),
                            server_cpu_s_per_stream_s=round((cpu_s(srv.proc.pid) - cpu0) / (n * args.seconds), 3))
                step["sustained"] = sustained(step, expected, args.max_p99_s)
                result["sweep"].append(step)
                print(f"[{n} streams] lag p50/p99 {step['lag']['p50_ms']}/{step['lag']['p99_ms']} ms, "
                      f"sustained={step['sustained']}, load {load_before}", file=sys.stderr)
                if not step["sustained"]:
                    break
                result["largest_sustained"] = n
            if args.fast_seconds > 0:
                fast_clip = clip if args.fast_seconds == args.seconds else make_clip(
                    args.fast_seconds, args.width, args.height, args.fps, args.seed)
                result["fast"] = {"seconds": args.fast_seconds, "bytes": len(fast_clip), "links": []}
                for mbps in (float(x) for x in args.fast_link_mbps.split(",")):
                    result["fast"]["links"].append({"link_mbps": mbps, "load_before": load(), **asyncio.run(
                        fast(srv.address, fast_clip, args.window_s, args.stride_s, mbps))})
    return result


def table(r: dict) -> str:
    c = r["clip"]
    lines = [f"{c['width']}x{c['height']} at {c['fps']} fps, {c['seconds']} s per stream, {r['window_s']:g} s windows "
             f"every {r['stride_s']:g} s; largest N sustained (p99 < {r['max_p99_s']:g} s, none refused): "
             f"{r['largest_sustained']}",
             f"{'N':>3} {'lag p50/p99 ms':>15} {'from due p99':>12} {'after start':>12} {'late p99':>9} {'windows':>8} "
             f"{'cpu/stream':>10} {'load':>5} {'ok':>3}"]
    for s in r["sweep"]:
        lines.append(f"{s['streams']:>3} {_pair(s['lag']):>15} {_ms(s['lag_from_schedule']['p99_ms']):>12} "
                     f"{_pair(s['lag_after_start']):>12} "
                     f"{_ms(s['late']['p99_ms']):>9} {s['windows']:>8} {s['server_cpu_s_per_stream_s']:>10.3f} "
                     f"{s['load_before']:>5.2f} {'yes' if s['sustained'] else 'no':>3}")
        lines += [f"    {e}" for e in s["errors"][:3]]
    if "fast" in r:
        f = r["fast"]
        lines.append(f"fast, {f['seconds']:g} s clip ({f['bytes'] / 2**20:.1f} MiB): first / last result / upload end, s")
        for link in f["links"]:
            for name in ("ClassifyLive", "ClassifyWindowsStream"):
                x = link[name]
                rate = f"{link['link_mbps']:g} Mbit/s" if link["link_mbps"] else "unlimited"
                lines.append(f"  {rate:<12} {name:<22} {x['first_result_s']} / {x['last_result_s']} / {x['upload_s']}  "
                             f"({x['windows']} windows, load {link['load_before']:.2f})")
    return "\n".join(lines)


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}"


def _pair(p: dict) -> str:
    return f"{_ms(p['p50_ms'])}/{_ms(p['p99_ms'])}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", default="1,2,4,8,16,24,32", help="the N of each sweep step (comma list)")
    p.add_argument("--seconds", type=float, default=30.0, help="each stream's length")
    p.add_argument("--window-s", type=float, default=2.0)
    p.add_argument("--stride-s", type=float, default=1.0)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-p99-s", type=float, default=1.0, help="a step is sustained with its p99 lag under this")
    p.add_argument("--settle-s", type=float, default=5.0,
                   help="lag_after_start leaves out the windows ending in each stream's first this many seconds")
    p.add_argument("--fast-link-mbps", default="0,8", help="the fast part's upload rates, Mbit/s (0: unlimited)")
    p.add_argument("--fast-seconds", type=float, default=60.0, help="the clip sent fast (0: skip that part)")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                   help="one more server argument (e.g. --server-flag=--max-batch-size --server-flag=16)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = run(args)
    print(table(result), file=sys.stderr)
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
