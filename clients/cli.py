"""``stadapter`` / ``python -m clients``: classify clips and manage tasks from the shell.

Exit status: 0 success; 1 a request failed (unknown task, bad clip, bad token, ...);
2 usage error; 3 the server cannot be reached. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import grpc

from .core import DEFAULT_ADDRESS, SAMPLING_FIELDS, TOKEN_ENV, ClientError, ClientOptions, RetryPolicy
from .live import LiveSource
from .live_remux import LiveURL, is_url
from .output import (
    EXIT_FAILED,
    EXIT_PIPE_CLOSED,
    EXIT_USAGE,
    WINDOW_HEADER,
    Row,
    classify_each,
    classify_each_tasks,
    exit_code,
    one_line,
    print_classify,
    table,
    window_line,
)

# ----------------------------------------------------------------------------- arguments

TOP_K_HELP = "labels per result (default: the server's --default-top-k)"


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--address", default=os.environ.get("STADAPTER_ADDRESS", DEFAULT_ADDRESS),
                   help=f"server host:port (default {DEFAULT_ADDRESS}, or env STADAPTER_ADDRESS)")
    g.add_argument("--token", help=f"bearer token (visible in the process list: prefer --token-file or {TOKEN_ENV})")
    g.add_argument("--token-file", type=Path, help="file holding the bearer token")
    g.add_argument("--tls-ca", type=Path, default=os.environ.get("STADAPTER_TLS_CA") or None,
                   help="PEM root certificate: connect with TLS and trust it (or env STADAPTER_TLS_CA)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per command call, retries included")
    g.add_argument("--retries", type=int, default=3, help="retries when the server is UNAVAILABLE (default 3)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(prog="stadapter", description="Client of the ST-Adapter video inference server.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("classify", parents=[common], help="classify clips with one task or several")
    c.add_argument("clips", nargs="+", type=Path, metavar="CLIP")
    c.add_argument("--task", required=True, action="append", metavar="TASK[,TASK...]",
                   help="task name; several (a comma list, or --task again) classify each clip for each task "
                        "with one upload and one decode per clip")
    c.add_argument("--top-k", type=int, default=0, help=TOP_K_HELP)
    c.add_argument("--json", action="store_true", help="JSON instead of a table")
    c.add_argument("--batch", action="store_true", help="send all clips in one BatchClassify call")
    s = c.add_argument_group("sampling overrides (default: the task's own)")
    s.add_argument("--frames", type=int, dest="num_frames")
    s.add_argument("--mode", choices=("uniform", "stride"))
    s.add_argument("--stride", type=int)
    s.add_argument("--temporal-views", type=int)
    s.add_argument("--spatial-views", type=int, choices=(1, 3))
    s.add_argument("--autorotate", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the clip's display rotation and sample aspect ratio (the task's default: on)")
    s.add_argument("--seek", choices=("exact", "keyframe"),
                   help="keyframe: move each sampled frame to the cheapest one of its segment (faster, approximate)")

    w = sub.add_parser("windows", parents=[common], help="a long clip as a timeline: one result per window")
    w.add_argument("clip", type=Path, metavar="CLIP")
    w.add_argument("--task", required=True, help="one task name")
    w.add_argument("--window-s", type=float, required=True, help="window length in seconds")
    w.add_argument("--stride-s", type=float, help="seconds from one window's start to the next (default: the window)")
    w.add_argument("--top-k", type=int, default=0, help=TOP_K_HELP)
    w.add_argument("--json", action="store_true", help="one JSON object per window, one per line")
    w.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw the top label and its score over time "
                   "(needs matplotlib)")
    w.add_argument("--frames", type=int, dest="num_frames", help="frames per window (default: the task's)")

    v = sub.add_parser("live", parents=[common], help="a live stream (a file, or - for stdin, e.g. ffmpeg ... -f "
                       "mpegts -): one result per window as the stream goes on")
    v.add_argument("source", metavar="SOURCE", help="MPEG-TS, Matroska/WebM, fragmented MP4 or FLV: a file, or - "
                   "for stdin; or a URL (rtsp://, rtmp://, srt://, http(s):// HLS, udp://, tcp://) this client opens "
                   "with PyAV, its video remuxed (not decoded) into the stream: the server never opens URLs")
    v.add_argument("--task", required=True, action="append", metavar="TASK[,TASK...]",
                   help="task name; several (a comma list, or --task again) share the stream's one decode")
    v.add_argument("--window-s", type=float, required=True, help="window length in seconds (of the stream's time)")
    v.add_argument("--stride-s", type=float, help="seconds from one window's start to the next (default: the window)")
    v.add_argument("--top-k", type=int, default=0, help=TOP_K_HELP)
    v.add_argument("--realtime", action="store_true", help="send a file as it would play (each chunk at its "
                   "packets' presentation time; needs PyAV) instead of as fast as the server takes it")
    v.add_argument("--json", action="store_true", help="one JSON object per window and task, one per line")
    o = v.add_argument_group("a source opened with PyAV on this side (implied for a URL)")
    o.add_argument("--open-with-pyav", action="store_true", help="open SOURCE with PyAV even without a URL scheme "
                   "(a device, a playlist file) and remux its video")
    o.add_argument("--input-format", metavar="FMT", help="FFmpeg's input format (e.g. v4l2); implies --open-with-pyav")
    o.add_argument("--input-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a demuxer or protocol option (e.g. rtsp_transport=tcp); may be given again")
    o.add_argument("--open-timeout-s", type=float, default=10.0, help="the longest wait to open it, and for its "
                   "next packet (default 10)")

    r = sub.add_parser("register", parents=[common], help="upload a task bundle folder (admin token)")
    r.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    r.add_argument("--json", action="store_true")

    u = sub.add_parser("unregister", parents=[common], help="remove a task (admin token)")
    u.add_argument("task", metavar="TASK")
    u.add_argument("--json", action="store_true")

    t = sub.add_parser("tasks", parents=[common], help="list the served tasks")
    t.add_argument("--json", action="store_true")

    d = sub.add_parser("describe", parents=[common], help="everything about one task")
    d.add_argument("task", metavar="TASK")

    h = sub.add_parser("health", parents=[common], help="grpc.health.v1 check; exit 0 only when SERVING")
    h.add_argument("--service", default="", help="service name (default: the whole server)")

    x = sub.add_parser("triton-classify", help="classify clips on Triton Inference Server (exported model)")
    x.add_argument("clips", nargs="+", type=Path, metavar="CLIP")
    x.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC host:port")
    x.add_argument("--model", default="stadapter_multitask")
    x.add_argument("--task", required=True, help="one task name")
    x.add_argument("--top-k", type=int, default=5, help="labels per clip")
    x.add_argument("--json", action="store_true")
    x.add_argument("--timeout", type=float, default=60.0)
    return p


def _token(ns: argparse.Namespace) -> Optional[str]:
    if ns.token:
        return ns.token
    if ns.token_file:
        try:
            tok = ns.token_file.read_text().strip()
        except OSError as e:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read token file {ns.token_file}: {e.strerror}",
                              local=True) from e
        if not tok:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"token file {ns.token_file} is empty", local=True)
        return tok
    return (os.environ.get(TOKEN_ENV) or "").strip() or None


def options_from(ns: argparse.Namespace) -> ClientOptions:
    return ClientOptions(address=ns.address, token=_token(ns), tls_ca=ns.tls_ca, timeout_s=ns.timeout,
                         retry=RetryPolicy(max_attempts=max(1, ns.retries + 1)))


# ----------------------------------------------------------------------------- commands


def task_names(values: Sequence[str]) -> list[str]:
    """``--task a,b --task c`` -> ["a", "b", "c"]; an empty name or one given twice is a usage error."""
    names = [t.strip() for v in values for t in v.split(",")]
    if any(not t for t in names):
        raise UsageError(f"--task {','.join(values)!r} has an empty task name")
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:
        raise UsageError(f"--task names {twice} more than once")
    return names


class UsageError(ValueError):
    """A bad combination of arguments (exit status 2)."""


def _classify(ns: argparse.Namespace, client) -> int:
    sampling = {k: getattr(ns, k) for k in SAMPLING_FIELDS if getattr(ns, k) is not None}
    names = task_names(ns.task)
    if ns.batch:
        if len(names) > 1:
            raise UsageError("--batch takes one --task (each clip of a BatchClassify call names its own task)")
        rows: list[Row] = [(str(c), r) for c, r in zip(ns.clips, client.batch_classify(ns.clips, names[0], ns.top_k,
                                                                                        sampling), strict=True)]
    elif len(names) == 1:
        rows = classify_each(lambda clip: client.classify(clip, names[0], ns.top_k, sampling), ns.clips)
    else:
        rows = classify_each_tasks(lambda clip: client.classify(clip, names, ns.top_k, sampling), ns.clips, names)
    return print_classify(rows, ns.json)


def _windows(ns: argparse.Namespace, client) -> int:
    """Print each window as it arrives; with --plot draw the timeline once the stream has ended."""
    if ns.plot is not None:
        from .plot import require_matplotlib

        require_matplotlib()  # before the upload: a missing package is said at once
    sampling = {"num_frames": ns.num_frames} if ns.num_frames is not None else None
    stride = ns.stride_s if ns.stride_s is not None else ns.window_s
    got = []
    if not ns.json:
        print(WINDOW_HEADER, flush=True)
    for w in client.windows(ns.clip, ns.task, ns.window_s, stride, ns.top_k, sampling):
        got.append(w)
        print(window_line(w, ns.json), flush=True)
    if ns.plot is not None:
        from .plot import plot_timeline

        plot_timeline(got, ns.plot, f"{ns.task}: {ns.clip.name}, {ns.window_s:g} s windows every {stride:g} s")
        print(f"timeline written to {ns.plot}", file=sys.stderr)
    return 0


def _live(ns: argparse.Namespace, client) -> int:
    """Print each window (for each task) as it arrives; the table's last column is the lag, from the server's
    receipt of the window's last frame to this line."""
    names = [n.strip() for t in ns.task for n in t.split(",") if n.strip()]
    source = _live_source(ns)
    stride = ns.stride_s if ns.stride_s is not None else ns.window_s
    if not ns.json:
        print(f"{WINDOW_HEADER}  TASK / LAG", flush=True)
    for w in client.live(source, names[0] if len(names) == 1 else names, ns.window_s, stride, ns.top_k,
                         realtime=ns.realtime):
        if ns.json:
            print(window_line(w, True), flush=True)
            continue
        lag_ms = (time.time_ns() - w.last_frame_received_unix_ns) / 1e6
        print(f"{window_line(w, False)}  {w.task} {lag_ms:.0f} ms", flush=True)
    return 0


