"""The demo's figures: held-out losses before / after training, and the training curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def loss_bars(path: Path, before: dict[str, float], after: dict[str, float], names: list[str]) -> None:
    """Grouped bars of the held-out losses before and after training (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.bar(x - 0.2, [before[n] for n in names], 0.4, label="before training")
    ax.bar(x + 0.2, [after[n] for n in names], 0.4, label="after training")
    for i, n in enumerate(names):
        ax.text(
            i + 0.2,
            after[n],
            f"{100 * (after[n] / before[n] - 1):+.1f}%",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("mean loss on held-out clips")
    ax.set_title("held-out losses before / after training", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def training_curves(path: Path, metrics_file: Path, names: list[str]) -> None:
    """Each loss term per optimizer step (log scale), from the run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name in names:
        values = [r.get(f"loss.{name}") for r in records]
        if any(v is not None and v > 0 for v in values):
            ax.plot(steps, values, label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training losses (global batch of the training clips)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
