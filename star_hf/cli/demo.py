"""``star-hf demo``: the whole STAR workflow on a small MoE, end to end (see :mod:`star_hf.experiments.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from star_hf.cli._util import cli_command, command_parser

EPILOG = """examples:
  star-hf demo                                   # a few minutes on 2 CPU cores, report in ./star_hf_demo
  star-hf demo --smoke --output-dir /tmp/demo    # every stage in seconds
  star-hf demo --hidden-size 128 --layers 4 --experts 8 --pretrain-steps 1000 --steps 500
  star-hf demo --train-file my_corpus.txt --shift-file other_domain.txt
  star-hf demo --dataset-dir my_dataset --text-column content      # a datasets save_to_disk folder
  star-hf demo --model-dir path/to/local/mixtral --seq-len 512 --batch-size 4 --bf16

Stages: data, base model (build + pretrain, or --model-dir), STAR upgrade (init="preserve" +
calibration; step-0 outputs compared), fine-tuning of the baseline and the STAR model side by side
(Trainer, same data and seed), test-time adaptation on a shifted domain, saving the STAR adapter
and a folded export, and the report: OUTPUT_DIR/report.md, results.json, loss_curves.png, routing.png.
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    from star_hf.experiments.demo_config import DemoConfig

    d = DemoConfig()
    p = command_parser(
        sub,
        name,
        help="run the STAR workflow end to end on a small MoE and write a report",
        description="Pretrain a small Mixtral-style MoE on text on this machine (or load --model-dir), upgrade it "
        "to STAR routing, fine-tune it side by side with the baseline, run test-time adaptation on a shifted "
        "domain, save the STAR adapter and a folded export, and write a report folder with tables and plots.",
        epilog=EPILOG,
    )
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", type=Path, default=d.output_dir, help=f"report folder (default {d.output_dir})")
    out.add_argument("--overwrite", action="store_true", help="replace --output-dir even if it is not a demo report")
    out.add_argument("--smoke", action="store_true", help="a minute model and a few steps: every stage in seconds")

    model = p.add_argument_group("model (a small Mixtral built here, or --model-dir)")
    model.add_argument(
        "--model-dir", type=Path, help="a local stock MoE causal-LM checkpoint to upgrade (no pretraining)"
    )
    model.add_argument(
        "--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"], help="dtype to load --model-dir in"
    )
    model.add_argument("--hidden-size", type=int, default=d.hidden_size)
    model.add_argument("--layers", type=int, default=d.layers)
    model.add_argument("--experts", type=int, default=d.experts)
    model.add_argument("--top-k", type=int, default=d.top_k, help="experts per token")
    model.add_argument("--heads", type=int, default=d.heads, help="attention heads")

    data = p.add_argument_group("data (default: Python's own docstrings; shifted domain: its source code)")
    data.add_argument("--corpus", default=d.corpus, help="built-in training text: docstrings, source or shakespeare")
    data.add_argument("--shift-corpus", default=d.shift_corpus, help="built-in shifted domain for test-time adaptation")
    data.add_argument("--train-file", type=Path, help="UTF-8 text file to train on (paragraphs are documents)")
    data.add_argument(
        "--eval-file", type=Path, help="UTF-8 text file to evaluate on (default: 5%% of the training text)"
    )
    data.add_argument("--dataset-dir", type=Path, help="a datasets dataset saved with save_to_disk (train/validation)")
    data.add_argument("--text-column", default=d.text_column, help="text column of --dataset-dir")
    data.add_argument("--shift-file", type=Path, help="UTF-8 text file of the shifted domain")
    data.add_argument("--max-chars", type=int, default=d.max_chars, help="characters of the built-in corpus to read")
    data.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    data.add_argument(
        "--eval-sequences",
        type=int,
        default=d.eval_sequences,
        help="held-out (and shifted-domain) sequences to evaluate on",
    )

    train = p.add_argument_group("training")
    train.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="0: keep the random initialisation")
    train.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr)
    train.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps of each run")
    train.add_argument("--lr", type=float, default=d.lr, help="fine-tuning learning rate (AdamW, cosine)")
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out evaluation interval (steps)")
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--bf16", action="store_true", help="bf16 mixed-precision training (the bases stay float32)")
    train.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 for the built-in small model, torch's choice with --model-dir)",
    )

    star = p.add_argument_group("STAR")
    star.add_argument("--gha-lr", type=float, default=d.gha_lr, help="GHA learning rate (paper: 5e-5)")
    star.add_argument(
        "--calibration-batches",
        type=int,
        default=d.calibration_batches,
        help="training batches for the calibration warm start",
    )
    star.add_argument("--tta-lr", type=float, default=d.tta_lr, help="GHA learning rate of test-time adaptation")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`star_hf.experiments.demo.DemoConfig` of the parsed flags (``--smoke`` shrinks the unset ones)."""
    from dataclasses import fields

    from star_hf.experiments.demo_config import DemoConfig

    values = {f.name: getattr(args, f.name) for f in fields(DemoConfig)}
    if not args.smoke:
        return DemoConfig(**values)
    default = DemoConfig()
    changed = {k: v for k, v in values.items() if v != getattr(default, k)}
    return DemoConfig.smoke(**changed)


@cli_command
def run(args: argparse.Namespace) -> int:
    from star_hf.experiments.demo import run_demo
    from star_hf.experiments.demo_config import REPORT_NAME

    results = run_demo(config_from_args(args))
    runs = results["finetune"]
    print(
        f"\nheld-out loss after fine-tuning: baseline {runs['baseline']['curve'][-1]['val_loss']:.4f}, "
        f"STAR {runs['STAR']['curve'][-1]['val_loss']:.4f}; step-0 outputs "
        f"{'unchanged' if results['step0']['unchanged'] else 'CHANGED'} by the upgrade"
    )
    print(f"report: {Path(results['output_dir']) / REPORT_NAME} ({results['total_seconds']:.0f} s)")
    return 0
