"""The flag and metric references (docs/reference/) are generated from the parser and the registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports_after(code: str) -> set[str]:
    """Top-level packages a fresh interpreter holds after running ``code`` in the checkout."""
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_the_parser_imports_no_torch():
    """``python -m server --help`` and the flag reference build the parser alone: no torch, no gRPC."""
    loaded = _imports_after("from server.config import build_parser\nbuild_parser().format_help()")
    assert not loaded & {"torch", "grpc", "safetensors"}, sorted(loaded & {"torch", "grpc", "safetensors"})
