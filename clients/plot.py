"""The timeline picture of ``windows --plot``: each window's top label and its score over time.

matplotlib is imported only here and only when a picture is asked for: the client-only
install has no matplotlib, and every other command works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import grpc

from .core import ClientError, WindowResult


def require_matplotlib() -> Any:
    """The pyplot module with a file-only backend, or a clear error naming the package to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise ClientError(grpc.StatusCode.FAILED_PRECONDITION, "--plot needs matplotlib, which is not installed "
                          "(pip install matplotlib); the timeline itself works without it", local=True) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(windows: Sequence[WindowResult], out: Path, title: str = "") -> Path:
    """Top score at each window's centre (markers coloured by top label), and below it a band showing the
    top label from each window's centre to the next one's."""
    plt = require_matplotlib()
    labels = sorted({w.top.label for w in windows})
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    centres = [(w.start_s + w.end_s) / 2 for w in windows]
    fig, ax = plt.subplots(figsize=(7, 2.6), dpi=80)
    try:
        ax.plot(centres, [w.top.score for w in windows], color="0.7", linewidth=1, zorder=1)
        for label in labels:
            xs = [c for c, w in zip(centres, windows, strict=True) if w.top.label == label]
            ax.scatter(xs, [w.top.score for w in windows if w.top.label == label], color=colours[label], s=18,
                       label=label, zorder=2)
        for i, (c, w) in enumerate(zip(centres, windows, strict=True)):
            right = centres[i + 1] if i + 1 < len(windows) else w.end_s
            left = c if i else w.start_s
            ax.fill_between([left, right], -0.12, -0.04, color=colours[w.top.label], linewidth=0)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("top score")
        ax.set_ylim(-0.15, 1.05)
        if windows:
            ax.set_xlim(windows[0].start_s, max(w.end_s for w in windows))
        ax.legend(loc="center right", fontsize="small", ncol=max(1, len(labels)))
        ax.set_title(title, fontsize="medium")
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out
