"""Evaluation reports and plots. (Linear probes, hit-rate@K and AUC tables come with issue 6.)"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from htcl.training import read_jsonl


def plot_training_curves(metric_files: Sequence[str | Path], png: str | Path) -> Path:
    """Loss parts, in-batch top-1 and logit scale against step, one line per run and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for f in metric_files:
        records = read_jsonl(f)
        if not records:
            continue
        run = Path(f).parent.name
        steps = [r["step"] for r in records]
        for key in sorted({k for r in records for k in r}):
            values = [r.get(key) for r in records]
            if key.startswith("loss"):
                axes[0].plot(steps, values, label=f"{run}: {key}")
            elif key.startswith("top1"):
                axes[1].plot(steps, values, label=f"{run}: {key}")
        axes[2].plot(steps, [r["logit_scale"] for r in records], label=run)
    for ax, title in zip(axes, ("contrastive losses", "in-batch top-1", "logit scale")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