def _live_source(ns: argparse.Namespace) -> LiveSource:
    """stdin, a URL or a source PyAV opens (:class:`~clients.live_remux.LiveURL`), or a file."""
    if ns.source == "-":
        return sys.stdin.buffer
    if not (is_url(ns.source) or ns.open_with_pyav or ns.input_format or ns.input_option):
        return Path(ns.source)
    options = {}
    for kv in ns.input_option:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise UsageError(f"--input-option {kv!r} is not KEY=VALUE")
        options[key] = value
    return LiveURL(ns.source, ns.input_format, options, ns.open_timeout_s, ns.open_timeout_s)


def _triton_classify(ns: argparse.Namespace) -> int:
    try:
        from .triton import TritonClassifier
    except ImportError as e:  # the client-only install has no numpy / tritonclient / stadapter
        raise ClientError(grpc.StatusCode.FAILED_PRECONDITION, f"triton-classify decodes clips locally and needs the "
                          f"full install (numpy, tritonclient, stadapter): {e}", local=True) from e

    clf = TritonClassifier(ns.url, ns.model, ns.timeout)
    try:
        clf.task(ns.task)
        rows = classify_each(lambda clip: clf.classify(clip, ns.task, ns.top_k), ns.clips)
    finally:
        clf.close()
    return print_classify(rows, ns.json)


