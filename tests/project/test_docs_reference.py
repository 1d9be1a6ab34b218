"""The flag and metric references (docs/reference/) are generated from the parser and the registry."""

from __future__ import annotations

import dataclasses
import difflib
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ServerConfig, build_parser
from server.reference import DOCS_DIR, RENDERERS, command, flags_markdown, metrics_markdown

ROOT = Path(__file__).resolve().parents[2]


def _imports_after(code: str) -> set[str]:
    """Top-level packages a fresh interpreter holds after running ``code`` in the checkout."""
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_the_parser_and_the_flag_reference_import_no_torch():
    """``python -m server --help`` and ``python -m server.reference flags`` build the parser alone: no torch, no gRPC."""
    for code in ("from server.config import build_parser\nbuild_parser().format_help()",
                 "from server.reference import flags_markdown\nflags_markdown()"):
        loaded = _imports_after(code)
        assert not loaded & {"torch", "grpc", "safetensors"}, (code, sorted(loaded & {"torch", "grpc", "safetensors"}))


@pytest.mark.parametrize("what", sorted(RENDERERS))
def test_the_committed_reference_is_what_the_generator_prints(what):
    committed = (ROOT / DOCS_DIR / f"{what}.md").read_text(encoding="utf-8")
    now = RENDERERS[what]()
    diff = "".join(difflib.unified_diff(committed.splitlines(True), now.splitlines(True), f"{DOCS_DIR}/{what}.md",
                                        "generated now", n=1))
    assert committed == now, f"{DOCS_DIR}/{what}.md is stale; run: {command(what)}\n{diff}"


def test_every_flag_has_help_and_every_config_field_a_flag():
    parser = build_parser()
    flags = [a for a in parser._actions if a.dest != "help"]
    assert [a.option_strings for a in flags if not (a.help or "").strip()] == []
    assert {a.dest for a in flags} == {f.name for f in dataclasses.fields(ServerConfig)}


def test_the_flag_reference_lists_each_flag_once_with_its_group_and_default():
    text = flags_markdown()
    for a in build_parser()._actions:
        if a.dest != "help":
            assert text.count(f"| `{a.option_strings[0]}`") == 1, a.option_strings
    assert "## Decoding" in text and "| `--decode-backend` | `process` \\| `thread` | `process` |" in text
    assert "| `--max-message-bytes` | int | `67108864 (64 MiB)` |" in text
    assert "| `--model-repository` | path | required |" in text and "| `--warmup`, `--no-warmup` | switch | on |" in text


def test_the_metric_reference_lists_every_family_with_its_labels():
    text = metrics_markdown()
    assert "| `stadapter_requests_total` | counter | — | `method`, `task`, `code` |" in text
    assert "| `stadapter_device_memory_bytes` | gauge | bytes | `device`, `kind` |" in text  # no sample on a CPU
    assert "`reason` (at 0 from the start: `deadline`, `cancelled`)" in text
    assert "| `stadapter_requests_in_flight` | gauge |" in text and "| `process_resident_memory_bytes` |" in text
    assert "`stadapter_request_seconds`" in text.split("## Histogram buckets")[1]  # labelled: buckets from the wrapper
