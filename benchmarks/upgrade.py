"""Upgrading a pretrained checkpoint: continue training with and without STAR.

A tiny ``MixtralForCausalLM`` is pretrained briefly on English text that ships with Python (the
standard library's docstrings) and saved with ``save_pretrained``. Then, per seed, the checkpoint
is loaded back three times and trained further (by default on the same corpus; ``--continue-corpus
source`` switches to Python source code) on one data stream per seed (same batches, same order,
same optimizer and schedule, Transformers ``Trainer``):

- ``linear``: the stock checkpoint, trained on;
- ``star``: ``star_hf.patch_model(model, StarConfig(init="preserve"))`` — the routers become STAR
  routers whose logits equal the originals for every input — trained with ``star_hf.StarCallback``;
- ``star + calibrate``: the same, with ``star_hf.calibrate`` first setting each basis to the top
  principal directions of the router's real inputs (still output-preserving).

Step 0 must be identical: the validation loss (and logits) of every upgraded model equal the
checkpoint's to float32 round-off; the script asserts it and reports the differences. It then
compares the validation-loss curves (PNG), final validation loss (also as a paired difference to
``linear``), routing fluctuation, load balance and the interpolation s.

Usage:
    python benchmarks/upgrade.py                        # pretrain 300 steps, 3 seeds x 3 variants x 150 steps
    python benchmarks/upgrade.py --smoke                # seconds
    python benchmarks/upgrade.py --continue-corpus source --tag source   # fine-tune on a shifted domain
    python benchmarks/upgrade.py --gha-lr 1e-3 --tag lr1e-3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

NAME = "upgrade"
VARIANTS = ("linear", "star", "star + calibrate")
# Step 0 of an output-preserving upgrade: equal to float32 round-off.
STEP0_TOLERANCE = 1e-5


def pretrain(args: argparse.Namespace, data: _common.LMData, directory: Path) -> dict:
    """Train the stock tiny model for ``--pretrain-steps`` and save it to ``directory``."""
    from star_hf.experiments.runs import RoutingCurve

    model = _common.tiny_mixtral(args, data.vocab_size, args.pretrain_seed)
    curve = RoutingCurve(data.val_batches)
    pretrain_args = argparse.Namespace(**{**vars(args), "steps": args.pretrain_steps, "lr": args.pretrain_lr})
    record = _common.train_lm(model, data.train, curve, pretrain_args, args.pretrain_seed, star=False)
    model.save_pretrained(directory)
    print(
        f"pretrained {args.pretrain_steps} steps: val loss {curve.points[0]['val_loss']:.3f} -> "
        f"{curve.points[-1]['val_loss']:.4f} [{record['seconds']:.0f} s]",
        flush=True,
    )
    return {"curve": curve.points, **record}


def load_variant(directory: Path, variant: str, args: argparse.Namespace, seed: int, calib_batches) -> torch.nn.Module:
    from transformers import MixtralForCausalLM

    import star_hf

    model = MixtralForCausalLM.from_pretrained(directory)
    if variant != "linear":
        star_hf.patch_model(model, star_hf.StarConfig(init="preserve", gha_lr=args.gha_lr, seed=seed))
    if variant == "star + calibrate":
        star_hf.calibrate(model, calib_batches)
    return model


def step0_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def run(args: argparse.Namespace) -> dict:
    from star_hf.experiments.runs import RoutingCurve

    data = _common.lm_data(args)
    after = data if args.continue_corpus in (None, args.corpus) else _common.lm_data(args, args.continue_corpus)
    calib_batches = [
        {"input_ids": after.train.sequences[j : j + args.batch_size]}
        for j in range(0, args.calibration_batches * args.batch_size, args.batch_size)
    ]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "pretrained"
        pretrained = pretrain(args, data, checkpoint)
        for seed in range(args.seeds):
            reference_logits = None
            for variant in VARIANTS:
                model = load_variant(checkpoint, variant, args, seed, calib_batches)
                logits = step0_logits(model, after.val_batches[0])
                curve = RoutingCurve(after.val_batches)
                step0 = curve.evaluate(model, 0)
                if reference_logits is None:
                    reference_logits, reference_loss = logits, step0["val_loss"]
                step0_delta = {
                    "val_loss_abs_diff": abs(step0["val_loss"] - reference_loss),
                    "logits_max_abs_diff": (logits - reference_logits).abs().max().item(),
                }
                if max(step0_delta.values()) > STEP0_TOLERANCE:
                    raise AssertionError(
                        f"step 0 of '{variant}' differs from the checkpoint beyond float32 round-off: {step0_delta}"
                    )
                record = _common.train_lm(model, after.train, curve, args, seed, star=variant != "linear")
                final = {**_common.lm_final_metrics(curve), **_common.basis_mean_diagnostics(model, after.val_batches)}
                runs[variant].append({"final": final, "step0": step0_delta, "curve": curve.points, **record})
                print(
                    f"seed {seed} {variant:>16}: step-0 |Δloss| {step0_delta['val_loss_abs_diff']:.1e} "
                    f"max|Δlogits| {step0_delta['logits_max_abs_diff']:.1e}; "
                    + _common.lm_final_line(final)
                    + f" [{record['seconds']:.0f} s]",
                    flush=True,
                )
    summary = _common.summarise(runs)
    return {
        "pretrain": pretrained,
        "runs": runs,
        "summary": summary,
        "data": {"pretrain": data.describe(), "continue": after.describe()},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(p)
    _common.add_model_args(p)
    _common.add_data_args(p)
    p.add_argument("--continue-corpus", default=None, help="corpus after the upgrade (default: --corpus)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps after the upgrade")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument(
        "--lr", type=float, default=5e-4, help="AdamW peak learning rate after the upgrade (cosine, 5%% warm-up)"
    )
    p.add_argument("--gha-lr", type=float, default=5e-5, help="GHA learning rate of the STAR variants (paper: 5e-5)")
    p.add_argument("--calibration-batches", type=int, default=4, help="batches star_hf.calibrate sees")
    p.add_argument("--eval-every", type=int, default=15)
    args = p.parse_args(argv)
    if args.smoke:
        _common.shrink_for_smoke(args)
        args.pretrain_steps, args.steps, args.eval_every, args.calibration_batches = 3, 4, 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.setup(args)
    result = run(args)
    _common.report_lm(args, NAME, result, "Continuing a pretrained tiny Mixtral: stock router vs STAR upgrade")
    return 0


if __name__ == "__main__":
    sys.exit(main())
