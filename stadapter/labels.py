"""The one reader of labels files: one class name per line, line ``i`` names class ``i``.

Training (list files, class folders), the checkpoint converter and the demo
builder all read labels through :func:`read_labels`, so a file means the same
class indices everywhere. A blank line inside the file would shift every later
class by one, so it is refused with its line number instead of skipped; blank
lines at the end (a trailing newline or two) are ignored. Surrounding spaces are
stripped; a name may contain inner spaces.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_LABELS_BYTES = 4 << 20  # a labels file is text for at most a few hundred thousand classes


class LabelsError(ValueError):
    """A labels file cannot be read or is malformed; the message names the file and line(s)."""


def parse_labels(text: str, source: str = "labels") -> tuple[str, ...]:
    """Class names from the text of a labels file, in class-index order."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise LabelsError(f"labels file {source}: line(s) {blank[:5]} are blank; one label per line, in class order")
    if not lines:
        raise LabelsError(f"labels file {source} is empty")
    first: dict[str, int] = {}
    repeats: list[str] = []
    for n, name in enumerate(lines, 1):
        if name in first:
            repeats.append(f"{name!r} (lines {first[name]} and {n})")
        first.setdefault(name, n)
    if repeats:
        raise LabelsError(f"labels file {source} repeats {', '.join(repeats[:5])}")
    return tuple(lines)


def read_labels(path: str | os.PathLike, max_bytes: int = MAX_LABELS_BYTES) -> tuple[str, ...]:
    """Read and check a labels file (UTF-8, a byte-order mark is allowed)."""
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise LabelsError(f"labels file {path} is larger than {max_bytes} bytes")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"cannot read labels file {path}: {e}") from e
    return parse_labels(text, str(path))
