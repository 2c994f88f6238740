"""Helpers shared by the benchmarks: common flags, atomic JSON results, seed aggregation (mean ±
sample std, paired differences), markdown tables, PNG curves with seed bands, and the tiny-LM data,
model and Trainer plumbing of tiny_lm.py and upgrade.py (thin wrappers over star_hf.experiments.runs)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # load/save bars would drown the per-run summary lines
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)


def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The run's flags, JSON-ready."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def result_path(args: argparse.Namespace, name: str, suffix: str) -> Path:
    """``<out-dir>/<name>[_<tag>].<suffix>``."""
    return args.out_dir / f"{name}{'_' + args.tag if args.tag else ''}.{suffix}"


@dataclass
class Variant:
    """One arm of a from-scratch comparison, built from the shared initial model of a seed."""

    name: str
    patch: bool  # upgrade the routers with star_hf.patch_model(init="paper")
    fold: bool = False  # fold them straight back: stock routers starting from STAR's initial gate
    gha_lr: float = 0.0

    @property
    def star(self) -> bool:
        """Whether the built model has STAR routers (and needs GHA steps)."""
        return self.patch and not self.fold

    def build(self, base: torch.nn.Module, seed: int) -> torch.nn.Module:
        """A deep copy of ``base`` set up as this variant (``seed`` draws STAR's M and B)."""
        import copy

        import star_hf

        model = copy.deepcopy(base)
        if self.patch:
            star_hf.patch_model(model, star_hf.StarConfig(init="paper", gha_lr=self.gha_lr, seed=seed))
            if self.fold:
                star_hf.fold(model)
        return model


def variants(gha_lrs: Sequence[float]) -> list[Variant]:
    """The stock router, the stock router started from STAR's initial gate (a control separating
    STAR's initial routing function from what it learns), and STAR at each GHA learning rate (η = 0:
    a frozen random basis, the control for GHA itself)."""
    stars = [Variant(f"star η={lr:g}", patch=True, gha_lr=lr) for lr in gha_lrs]
    return [Variant("linear", patch=False), Variant("linear, STAR init", patch=True, fold=True), *stars]


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
    from star_hf.experiments.plotting import pyplot, save_figure

    plt = pyplot()
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
    return save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- tiny causal LMs
def tiny_mixtral(args: argparse.Namespace, vocab_size: int, seed: int):
    """:func:`star_hf.experiments.runs.tiny_moe` (Mixtral) with the model flags of :func:`add_model_args`."""
    from star_hf.experiments.runs import tiny_moe

    return tiny_moe(
        "mixtral",
        vocab_size,
        seed=seed,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_experts=args.experts,
        top_k=args.top_k,
        max_positions=args.seq_len,
        aux_loss_coef=args.aux_coef,
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (experts: 2x hidden)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--aux-coef", type=float, default=1e-2, help="Mixtral router_aux_loss_coef (aux loss on)")


def train_lm(model, train_dataset, curve, args: argparse.Namespace, seed: int, star: bool) -> dict[str, Any]:
    """:func:`star_hf.experiments.runs.train_model` with the training flags of the LM benchmarks: the
    same optimizer, schedule and data order (fixed by ``seed``) for every variant of one seed."""
    from star_hf.experiments.runs import train_model

    return train_model(
        model,
        train_dataset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        star=star,
        curve=curve,
        eval_every=args.eval_every,
    )


# ----------------------------------------------------------------------------- text data
def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="docstrings", help="a star_hf.experiments.data corpus: docstrings, source, shakespeare")
    parser.add_argument("--max-chars", type=int, default=1_500_000, help="characters of the corpus to use")
    parser.add_argument(
        "--val-sequences", type=int, default=64, help="held-out sequences (also the fluctuation probes)"
    )


def shrink_for_smoke(args: argparse.Namespace) -> None:
    """A model and data small enough for a seconds-long run through every code path."""
    args.seeds, args.hidden, args.layers, args.experts = 1, 16, 1, 4
    args.seq_len, args.batch_size, args.max_chars, args.val_sequences = 32, 4, 20_000, 4


@dataclass
class LMData:
    """Fixed-length byte sequences of one corpus: a training set and held-out batches."""

    corpus: str
    vocab_size: int
    train: Any  # a torch Dataset of {"input_ids", "labels"}
    val_batches: list[dict[str, torch.Tensor]]
    train_sequences: int

    def describe(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus,
            "vocab_size": self.vocab_size,
            "train_sequences": self.train_sequences,
            "val_sequences": sum(b["input_ids"].shape[0] for b in self.val_batches),
        }


# ----------------------------------------------------------------------------- LM results
def lm_final_metrics(curve) -> dict[str, float]:
    """The figures of one LM run: last point, and fluctuation averaged over all / the later half
    of the evaluation intervals."""
    last = curve.points[-1]
    fluct = [p["fluctuation"] for p in curve.points[1:]]
    late = fluct[len(fluct) // 2 :]
    final = {
        "val_loss": last["val_loss"],
        "val_ppl": last["val_ppl"],
        "fluctuation_mean": statistics.fmean(fluct),
        "fluctuation_late": statistics.fmean(late),
        "load_cv": last["load_cv"],
        "load_entropy": last["load_entropy"],
    }
    for key in ("s", "alignment"):
        if key in last:
            final[key] = last[key]
    return final


def basis_mean_diagnostics(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """:func:`star_hf.experiments.evaluation.mean_direction` of every STAR router on ``batches``, averaged over
    layers (empty for a stock model)."""
    import star_hf
    from star_hf.experiments.evaluation import evaluate_causal_lm, mean_direction

    routers = star_hf.find_star_routers(model)
    if not routers:
        return {}
    ev = evaluate_causal_lm(model, batches, input_moments=True)
    rows = [mean_direction(r.star_basis, ev.input_moment[p], ev.input_mean[p]) for p, r in routers.items()]
    return {key: statistics.fmean(row[key] for row in rows) for key in ("mean_share", "first_row_cos")}


def lm_final_line(final: dict[str, float]) -> str:
    line = (
        f"val loss {final['val_loss']:.4f} (ppl {final['val_ppl']:.2f}) fluct {final['fluctuation_mean']:.4f}/"
        f"{final['fluctuation_late']:.4f} load cv {final['load_cv']:.3f} entropy {final['load_entropy']:.3f}"
    )
    if "s" in final:
        line += f" s {final['s']:.3f} align {final['alignment']:.2f}"
    return line


def summarise(
    runs: dict[str, list[dict[str, Any]]], paired: Sequence[str] = ("val_loss",), baseline: str = "linear"
) -> dict[str, dict[str, Any]]:
    """Mean ± std over seeds of every final figure, plus, as ``<key>_delta``, the paired difference
    of each ``paired`` figure to ``baseline`` (same seed: same data, same initial weights) — far
    less noisy than comparing the two means when seeds differ a lot."""
    summary = {}
    for name, recs in runs.items():
        summary[name] = {key: mean_std([r["final"][key] for r in recs]) for key in recs[0]["final"]}
        for key in paired:
            deltas = [r["final"][key] - b["final"][key] for r, b in zip(recs, runs[baseline])]
            summary[name][f"{key}_delta"] = mean_std(deltas)
    return summary


LM_COLUMNS = [
    ("val_loss", "val loss"),
    ("val_loss_delta", "Δ val loss vs linear (paired)"),
    ("val_ppl", "val ppl"),
    ("fluctuation_mean", "fluctuation (all)"),
    ("fluctuation_late", "fluctuation (2nd half)"),
    ("load_cv", "load CV"),
    ("load_entropy", "load entropy"),
    ("s", "mean s"),
    ("alignment", "B alignment"),
    ("first_row_cos", "|cos(B₀, mean)|"),
]


def lm_table(summary: dict[str, dict[str, Any]]) -> str:
    rows = [[name] + [fmt(s[k], 4) if k in s else "—" for k, _ in LM_COLUMNS] for name, s in summary.items()]
    return markdown_table(["router"] + [title for _, title in LM_COLUMNS], rows)


def plot_lm(runs: dict[str, list[dict[str, Any]]], path: Path, title: str, baseline: str = "linear") -> Path:
    """Validation loss, its paired difference to ``baseline`` (same seed), fluctuation, load CV and s
    over the training steps, mean ± std over seeds."""
    panels = []
    for key, panel_title, ylabel in (
        ("val_loss", "validation loss", "cross-entropy (nats/byte)"),
        ("fluctuation", "routing fluctuation", "share of top-1 changes"),
        ("load_cv", "load imbalance", "CV of top-k load (mean over layers)"),
        ("s", "STAR interpolation", "mean s = sigmoid(α)"),
    ):
        curves = {}
        for name, recs in runs.items():
            series = [[p[key] for p in r["curve"] if p.get(key) is not None] for r in recs]
            if series[0]:
                curves[name] = ([p["step"] for p in recs[0]["curve"] if p.get(key) is not None], series)
        panels.append({"title": panel_title, "ylabel": ylabel, "curves": curves})
        if key == "val_loss" and baseline in runs:
            steps = [p["step"] for p in runs[baseline][0]["curve"]]
            deltas = {
                name: (
                    steps,
                    [
                        [p["val_loss"] - q["val_loss"] for p, q in zip(r["curve"], b["curve"])]
                        for r, b in zip(recs, runs[baseline])
                    ],
                )
                for name, recs in runs.items()
                if name != baseline
            }
            panels.append(
                {"title": f"validation loss − {baseline} (same seed)", "ylabel": "Δ nats/byte", "curves": deltas}
            )
    return plot_panels(path, panels, title)


def lm_data(args: argparse.Namespace, corpus: str | None = None) -> LMData:
    """:func:`star_hf.experiments.runs.lm_data` of a corpus (default ``--corpus``) in ``--seq-len`` byte
    blocks, 5 % of its documents held out, ``--val-sequences`` of those blocks as validation batches."""
    from star_hf.experiments.data import ByteTokenizer
    from star_hf.experiments.runs import lm_data as split

    corpus = corpus or args.corpus
    tokenizer = ByteTokenizer()
    train, val_batches = split(
        tokenizer,
        seq_len=args.seq_len,
        eval_sequences=args.val_sequences,
        batch_size=args.batch_size,
        corpus=corpus,
        max_chars=args.max_chars,
    )
    return LMData(corpus, tokenizer.vocab_size, train, val_batches, len(train))


def report_lm(args: argparse.Namespace, name: str, result: dict[str, Any], title: str) -> None:
    """Print the summary table and write ``<name>.json`` (flags, every run, summary) and ``<name>.png``."""
    print(lm_table(result["summary"]))
    json_path = write_json(result_path(args, name, "json"), {"config": config_dict(args), **result})
    png_path = plot_lm(result["runs"], result_path(args, name, "png"), title)
    print(f"wrote {json_path} and {png_path}")
