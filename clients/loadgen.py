"""Load generator: ``python -m clients.loadgen --task T[,T2] --clips FILE... (--concurrency N | --rate R)
(--duration S | --requests N)``.

Closed loop (``--concurrency N``): N workers, each sends its next request when the
last one answered; measures capacity. Open loop (``--rate R``): requests start on a
fixed schedule of R per second whatever the server does (at most ``--max-inflight``
outstanding; a start that finds no free slot is counted as ``CLIENT_OVERLOAD``), so
latency includes queueing the way real traffic sees it. Each request pairs a task
and a clip drawn from the given lists (seeded). Runs are bounded: at most
``MAX_DURATION_S`` seconds and ``MAX_REQUESTS`` requests, and only loopback
addresses unless ``--allow-remote``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .core import DEFAULT_ADDRESS, NO_RETRY, ClassifyResult, ClientError, ClientOptions, read_clip
from .output import table

MAX_DURATION_S = 3600.0
MAX_REQUESTS = 1_000_000


@dataclass(frozen=True)
class LoadConfig:
    address: str
    tasks: tuple[str, ...]
    clips: tuple[Path, ...]
    concurrency: Optional[int] = None  # closed loop
    rate: Optional[float] = None  # open loop, requests per second
    duration_s: Optional[float] = None
    requests: Optional[int] = None
    top_k: int = 1
    timeout_s: float = 30.0
    max_inflight: int = 256
    seed: int = 0
    token: Optional[str] = None
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of --concurrency (closed loop) or --rate (open loop)")
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("give exactly one of --duration or --requests")
        if self.concurrency is not None and not 1 <= self.concurrency <= 4096:
            raise ValueError(f"--concurrency must be 1..4096, got {self.concurrency}")
        if self.rate is not None and not 0 < self.rate <= 100_000:
            raise ValueError(f"--rate must be in (0, 100000], got {self.rate}")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"--duration must be in (0, {MAX_DURATION_S:.0f}] seconds, got {self.duration_s}")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"--requests must be 1..{MAX_REQUESTS}, got {self.requests}")
        if not self.tasks or not all(self.tasks):
            raise ValueError("--task needs at least one task name")
        if not self.clips:
            raise ValueError("--clips needs at least one file")
        if not self.allow_remote and not is_loopback(self.address):
            raise ValueError(f"{self.address} is not a loopback address; pass --allow-remote to load another machine")


def is_loopback(address: str) -> bool:
    """``host:port`` whose host is localhost or a loopback IP (names are not resolved)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)  # successful requests
    codes: Counter = field(default_factory=Counter)
    server_batch: list[int] = field(default_factory=list)
    sent: int = 0

    def record(self, code: str, ms: float, batch: int = 0) -> None:
        self.codes[code] += 1
        if code == "OK":
            self.latencies_ms.append(ms)
            self.server_batch.append(batch)

    @property
    def done(self) -> int:
        return sum(self.codes.values())


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list; NaN when empty."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def summarize(cfg: LoadConfig, stats: Stats, elapsed_s: float) -> dict[str, Any]:
    lat = sorted(stats.latencies_ms)
    ok = stats.codes.get("OK", 0)
    return {
        "mode": "closed" if cfg.concurrency is not None else "open",
        "concurrency": cfg.concurrency,
        "rate": cfg.rate,
        "tasks": list(cfg.tasks),
        "clips": len(cfg.clips),
        "elapsed_s": round(elapsed_s, 3),
        "requests": stats.done,
        "ok": ok,
        "errors": {k: v for k, v in sorted(stats.codes.items()) if k != "OK"},
        "throughput_rps": round(ok / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "latency_ms": {
            "mean": round(sum(lat) / len(lat), 2) if lat else None,
            "p50": round(percentile(lat, 50), 2) if lat else None,
            "p90": round(percentile(lat, 90), 2) if lat else None,
            "p99": round(percentile(lat, 99), 2) if lat else None,
            "max": round(lat[-1], 2) if lat else None,
        },
        "server_batch_size_mean": round(sum(stats.server_batch) / len(stats.server_batch), 2) if lat else None,
    }


def render(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    load = f"concurrency {summary['concurrency']}" if summary["mode"] == "closed" else f"rate {summary['rate']}/s"
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"
    rows = [
        ["load", f"{summary['mode']} loop, {load}, tasks {','.join(summary['tasks'])}, {summary['clips']} clip(s)"],
        ["requests", f"{summary['requests']} in {summary['elapsed_s']:.2f} s ({summary['ok']} OK)"],
        ["throughput", f"{summary['throughput_rps']:.1f} clips/s"],
        ["latency ms", "p50 {p50}  p90 {p90}  p99 {p99}  max {max}  mean {mean}".format(**lat)],
        ["server batch", f"{summary['server_batch_size_mean']} clips per forward (mean)"],
        ["errors", errors],
    ]
    return table(["", ""], rows).split("\n", 1)[1]


class _Progress:
    def __init__(self, stream, enabled: bool):
        self.stream, self.enabled, self.last = stream, enabled, 0.0

    def update(self, stats: Stats, t0: float, cfg: LoadConfig, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.5 and not force):
            return
        self.last = now
        el = now - t0
        goal = f"/{cfg.requests}" if cfg.requests else f" ({el:.0f}/{cfg.duration_s:.0f} s)"
        err = stats.done - stats.codes.get("OK", 0)
        self.stream.write(f"\r{stats.done}{goal} done, {stats.codes.get('OK', 0) / max(el, 1e-9):.1f}/s, "
                          f"{err} errors   ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


async def run_load(cfg: LoadConfig, progress: bool = False, stream=sys.stderr) -> dict[str, Any]:
    from .aio import AsyncClient

    payloads = [read_clip(p) for p in cfg.clips]
    rng = random.Random(cfg.seed)
    stats = Stats()
    bar = _Progress(stream, progress)
    options = ClientOptions(address=cfg.address, token=cfg.token, timeout_s=cfg.timeout_s, retry=NO_RETRY,
                            stream_threshold_bytes=4 << 20)
    async with AsyncClient(options=options) as client:

        def claim() -> bool:
            if cfg.requests is not None and stats.sent >= cfg.requests:
                return False
            stats.sent += 1
            return True

        async def one() -> None:
            task, data = rng.choice(cfg.tasks), rng.choice(payloads)
            t = time.perf_counter()
            try:
                r = await client.classify(data, task, top_k=cfg.top_k)
                assert isinstance(r, ClassifyResult)  # one task name: one result
                stats.record("OK", (time.perf_counter() - t) * 1e3, int(r.timings.get("batch_size", 0)))
            except ClientError as e:
                stats.record(e.code.name, (time.perf_counter() - t) * 1e3)
            bar.update(stats, t0, cfg)

        t0 = time.monotonic()
        end = t0 + (cfg.duration_s if cfg.duration_s is not None else MAX_DURATION_S)
        if cfg.concurrency is not None:

            async def worker() -> None:
                while time.monotonic() < end and claim():
                    await one()

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        else:
            # Request i starts at t0 + i / rate. The start count is worked out from i, not from
            # summed intervals: 10 x 0.05 s adds up to just under 0.5 s and would start an 11th.
            assert cfg.rate is not None  # LoadConfig gives one of concurrency and rate
            starts = (end - t0) * cfg.rate
            inflight: set[asyncio.Task] = set()
            i = 0
            while i < starts - 1e-6 and claim():
                delay = t0 + i / cfg.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                i += 1
                if len(inflight) >= cfg.max_inflight:
                    stats.record("CLIENT_OVERLOAD", 0.0)
                    continue
                task = asyncio.create_task(one())
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            if inflight:
                await asyncio.wait(inflight, timeout=cfg.timeout_s + 5)
        elapsed = time.monotonic() - t0
        bar.update(stats, t0, cfg, force=True)
        bar.close()
    return summarize(cfg, stats, elapsed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=DEFAULT_ADDRESS)
    p.add_argument("--task", required=True, help="task name, or several separated by commas")
    p.add_argument("--clips", nargs="+", type=Path, required=True, metavar="FILE")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    load.add_argument("--rate", type=float, help="open loop: requests started per second")
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--duration", type=float, help=f"seconds (at most {MAX_DURATION_S:.0f})")
    stop.add_argument("--requests", type=int, help=f"request count (at most {MAX_REQUESTS})")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    p.add_argument("--max-inflight", type=int, default=256, help="open loop: cap on outstanding requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-file", type=Path, help="bearer token, if the server requires one for classification")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback address")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    p.add_argument("--json-out", type=Path, help="also write the JSON summary here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        token = ns.token_file.read_text().strip() if ns.token_file else None
        cfg = LoadConfig(address=ns.address, tasks=tuple(t.strip() for t in ns.task.split(",")),
                         clips=tuple(ns.clips), concurrency=ns.concurrency, rate=ns.rate, duration_s=ns.duration,
                         requests=ns.requests, top_k=ns.top_k, timeout_s=ns.timeout, max_inflight=ns.max_inflight,
                         seed=ns.seed, token=token, allow_remote=ns.allow_remote)
        summary = asyncio.run(run_load(cfg, progress=not (ns.no_progress or ns.json)))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ClientError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2)
    if ns.json_out:
        ns.json_out.write_text(text + "\n")
    print(text if ns.json else render(summary) + "\n" + text)
    if summary["ok"] == 0:
        print("error: no request succeeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
