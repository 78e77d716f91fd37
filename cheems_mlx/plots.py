"""The PNG plots of training, fine-tuning and the benchmarks (matplotlib, headless)."""

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

Points = Sequence[Tuple[float, float]]


def line_plot(path: Path, panels: List[Dict], panel_width: float = 5.0) -> None:
    """One row of panels, each a dict: ``title``, ``xlabel``, ``ylabel``,
    ``series`` ({label: points} or {label: (points, matplotlib format)}), and optional
    ``logx`` (log base) and ``logy`` (bool)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, panel_width * len(panels)), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, spec in panel["series"].items():
            points, fmt = spec if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], str) else (spec, "o-")
            if points:
                ax.plot(*zip(*points), fmt, label=label)
        if panel.get("logx"):
            ax.set_xscale("log", base=panel["logx"])
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curve(metrics_file: Path, out: Path, title: str, x_key: str, ylabel: str = "loss") -> None:
    """Train and validation loss from a metrics.jsonl (rows with ``x_key`` and
    ``train_loss`` or ``val_loss``)."""
    rows = [json.loads(l) for l in Path(metrics_file).read_text().splitlines() if l.strip()]
    train = [(r[x_key], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r[x_key], r["val_loss"]) for r in rows if "val_loss" in r]
    line_plot(out, [{"title": title, "xlabel": x_key, "ylabel": ylabel,
                     "series": {"train": (train, "-"), "validation": (val, "o-")}}])
