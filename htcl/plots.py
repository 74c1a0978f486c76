"""Figures a person would rather look at than read: training curves (every training run draws
its own), and the PNG writer every figure of htcl uses (htcl.evaluation draws the rest)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from htcl.training import read_jsonl


def save_figure(fig, png: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_training_curves(metric_files: Sequence[str | Path], png: str | Path) -> Path:
    """Loss parts, in-batch top-1 and logit scale against step, one line per run and metric;
    the validation's (val_loss*, val_top1*) dashed, in the training line's colour."""
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
        colours: dict[str, str] = {}
        for key in sorted({k for r in records for k in r}, key=lambda k: (k.startswith("val_"), k)):
            values = [r.get(key) for r in records]
            name = key[len("val_") :] if key.startswith("val_") else key
            ax = axes[0] if name.startswith("loss") else axes[1] if name.startswith("top1") else None
            if ax is None:
                continue
            if key.startswith("val_"):  # only the log steps that carry it
                pts = [(s, v) for s, v in zip(steps, values) if v is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color=colours.get(name), label=f"{run}: {key}")
            else:
                colours[name] = ax.plot(steps, values, label=f"{run}: {key}")[0].get_color()
        axes[2].plot(steps, [r["logit_scale"] for r in records], label=run)
    for ax, title in zip(axes, ("contrastive losses", "in-batch top-1", "logit scale")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return save_figure(fig, png)
