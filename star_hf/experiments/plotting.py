"""Matplotlib figures of routing and training: expert-load heat maps, interpolation bars, curves.

Used by ``star-hf inspect --plot`` and ``star-hf demo``. Figures are drawn with the Agg backend (no
display needed) and written atomically: an interrupted run never leaves half a PNG.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "draw_interpolation_bars",
    "draw_load_heatmap",
    "layer_label",
    "plot_curves",
    "plot_routing",
    "pyplot",
    "save_figure",
]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_label(path: str) -> str:
    """A short layer label: ``model.layers.3.mlp.gate`` → ``3``, Switch encoder router → ``encoder 1``."""
    numbers = re.findall(r"\.(\d+)\.", f".{path}.")
    stack = next((part for part in ("encoder", "decoder") if part in path.split(".")), "")
    return f"{stack} {numbers[0]}".strip() if numbers else path


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG next to ``path`` and rename it into place; the figure is closed."""
    plt = pyplot()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def draw_load_heatmap(ax: Any, loads: Sequence[Sequence[float] | None], labels: Sequence[str], title: str) -> Any:
    """Layers × experts heat map of each layer's share of routed tokens (rows without a load stay blank)."""
    import numpy as np

    width = max((len(load) for load in loads if load is not None), default=1)
    share = np.full((len(loads), width), np.nan)
    for i, load in enumerate(loads):
        if load is not None and sum(load) > 0:
            share[i, : len(load)] = np.asarray(load, dtype=float) / sum(load)
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set(title=title, xlabel="expert", ylabel="layer")
    ax.set_yticks(range(len(labels)), labels)
    ax.figure.colorbar(image, ax=ax)
    return image


def draw_interpolation_bars(ax: Any, interpolations: Sequence[Sequence[float]], labels: Sequence[str]) -> None:
    """Horizontal bars of the mean interpolation s per layer, with the min–max over experts."""
    import numpy as np

    means = [float(np.mean(s)) for s in interpolations]
    spread = np.array([[m - min(s), max(s) - m] for m, s in zip(means, interpolations)]).T
    ax.barh(range(len(labels)), means, xerr=spread, color="tab:orange", capsize=3)
    ax.set(title="interpolation s = sigmoid(α) (mean, min–max over experts)", xlabel="s", xlim=(0, 1))
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()


def plot_routing(report: Any, path: str | os.PathLike) -> Path:
    """Expert-load heat map (when the report has loads) and interpolation bars of a
    :class:`star_hf.training.metrics.RoutingReport`."""
    plt = pyplot()
    layers = report.layers
    labels = [layer_label(r.path) for r in layers]
    with_load = any(r.load is not None for r in layers)
    fig, axes = plt.subplots(
        1, 2 if with_load else 1, figsize=(12 if with_load else 6, 0.4 * len(layers) + 2.5), squeeze=False
    )
    if with_load:
        draw_load_heatmap(axes[0][0], [r.load for r in layers], labels, "expert load (share of routed tokens)")
    draw_interpolation_bars(axes[0][-1], [r.interpolation for r in layers], labels)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(path: str | os.PathLike, panels: Sequence[dict[str, Any]], title: str) -> Path:
    """A row of line-plot panels. Each panel: ``title``, ``ylabel``, ``series`` ({label: (x, y)}) and
    optionally ``xlabel`` (default ``"step"``) and ``logy``. A label keeps its colour across panels."""
    plt = pyplot()
    labels = list(dict.fromkeys(label for panel in panels for label in panel["series"]))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (x, y) in panel["series"].items():
            ax.plot(x, y, label=label, color=colors[label], marker="o" if len(x) <= 12 else None, markersize=3)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel.get("xlabel", "step"))
        ax.set_ylabel(panel["ylabel"])
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[label], label=label) for label in labels]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, path, dpi=110)
