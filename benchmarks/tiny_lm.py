"""Tiny Mixtral-style LM on real text: linear router vs STAR, everything else equal.

A small ``MixtralForCausalLM`` (built from a config, byte-level vocabulary) is trained from scratch
on English text that ships with Python (the standard library's docstrings, via ``star_hf.experiments.data``).
For each seed the baseline and the STAR variants start from the same initial weights and see the
same batches in the same order, with the same optimizer and schedule, through the Transformers
``Trainer`` (the product path; STAR adds ``star_hf.StarCallback()``). Paper setting: Mixtral's aux
load-balancing loss on (``output_router_logits=True``), STAR with ``init="paper"`` (the linear gate
keeps its initial W; the structure-aware path starts at s = 0.5) and GHA learning rate 5e-5; also
η = 1e-3, and two controls: ``star η=0`` (frozen random basis: no GHA) and ``linear, STAR init``
(the stock router started from the STAR router's initial effective gate, via ``star_hf.fold``).

Measured on held-out text at regular steps: validation loss and perplexity, routing fluctuation
(share of held-out tokens whose top-1 expert changed since the previous point, mean over layers),
load balance of the top-k assignments (CV and normalised entropy, mean over layers), and for STAR
the interpolation s and, at the end, the alignment of each basis with the top-R principal subspace
of its router's actual inputs (does GHA find the structure in the allotted steps?).

Usage:
    python benchmarks/tiny_lm.py                          # 3 seeds, 5 variants, 4–8 min on 1 core
    python benchmarks/tiny_lm.py --smoke                  # seconds
    python benchmarks/tiny_lm.py --seeds 10 --gha-lrs 5e-5 --tag 10seeds
    python benchmarks/tiny_lm.py --gha-lrs 5e-5 --steps 600 --hidden 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

NAME = "tiny_lm"


def run(args: argparse.Namespace) -> dict:
    from star_hf.experiments.runs import RoutingCurve

    data = _common.lm_data(args)
    runs: dict[str, list[dict]] = {v.name: [] for v in _common.variants(args.gha_lrs)}
    for seed in range(args.seeds):
        base = _common.tiny_mixtral(args, data.vocab_size, seed)
        for variant in _common.variants(args.gha_lrs):
            model = variant.build(base, seed)
            curve = RoutingCurve(data.val_batches)
            record = _common.train_lm(model, data.train, curve, args, seed, star=variant.star)
            final = {**_common.lm_final_metrics(curve), **_common.basis_mean_diagnostics(model, data.val_batches)}
            runs[variant.name].append({"final": final, "curve": curve.points, **record})
            print(
                f"seed {seed} {variant.name:>17}: {_common.lm_final_line(final)} [{record['seconds']:.0f} s]",
                flush=True,
            )
    summary = _common.summarise(runs)
    return {"runs": runs, "summary": summary, "data": data.describe()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(p)
    _common.add_model_args(p)
    _common.add_data_args(p)
    p.add_argument("--steps", type=int, default=250, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine schedule, 5%% warm-up)")
    p.add_argument(
        "--gha-lrs",
        type=float,
        nargs="+",
        default=[0.0, 5e-5, 1e-3],
        help="STAR variants (paper: 5e-5; 0: frozen basis)",
    )
    p.add_argument("--eval-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.smoke:
        _common.shrink_for_smoke(args)
        args.steps, args.eval_every = 4, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.setup(args)
    result = run(args)
    _common.report_lm(args, NAME, result, "Tiny Mixtral LM on stdlib docstrings: linear router vs STAR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
