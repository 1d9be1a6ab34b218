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
    """Each window as a bar from its start to its end at the height of its top score, coloured by its top label."""
    plt = require_matplotlib()
    labels = sorted({w.top.label for w in windows})
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(7, 2.6), dpi=80)
    try:
        for w in windows:
            ax.hlines(w.top.score, w.start_s, w.end_s, colors=[colours[w.top.label]], linewidth=4, alpha=0.75)
            ax.plot([(w.start_s + w.end_s) / 2], [w.top.score], "o", color=colours[w.top.label], markersize=3)
        for label in labels:
            ax.plot([], [], color=colours[label], linewidth=4, label=label)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("top score")
        ax.set_ylim(0, 1.05)
        if windows:
            ax.set_xlim(min(w.start_s for w in windows), max(w.end_s for w in windows))
        ax.legend(loc="lower right", fontsize="small", ncol=max(1, len(labels)))
        ax.set_title(title, fontsize="medium")
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out
