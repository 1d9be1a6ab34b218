"""How every bench hands over its figures: the JSON on stdout, and the same in ``--out`` when given."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


def emit_json(result: Any, out: Optional[str | os.PathLike] = None) -> None:
    """Print ``result`` as indented JSON; also write it to ``out`` (its folder made if missing)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
