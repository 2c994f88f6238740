"""Helpers shared by the evidence benchmarks (synthetic_routing, tiny_lm, upgrade): common flags,
seed aggregation (mean ± sample std), markdown tables, atomic JSON and PNG curve plots."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def add_common_args(parser: argparse.ArgumentParser, seeds: int = 3) -> None:
    parser.add_argument("--seeds", type=int, default=seeds, help="number of seeds (0 .. seeds-1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and PNG files go")
    parser.add_argument("--tag", default="", help="suffix of the result file names (keeps variants apart)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run that exercises every code path")


def setup(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)


def result_path(args: argparse.Namespace, name: str, suffix: str) -> Path:
    """``<out-dir>/<name>[_<tag>].<suffix>``."""
    return args.out_dir / f"{name}{'_' + args.tag if args.tag else ''}.{suffix}"


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for a single value) of per-seed results."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def fmt(summary: dict[str, Any], digits: int = 4) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def plot_panels(path: Path, panels: Sequence[dict[str, Any]], title: str) -> Path:
    """One PNG with a row of panels; each panel draws, per label, the mean curve over seeds and a
    ± std band. ``panels``: dicts with ``title``, ``ylabel``, ``curves`` ({label: (steps, [per-seed
    value lists])}) and optional ``logy``. A label keeps its colour across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for panel in panels for label in panel["curves"]))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (steps, per_seed) in panel["curves"].items():
            data = torch.tensor(per_seed, dtype=torch.float64)
            mean = data.mean(0)
            std = data.std(0) if data.shape[0] > 1 else torch.zeros_like(mean)
            ax.plot(steps, mean.tolist(), label=label, color=colors[label])
            ax.fill_between(steps, (mean - std).tolist(), (mean + std).tolist(), color=colors[label], alpha=0.2)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(panel["ylabel"])
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[label], label=label) for label in labels]
    fig.legend(handles=handles, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
