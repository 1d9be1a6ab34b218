"""What the command-line tools print: tables, the classify output, one-line errors, exit codes.

Shared by the CLI (native and Triton commands), the demo and the load generator.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable, Sequence, Union

import grpc

from .core import TOKEN_ENV, ClassifyResult, ClientError, WindowResult

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left (`| head`)
Row = tuple[str, Union[ClassifyResult, ClientError]]


def one_line(err: ClientError, address: str = "") -> str:
    """A clear single-line message for an error, with a hint where one helps."""
    msg = " ".join(err.message.split())
    if err.code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the server at {address or 'the given address'} (UNAVAILABLE): {msg}"
    if err.code == grpc.StatusCode.UNAUTHENTICATED:
        return f"UNAUTHENTICATED: {msg} (pass --token-file FILE, set {TOKEN_ENV} or --token)"
    if err.local:
        return msg
    return f"{err.code.name}: {msg}"


def exit_code(err: ClientError) -> int:
    return EXIT_UNREACHABLE if err.code == grpc.StatusCode.UNAVAILABLE else EXIT_FAILED


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain left-aligned columns (no dependency)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def render_classify(rows: Sequence[Row], as_json: bool) -> str:
    """The classify output shared by the native and the Triton CLI."""
    if as_json:
        out = []
        for clip, r in rows:
            if isinstance(r, ClientError):
                task = {"task": r.task} if r.task else {}
                out.append({"clip": clip, **task, "error": {"code": r.code.name, "message": r.message}})
            else:
                out.append({"clip": clip, **r.to_dict()})
        return json.dumps(out, indent=2)
    body = []
    for clip, r in rows:
        if isinstance(r, ClientError):
            body.append([clip, r.task or "-", "-", "ERROR", "-", r.code.name, "-"])
            continue
        rest = ", ".join(f"{p.label} {p.score:.3f}" for p in r.predictions[1:])
        total = r.timings.get("total_ms")
        body.append([clip, r.task, r.task_version, r.top.label, f"{r.top.score:.3f}", rest or "-",
                     f"{total:.1f}" if total else "-"])
    return table(["CLIP", "TASK", "VERSION", "TOP-1", "SCORE", "NEXT", "MS"], body)


def classify_each(classify: Callable[[Any], ClassifyResult], clips: Iterable[Any]) -> list[Row]:
    """One row per clip; a failed clip is its error row, but an unreachable server stops the run."""
    rows: list[Row] = []
    for clip in clips:
        try:
            rows.append((str(clip), classify(clip)))
        except ClientError as e:
            if e.code == grpc.StatusCode.UNAVAILABLE:
                raise
            rows.append((str(clip), e))
    return rows


def classify_each_tasks(classify: Callable[[Any], list[Union[ClassifyResult, ClientError]]], clips: Iterable[Any],
                        tasks: Sequence[str]) -> list[Row]:
    """One row per clip and task (one call per clip); a failed call is an error row for each of its tasks."""
    rows: list[Row] = []
    for clip in clips:
        try:
            rows.extend((str(clip), r) for r in classify(clip))
        except ClientError as e:
            if e.code == grpc.StatusCode.UNAVAILABLE:
                raise
            rows.extend((str(clip), ClientError(e.code, e.message, e.local, task=t)) for t in tasks)
    return rows


def print_classify(rows: Sequence[Row], as_json: bool) -> int:
    """Print the rows (stdout) and one line per failed clip (stderr); the exit status."""
    print(render_classify(rows, as_json))
    errors = [(c, r) for c, r in rows if isinstance(r, ClientError)]
    for clip, err in errors:
        where = f"{clip} ({err.task})" if err.task else clip
        print(f"error: {where}: {one_line(err)}", file=sys.stderr)
    return EXIT_FAILED if errors else 0


WINDOW_HEADER = f"{'START':>8}  {'END':>8}  {'TOP-1':<16} {'SCORE':>5}  NEXT"


def window_line(w: WindowResult, as_json: bool) -> str:
    """One timeline line: a JSON object (``--json``) or a fixed-width row under :data:`WINDOW_HEADER`
    (printed as each window arrives, so the columns cannot be sized from all rows)."""
    if as_json:
        return json.dumps(w.to_dict())
    rest = ", ".join(f"{p.label} {p.score:.3f}" for p in w.predictions[1:])
    return f"{w.start_s:8.2f}  {w.end_s:8.2f}  {w.top.label:<16} {w.top.score:5.3f}  {rest or '-'}"
