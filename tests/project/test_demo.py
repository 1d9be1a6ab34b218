"""``make demo``'s end-to-end path: ``python -m server.demo`` on a tiny repository and on the committed one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import media
import pytest
from serverproc import make_repository  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.demo", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_demo_on_a_tiny_repository(tmp_path):
    repo = make_repository(tmp_path / "repo")
    samples = tmp_path / "samples"
    for task, n in (("alpha", 2), ("beta", 1)):
        (samples / task).mkdir(parents=True)
        for i in range(n):
            media.make_clip(samples / task / f"c{i}.mp4", num_frames=10 + i, size=(48, 40))
        (samples / task / "labels.json").write_text(json.dumps({f"c{i}.mp4": f"{task}-{i}" for i in range(n)}))
    before = tree(repo)
    r = run_demo("--repository", str(repo), "--samples", str(samples))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for task, clip, truth in (("alpha", "c0.mp4", "alpha-0"), ("alpha", "c1.mp4", "alpha-1"), ("beta", "c0.mp4", "beta-0")):
        assert re.search(rf"^{task}\s+{clip}\s+{truth}\s+{task}-\d", out, re.M), out
    assert "registered alpha-live version 1" in out
    assert len(re.findall(r"^alpha-live\s+c\d\.mp4", out, re.M)) == 2
    assert "unregistered alpha-live" in out
    assert re.search(r"stadapter_requests_total by code: OK \d+", out)
    assert 'stadapter_registrations_total{result="ok"}: 1' in out
    assert "server exited with 0" in out
    assert tree(repo) == before  # the demo served a copy


def test_demo_fails_clearly_without_samples(tmp_path):
    repo = make_repository(tmp_path / "repo", tasks=(("alpha", 2),))
    r = run_demo("--repository", str(repo), "--samples", str(tmp_path / "none"))
    assert r.returncode == 1
    assert "no sample clips for any served task" in r.stderr


@pytest.mark.skipif(not (ROOT / "model_repository" / "trunk").is_dir() or not (ROOT / "samples").is_dir(),
                    reason="the committed demo repository or samples are missing")
def test_demo_on_the_committed_repository():
    before = tree(ROOT / "model_repository")
    r = run_demo()
    assert r.returncode == 0, r.stdout + r.stderr
    for task_dir in sorted((ROOT / "samples").iterdir()):
        labels = json.loads((task_dir / "labels.json").read_text())
        assert re.search(rf"^{task_dir.name}: \d+/{len(labels)} correct$", r.stdout, re.M), r.stdout
    assert "server exited with 0" in r.stdout
    assert tree(ROOT / "model_repository") == before
