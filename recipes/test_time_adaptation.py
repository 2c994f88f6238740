"""Test-time subspace adaptation under a domain shift: English prose → Python source code.

For each seed a small Mixtral-style LM (byte vocabulary, built from a config) is patched with STAR
routers and trained on English prose — the docstrings of Python's standard library — with the
``Trainer`` and ``star_hf.StarCallback`` (one GHA update per optimizer step). ``--model-dir`` takes a
STAR checkpoint trained elsewhere (evaluated as it is) or a stock one (patched, then trained here). Held-out batches
of the training domain and of a clearly different one — the standard library's source code — are
then evaluated three ways:

* ``frozen``: plain inference, the bases as trained;
* ``TTA per batch``: ``star_hf.test_time_adaptation`` with a reset before every batch, so each
  batch's forward updates the bases from its own real tokens (before its logits) and the next batch
  starts from the trained bases again (one episode per request);
* ``TTA stream``: one adaptation block over the whole evaluation stream: the bases keep tracking the
  inputs from batch to batch (restored when the block ends).

Reported per (domain, condition), mean ± std over seeds: next-token loss; its change against the
frozen model of the same seed on the same tokens (paired, so the seed-to-seed spread cancels);
perplexity; load entropy (normalised entropy of the top-k expert load, mean over layers; 1 =
balanced); routing fluctuation (share of evaluated tokens whose top-1 expert differs from the frozen
model's on the same tokens, mean over layers); basis alignment (mean squared cosine of the principal
angles between the final bases and the top-R principal subspace of the domain's router inputs, mean
over layers); basis drift ‖B_end − B_trained‖_F (mean over layers). A markdown table is printed and
written with the JSON of every run to ``--output-dir``.

    python recipes/test_time_adaptation.py                # 3 seeds, a few minutes on 2 CPU cores
    python recipes/test_time_adaptation.py --smoke        # seconds (CI)
    python recipes/test_time_adaptation.py --tta-lrs 1e-3 1e-2 --eval-sequences 256
    python recipes/test_time_adaptation.py --model-dir runs/finetune_trainer/final  # a STAR checkpoint
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/_recipe_args.py

TRAIN_DOMAIN, SHIFTED_DOMAIN = "docstrings", "source"
DOMAIN_NAMES = {TRAIN_DOMAIN: "prose (train domain)", SHIFTED_DOMAIN: "code (shifted)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _recipe_args import (
        add_run_arguments,
        add_small_model_arguments,
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
        output_dir="runs/test_time_adaptation",
        model_dir_help="a local checkpoint: a STAR one is evaluated as it is, a stock one is patched and "
        "trained on prose first (default: a small Mixtral built here)",
    )
    # The bases must have settled on the training domain for the shift to mean something; at these
    # few steps that takes a higher GHA rate than the paper's 5e-5.
    p.set_defaults(gha_lr=1e-2)
    p.add_argument("--seeds", type=int, default=3, help="independent runs, with seeds --seed, --seed + 1, ...")
    p.add_argument("--tta-lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="test-time GHA learning rates")
    p.add_argument("--max-chars", type=int, default=600_000, help="characters read from each corpus")
    p.add_argument("--eval-sequences", type=int, default=128, help="held-out sequences per domain")
    p.add_argument("--eval-batch-size", type=int, default=8, help="sequences per evaluation forward")
    add_small_model_arguments(p)
    p.set_defaults(layers=2)
    args = p.parse_args(argv)
    shrink_for_smoke(args, seeds=1, eval_sequences=8, eval_batch_size=4)
    prepare_run(p, args)
    if args.seeds < 1 or args.eval_batch_size < 1:
        p.error("--seeds and --eval-batch-size must be >= 1")
    if any(not math.isfinite(lr) or lr < 0 for lr in args.tta_lrs):
        p.error("--tta-lrs must be finite numbers >= 0")
    return args


# ----------------------------------------------------------------------------- data and model
def load_tokenizer(args: argparse.Namespace):
    """The checkpoint's tokenizer where ``--model-dir`` has one, else star_hf's byte tokenizer."""
    from star_hf.experiments.data import ByteTokenizer

    files = ("tokenizer.json", "tokenizer_config.json")
    if args.model_dir is not None and any((args.model_dir / f).is_file() for f in files):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.model_dir)
    return ByteTokenizer()


def load_domains(args: argparse.Namespace, tokenizer) -> dict:
    """Training blocks of the prose domain and held-out batches of both domains."""
    from star_hf.experiments.runs import lm_data

    data = {"eval": {}}
    for corpus in (TRAIN_DOMAIN, SHIFTED_DOMAIN):
        train, batches = lm_data(
            tokenizer,
            seq_len=args.seq_len,
            eval_sequences=args.eval_sequences,
            batch_size=args.eval_batch_size,
            corpus=corpus,
            max_chars=args.max_chars,
        )
        data["eval"][corpus] = batches
        if corpus == TRAIN_DOMAIN:
            data["train"] = train
    return data


def _is_star_checkpoint(model_dir: Path) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(str(model_dir)), "star_config", None))


def trained_model(args: argparse.Namespace, tokenizer, train, seed: int):
    """(patched model in eval mode, record): trained on prose here, or a STAR checkpoint as it is."""
    import torch
    from _recipe_args import trainer_options

    import star_hf
    from star_hf.experiments.runs import load_checkpoint, tiny_moe, train_model

    if args.model_dir is not None and _is_star_checkpoint(args.model_dir):
        model = star_hf.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
        return model.eval(), {"checkpoint": str(args.model_dir)}
    if args.model_dir is not None:
        model = load_checkpoint(args.model_dir, dtype=args.dtype, tokenizer=tokenizer)
        init = "preserve"  # a trained gate: keep its outputs at step 0
    else:
        model = tiny_moe(
            "mixtral",
            len(tokenizer),
            seed=seed,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_experts=args.experts,
            max_positions=args.seq_len,
        )
        init = "paper"
    star_hf.patch_model(model, star_hf.StarConfig(init=init, gha_lr=args.gha_lr, seed=seed))
    options = {**trainer_options(args), "seed": seed}
    record = train_model(model, train, star=True, eval_every=max(1, args.steps // 10), **options)
    return model.eval(), {"train_seconds": record["seconds"], "train_log": record["train_log"]}


# ----------------------------------------------------------------------------- evaluation
def _per_batch_episodes(batches, handle):
    """The batches, with the bases reset to their trained values before each one is evaluated."""
    for batch in batches:
        handle.reset()
        yield batch


def _bases(model) -> dict:
    import star_hf

    return {p: r.star_basis.detach().clone() for p, r in star_hf.find_star_routers(model).items()}


def evaluate_condition(model, batches, condition: str, lr: float | None, frozen, moments) -> dict:
    """Loss and routing of ``model`` on ``batches`` under one condition (the bases are restored)."""
    import torch

    import star_hf
    from star_hf.experiments.evaluation import (
        evaluate_causal_lm,
        routing_fluctuation,
        subspace_alignment,
    )
    from star_hf.training.calibration import principal_basis
    from star_hf.training.metrics import load_statistics

    trained = _bases(model)
    if condition == "frozen":
        result, final = evaluate_causal_lm(model, batches), trained
    else:
        with star_hf.test_time_adaptation(model, lr=lr) as handle:  # episodic: restored on exit
            stream = batches if condition == "TTA stream" else _per_batch_episodes(batches, handle)
            result = evaluate_causal_lm(model, stream)
            final = _bases(model)
    paths = list(result.top1)
    alignments = [subspace_alignment(final[p], principal_basis(moments[p], final[p].shape[0])) for p in paths]
    return {
        "loss": result.loss,
        "perplexity": result.perplexity,
        "load_entropy": statistics.fmean(load_statistics(result.load[p])[1] for p in paths),
        "fluctuation": 0.0
        if frozen is None
        else statistics.fmean(routing_fluctuation(frozen.top1[p], result.top1[p]) for p in paths),
        "alignment": statistics.fmean(alignments),
        "drift": statistics.fmean(float(torch.linalg.matrix_norm(final[p] - trained[p])) for p in paths),
        "skipped_updates": sum(r.star_skipped_updates for r in star_hf.find_star_routers(model).values()),
        "_result": result,
    }


def evaluate_model(model, data: dict, tta_lrs: list[float]) -> dict:
    """Every (domain, condition) of one trained model."""
    from star_hf.experiments.evaluation import evaluate_causal_lm

    out = {}
    for corpus, batches in data["eval"].items():
        moments = evaluate_causal_lm(model, batches, input_moments=True).input_moment
        frozen = evaluate_condition(model, batches, "frozen", None, None, moments)
        rows = {"frozen": frozen}
        for lr in tta_lrs:
            for condition in ("TTA per batch", "TTA stream"):
                rows[f"{condition} (η={lr:g})"] = evaluate_condition(model, batches, condition, lr, frozen["_result"], moments)
        for row in rows.values():  # paired with the frozen model of the same seed, on the same tokens
            row["loss_change"] = row["loss"] - frozen["loss"]
        out[corpus] = {name: {k: v for k, v in row.items() if not k.startswith("_")} for name, row in rows.items()}
    return out


# ----------------------------------------------------------------------------- report
METRICS = ("loss", "loss_change", "perplexity", "load_entropy", "fluctuation", "alignment", "drift")


def summarise(runs: list[dict]) -> dict:
    """(domain → condition → metric → {mean, std, values}) over the runs."""
    summary: dict = {}
    for corpus, conditions in runs[0]["eval"].items():
        summary[corpus] = {}
        for condition in conditions:
            summary[corpus][condition] = {}
            for metric in METRICS:
                values = [run["eval"][corpus][condition][metric] for run in runs]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[corpus][condition][metric] = {"mean": statistics.fmean(values), "std": std, "values": values}
    return summary


def markdown_table(summary: dict, seeds: int) -> str:
    head = (
        "| domain | condition | loss | loss − frozen | perplexity | load entropy | fluctuation vs frozen | alignment | drift |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for corpus, conditions in summary.items():
        for condition, m in conditions.items():
            cells = []
            for k in METRICS:
                spec = "{:+.4f}" if k == "loss_change" else "{:.4f}"
                cell = spec.format(m[k]["mean"])
                cells.append(f"{cell} ± {m[k]['std']:.4f}" if seeds > 1 else cell)
            lines.append(f"| {DOMAIN_NAMES[corpus]} | {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from star_hf.persistence.io import atomic_directory, write_json

    tokenizer = load_tokenizer(args)
    data = load_domains(args, tokenizer)
    print(
        f"train: {len(data['train'])} prose sequences of {args.seq_len} tokens; eval: "
        + ", ".join(f"{sum(len(b['input_ids']) for b in batches)} {DOMAIN_NAMES[c]}" for c, batches in data["eval"].items())
    )
    runs = []
    one_run = args.model_dir is not None and _is_star_checkpoint(args.model_dir)  # nothing random to vary
    for seed in range(args.seed, args.seed + (1 if one_run else args.seeds)):
        model, record = trained_model(args, tokenizer, data["train"], seed)
        record["eval"] = evaluate_model(model, data, args.tta_lrs)
        runs.append(record)
        shifted = record["eval"][SHIFTED_DOMAIN]
        print(
            f"seed {seed}: code loss frozen {shifted['frozen']['loss']:.4f}, "
            + ", ".join(f"{k} {v['loss']:.4f}" for k, v in shifted.items() if k != "frozen"),
            flush=True,
        )
    summary = summarise(runs)
    table = markdown_table(summary, len(runs))
    print(table)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"settings": settings, "runs": runs, "summary": summary, "table": table}
    with atomic_directory(args.output_dir, keep_existing=True) as tmp:
        write_json(tmp / "results.json", payload)
        (tmp / "table.md").write_text(table + "\n")
    print(f"wrote {args.output_dir / 'results.json'} and table.md")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