def _tasks(ns: argparse.Namespace, client) -> int:
    tl = client.list_tasks()
    if ns.json:
        print(json.dumps(tl.to_dict(), indent=2))
        return 0
    rows = [[t.name, t.version, ",".join(map(str, t.servable_versions)) or "-", len(t.labels), t.num_frames,
             t.input_size, t.sampling_mode, f"{t.adapter_bytes / 1024:.1f}", t.state, t.residency or "-",
             _short_labels(t.labels)]
            for t in tl.tasks]
    print(f"trunk {tl.trunk_model} ({tl.trunk_fingerprint[:12]}), {len(tl.tasks)} task(s)")
    print(table(["TASK", "VERSION", "SERVABLE", "CLASSES", "FRAMES", "SIZE", "SAMPLING", "KiB", "STATE", "RESIDENCY",
                 "LABELS"], rows))
    return 0


def _short_labels(labels: Sequence[str], n: int = 4) -> str:
    return ", ".join(labels[:n]) + (f", ... (+{len(labels) - n})" if len(labels) > n else "")


def run(ns: argparse.Namespace) -> int:
    if ns.command == "triton-classify":
        return _triton_classify(ns)
    from .sync import Client

    with Client(options=options_from(ns)) as client:
        if ns.command == "classify":
            return _classify(ns, client)
        if ns.command == "windows":
            return _windows(ns, client)
        if ns.command == "live":
            return _live(ns, client)
        if ns.command == "tasks":
            return _tasks(ns, client)
        if ns.command == "describe":
            print(json.dumps(client.describe_task(ns.task).to_dict(), indent=2))
            return 0
        if ns.command == "register":
            info = client.register(ns.bundle)
            print(json.dumps(info.to_dict(), indent=2) if ns.json else
                  f"registered {info.name} version {info.version} ({len(info.labels)} classes, "
                  f"{info.adapter_bytes / 1024:.1f} KiB of adapters)")
            return 0
        if ns.command == "unregister":
            name, version = client.unregister(ns.task)
            print(json.dumps({"task": name, "version": version}) if ns.json else
                  f"unregistered {name} (was version {version})")
            return 0
        if ns.command == "health":
            status = client.health(ns.service)
            print(status)
            return 0 if status == "SERVING" else EXIT_FAILED
    raise AssertionError(f"unhandled command {ns.command}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        rc = run(ns)
        sys.stdout.flush()  # here, so a reader that left is seen below, not in the interpreter's exit flush
        return rc
    except BrokenPipeError:  # `... | head`: the reader has what it wanted; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not raise again
        return EXIT_PIPE_CLOSED
    except ClientError as e:
        print(f"error: {one_line(e, getattr(ns, 'address', '') or getattr(ns, 'url', ''))}", file=sys.stderr)
        return exit_code(e)
    except ValueError as e:  # bad option values (ClientOptions, RetryPolicy)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
