"""From-scratch pretraining, linear router vs STAR router, everything else equal.

For each seed one model is initialised and copied twice: ``linear`` trains it as it is; ``star`` gets
``star_hf.patch_model(model, StarConfig(init="paper"))`` — the same linear gate W plus the
structure-aware path M B x at s = 0.5, as in the paper — and ``star_hf.StarCallback()``. Both see the
same batches in the same order with the same optimizer and schedule (``transformers.Trainer``), with
the load-balancing aux loss on. Along the way: held-out loss and perplexity, load balance (CV and
normalised entropy of the top-k load), routing fluctuation (share of held-out tokens whose top-1
expert changed since the previous evaluation) and, for STAR, the interpolation s and, at the end,
how well each basis spans the top principal subspace of its router's inputs.

Results go to ``--output-dir``: ``results.json`` (every point of every curve), ``table.md`` and
``curves.png``. ``benchmarks/tiny_lm.py`` runs the same experiment (3 seeds, several GHA learning
rates) for the figures in benchmarks/README.md; both build on ``star_hf.experiments.runs``.

    python recipes/pretrain_compare.py                    # one seed, a few minutes on 2 CPU cores
    python recipes/pretrain_compare.py --seeds 3 --gha-lr 1e-3
    python recipes/pretrain_compare.py --smoke            # seconds (CI)

At scale (GPUs): take an architecture from a checkpoint folder's config.json (its weights are not
used) or from the size flags, and real text:

    accelerate launch --num-processes 8 recipes/pretrain_compare.py --model-dir /ckpts/my-moe-config \\
        --train-file corpus.txt --seq-len 1024 --batch-size 32 --steps 20000 --lr 3e-4 --bf16
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/_recipe_args.py

VARIANTS = ("linear", "star")
FIGURES = ("val_loss", "val_ppl", "load_cv", "load_entropy", "fluctuation", "s", "alignment")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _recipe_args import (
        add_run_arguments,
        add_small_model_arguments,
        add_text_arguments,
        prepare_run,
        recipe_parser,
        shrink_for_smoke,
    )

    p = recipe_parser(__doc__)
    add_run_arguments(
        p,
        steps=300,
        batch_size=16,
        lr=2e-3,
        seq_len=128,
        output_dir="runs/pretrain_compare",
        model_dir_help="a checkpoint folder whose architecture (config.json) is pretrained from scratch",
    )
    add_text_arguments(p, corpus="docstrings", max_chars=600_000)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. seeds-1 (each: one init, both variants)")
    small = add_small_model_arguments(p)
    small.add_argument("--top-k", type=int, default=2)
    args = p.parse_args(argv)
    shrink_for_smoke(args)
    prepare_run(p, args)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def fresh_model(args: argparse.Namespace, vocab_size: int, seed: int):
    """A newly initialised model: the architecture of ``--model-dir``, or a small Mixtral."""
    import torch
    from _recipe_args import small_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model_dir is None:
        return small_model(args, vocab_size, seed)
    config = AutoConfig.from_pretrained(str(args.model_dir))
    config.output_router_logits = True  # the aux loss on, as in the paper's setting
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def final_figures(points: list[dict]) -> dict[str, float]:
    """The last evaluation, with the routing fluctuation averaged over all intervals."""
    last = dict(points[-1])
    last["fluctuation"] = statistics.fmean(p["fluctuation"] for p in points[1:])
    return {k: last[k] for k in FIGURES if last.get(k) is not None}


def table(runs: dict[str, list[dict]]) -> str:
    """Markdown: mean ± std over seeds per variant, and STAR's paired difference in held-out loss."""

    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.4f} ± {std:.4f}"

    lines = [
        "| router | " + " | ".join(FIGURES) + " | Δ val_loss vs linear (paired) |",
        "|---" * (len(FIGURES) + 2) + "|",
    ]
    for variant, records in runs.items():
        finals = [r["final"] for r in records]
        cells = [cell([f[k] for f in finals]) if k in finals[0] else "–" for k in FIGURES]
        deltas = [r["final"]["val_loss"] - b["final"]["val_loss"] for r, b in zip(records, runs["linear"])]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {cell(deltas)} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """Mean curves over seeds: held-out loss, routing fluctuation, load CV, interpolation s."""
    from star_hf.experiments.plotting import plot_curves

    panels = []
    for key, title in (
        ("val_loss", "held-out loss"),
        ("fluctuation", "routing fluctuation"),
        ("load_cv", "load CV"),
        ("s", "STAR interpolation s"),
    ):
        series = {}
        for variant, records in runs.items():
            curves = [[(p["step"], p[key]) for p in r["curve"] if p.get(key) is not None] for r in records]
            if curves[0]:
                steps = [s for s, _ in curves[0]]
                series[variant] = (steps, [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))])
        panels.append({"title": title, "ylabel": title, "series": series})
    plot_curves(path, panels, "Pretraining from scratch: linear router vs STAR (mean over seeds)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from _recipe_args import text_options, trainer_options

    import star_hf
    from star_hf.experiments.data import ByteTokenizer
    from star_hf.experiments.runs import RoutingCurve, lm_data, train_model
    from star_hf.persistence.io import atomic_directory, write_json

    tokenizer = ByteTokenizer()
    train, eval_batches = lm_data(tokenizer, **text_options(args))
    print(f"{len(train)} training sequences of {args.seq_len} tokens; {args.seeds} seed(s) × {VARIANTS}")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for seed in range(args.seeds):
        initial = fresh_model(args, tokenizer.vocab_size, seed)
        for variant in VARIANTS:
            model = copy.deepcopy(initial)
            if variant == "star":
                star_hf.patch_model(model, star_hf.StarConfig(init="paper", gha_lr=args.gha_lr, seed=seed))
            curve = RoutingCurve(eval_batches)
            options = {**trainer_options(args), "seed": seed}
            record = train_model(
                model,
                train,
                star=variant == "star",
                curve=curve,
                eval_every=args.eval_every,
                progress=f"seed {seed} {variant}",
                **options,
            )
            runs[variant].append({"seed": seed, "final": final_figures(curve.points), "curve": curve.points, **record})
            print(
                f"seed {seed} {variant}: held-out loss {curve.points[-1]['val_loss']:.4f} [{record['seconds']:.0f} s]"
            )
    markdown = table(runs)
    print(markdown)
    payload = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs}
    with atomic_directory(args.output_dir, keep_existing=True) as folder:
        write_json(folder / "results.json", payload)
        (folder / "table.md").write_text(markdown, encoding="utf-8")
        plot(runs, folder / "curves.png")
    print(f"wrote {args.output_dir}/results.json, table.md and curves.png")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
