"""Training-curve PNG from a metrics history (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def plot_curves(history: Sequence[Mapping], out: str | Path, title: str = "") -> Path:
    """Train loss and validation top-1 per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax1.grid(alpha=0.3)
    val = [(h["epoch"], h["val_top1"]) for h in history if h.get("val_top1") is not None]
    if val:
        ax2.plot([e for e, _ in val], [100 * v for _, v in val], marker="o", color="tab:green")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val top-1 (%)")
    ax2.set_ylim(0, 100)
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
