"""``python -m server.demo`` (``make demo``): the whole product in a minute, on the committed files.

1. copies ``model_repository/`` (trunk + task bundles) to a temporary folder, so the
   committed one is never modified, and starts ``python -m server`` on it (127.0.0.1,
   free ports, a fresh admin token);
2. lists the tasks, then classifies every sample clip under ``samples/<task>/`` (true
   labels in ``labels.json``) in one BatchClassify call, so clips of different tasks
   share forward passes, and prints predicted vs true label;
3. registers a task at runtime (a copy of the first demo bundle under a new name),
   classifies with it, and unregisters it;
4. prints a few lines scraped from the Prometheus endpoint;
5. stops the server with SIGTERM (it drains in-flight work) and reports its exit code.

Runs on whatever tasks the repository holds and whatever clips ``samples/`` has.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Optional, Sequence

from clients.core import ClassifyResult, ClientError
from clients.output import table
from clients.sync import Client
from server.process import ROOT, ServerProcess, ServerStartError

LIVE_SUFFIX = "-live"


class DemoError(RuntimeError):
    pass


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, text: str) -> None:
    say(f"\n== {n}. {text}")


# ----------------------------------------------------------------------------- pieces


def copy_repository(src: Path, dst: Path) -> Path:
    """trunk/ and tasks/ only (generated Triton models are not served by this server)."""
    if not (src / "trunk").is_dir():
        raise DemoError(f"{src} has no trunk/ folder: is this a model repository?")
    dst.mkdir(parents=True)
    shutil.copytree(src / "trunk", dst / "trunk")
    if (src / "tasks").is_dir():
        shutil.copytree(src / "tasks", dst / "tasks")
    return dst


def sample_clips(samples: Path, task: str) -> list[tuple[Path, str]]:
    """(clip, true label) pairs from ``samples/<task>/labels.json`` (``{"file.mp4": "label"}``)."""
    labels_file = samples / task / "labels.json"
    if not labels_file.is_file():
        return []
    labels = json.loads(labels_file.read_text())
    return [(samples / task / name, label) for name, label in sorted(labels.items())
            if (samples / task / name).is_file()]


def latest_version_dir(repository: Path, task: str) -> Path:
    versions = [p for p in (repository / "tasks" / task).iterdir() if p.name.isdigit()]
    if not versions:
        raise DemoError(f"no version folder for task {task!r} in {repository}")
    return max(versions, key=lambda p: int(p.name))


def renamed_bundle(bundle: Path, new_name: str, out: Path) -> Path:
    """A copy of ``bundle`` whose task.json names ``new_name`` (same weights, same trunk)."""
    out.mkdir(parents=True)
    shutil.copy2(bundle / "adapter.safetensors", out / "adapter.safetensors")
    spec = json.loads((bundle / "task.json").read_text())
    spec["name"] = new_name
    spec["description"] = f"{spec.get('description', '')} (registered at runtime by the demo)".strip()
    (out / "task.json").write_text(json.dumps(spec, indent=2))
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text page: (name, labels, value)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def metric_lines(samples: list[tuple[str, dict[str, str], float]]) -> list[str]:
    def total(name: str, **want: str) -> float:
        return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in want.items()))

    lines = []
    codes: dict[str, float] = {}
    for n, lab, v in samples:
        if n == "stadapter_requests_total" and v:
            codes[lab.get("code", "?")] = codes.get(lab.get("code", "?"), 0) + v
    lines.append("stadapter_requests_total by code: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(codes.items())))
    clips = {lab.get("task"): v for n, lab, v in samples if n == "stadapter_clips_total"}
    lines.append("stadapter_clips_total by task: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(clips.items())))
    for hist, unit in (("stadapter_batch_size", "clips"), ("stadapter_batch_tasks", "tasks"),
                       ("stadapter_request_seconds", "s")):
        count, summed = total(f"{hist}_count"), total(f"{hist}_sum")
        if count:
            mean = f"{summed / count * 1e3:.1f} ms" if unit == "s" else f"{summed / count:.2f} {unit}"
            lines.append(f"{hist}: {count:.0f} observations, mean {mean}")
    lines.append(f"stadapter_tasks_loaded: {total('stadapter_tasks_loaded'):.0f}")
    ok = total("stadapter_registrations_total", result="ok")
    lines.append(f"stadapter_registrations_total{{result=\"ok\"}}: {ok:.0f}")
    return lines


def _row(task: str, clip: Path, truth: str, r) -> tuple[list, bool]:
    if isinstance(r, ClientError):
        return [task, clip.name, truth, f"ERROR {r.code.name}", "-", "-", "-"], False
    assert isinstance(r, ClassifyResult)
    ok = r.top.label == truth
    return [task, clip.name, truth, r.top.label, f"{r.top.score:.3f}", "yes" if ok else "NO",
            r.timings.get("batch_size", 0)], True


# ----------------------------------------------------------------------------- the demo


def run_demo(repository: Path, samples: Path, keep: bool = False) -> int:
    t_start = time.monotonic()
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="stadapter-demo-"))
        if not keep:
            stack.callback(shutil.rmtree, work, True)
        step(1, f"start the server on a copy of {repository}")
        repo = copy_repository(repository, work / "model_repository")
        token_file = work / "admin.token"
        token_file.write_text(secrets.token_urlsafe(24))
        token_file.chmod(0o600)
        t0 = time.monotonic()
        server = ServerProcess(repo, "--admin-token-file", str(token_file), timeout=120, workdir=work)
        stack.callback(server.stop, signal.SIGKILL, 5)  # no-op once stopped cleanly below
        say(f"server ready at {server.address} (metrics {server.metrics_url}) in {time.monotonic() - t0:.1f} s")
        client = stack.enter_context(Client(server.address, token=token_file.read_text()))

        tl = client.list_tasks()
        say(f"trunk {tl.trunk_model} ({tl.trunk_fingerprint[:12]}), {len(tl.tasks)} task(s):")
        say(table(["TASK", "VERSION", "CLASSES", "FRAMES", "SIZE", "LABELS"],
                  [[t.name, t.version, len(t.labels), t.num_frames, t.input_size, ", ".join(t.labels)]
                   for t in tl.tasks]))

        step(2, f"classify the sample clips under {samples} (one BatchClassify call, all tasks mixed)")
        items = [(t.name, clip, truth) for t in tl.tasks for clip, truth in sample_clips(samples, t.name)]
        if not items:
            raise DemoError(f"no sample clips for any served task under {samples} (expected <task>/labels.json)")
        results = client.batch_classify([c for _, c, _ in items], [t for t, _, _ in items], top_k=3)
        rows, failures = [], 0
        for (task, clip, truth), r in zip(items, results, strict=True):
            row, answered = _row(task, clip, truth, r)
            rows.append(row)
            failures += not answered
        say(table(["TASK", "CLIP", "TRUE", "PREDICTED", "SCORE", "CORRECT", "BATCH"], rows))
        for task in dict.fromkeys(t for t, _, _ in items):
            mine = [r for r in rows if r[0] == task]
            say(f"{task}: {sum(r[5] == 'yes' for r in mine)}/{len(mine)} correct")
        say("BATCH = clips in the forward pass that clip shared (clips of different tasks batch together)")

        step(3, "register a task at runtime, classify with it, unregister it")
        base = items[0][0]
        live = f"{base}{LIVE_SUFFIX}"
        bundle = renamed_bundle(latest_version_dir(repo, base), live, work / "upload" / live)
        info = client.register(bundle)
        say(f"registered {info.name} version {info.version} ({len(info.labels)} classes, "
            f"{info.adapter_bytes / 1024:.1f} KiB of adapter + head on the shared trunk)")
        base_rows = {r[1]: r[3] for r in rows if r[0] == base}
        same = 0
        live_rows = []
        for clip, truth in sample_clips(samples, base):
            try:
                res = client.classify(clip, live, top_k=1)
            except ClientError as e:
                failures += 1
                live_rows.append([live, clip.name, truth, f"ERROR {e.code.name}", "-"])
                continue
            assert isinstance(res, ClassifyResult)  # one task named: one result
            same += res.top.label == base_rows.get(clip.name)
            live_rows.append([live, clip.name, truth, res.top.label, f"{res.top.score:.3f}"])
        say(table(["TASK", "CLIP", "TRUE", "PREDICTED", "SCORE"], live_rows))
        say(f"{live} agrees with {base} on {same}/{len(live_rows)} clips (same weights, new name)")
        name, version = client.unregister(live)
        say(f"unregistered {name} (version {version})")

        step(4, f"metrics from {server.metrics_url}")
        for line in metric_lines(scrape(server.metrics_url)):
            say("  " + line)

        step(5, "stop the server (SIGTERM: health NOT_SERVING, in-flight work drains, exit)")
        client.close()
        code = server.stop(signal.SIGTERM, 60)
        say(f"server exited with {code}" + ("" if code == 0 else f"; log tail:\n{server.log_tail()}"))
        if keep:
            say(f"work folder kept: {work}")
        say(f"\ndemo finished in {time.monotonic() - t_start:.1f} s"
            + (f"; {failures} request(s) failed" if failures else ""))
        return 0 if code == 0 and failures == 0 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                   help="model repository to copy and serve (default: the committed one)")
    p.add_argument("--samples", type=Path, default=ROOT / "samples", help="folder of <task>/labels.json + clips")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder (server log, repository copy)")
    ns = p.parse_args(argv)
    try:
        return run_demo(ns.repository, ns.samples, ns.keep)
    except (DemoError, ServerStartError, ClientError, OSError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
