"""Fine-tune a patched Mixtral-style MoE with the Transformers Trainer and STAR routing.

A tiny ``MixtralForCausalLM`` is built from a config (or a local checkpoint is loaded with
``--model-dir``), its routers are upgraded to STAR routers (outputs unchanged at step 0), and it is
trained on text that ships with Python (the standard library's docstrings, or ``--corpus``) with
``Trainer(..., callbacks=[star_hf.StarCallback()])``. The routing metrics (``star/...``) appear in the
Trainer's logs every ``--logging-steps``; at the end the script prints the held-out loss before and
after, the per-layer routing report, and saves the patched model (reload it with
``star_hf.from_pretrained``) plus ``routing_report.md`` / ``summary.json``.

    python recipes/finetune_trainer.py                      # a few minutes on 2 CPU cores
    python recipes/finetune_trainer.py --smoke              # seconds (CI)
    python recipes/finetune_trainer.py --hidden-size 256 --layers 4 --experts 8 --steps 2000
    python recipes/finetune_trainer.py --model-dir path/to/local/moe --seq-len 512 --bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/_recipe_args.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _recipe_args import recipe_parser

    p = recipe_parser(__doc__)
    p.add_argument("--model-dir", type=Path, help="a local Transformers MoE checkpoint (default: build a tiny Mixtral)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--corpus", default="docstrings", help="docstrings | source | shakespeare (see star_hf.experiments.data)")
    p.add_argument("--max-chars", type=int, default=400_000, help="characters of text to read")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--gha-lr", type=float, default=5e-5, help="GHA learning rate (the authors' best setting)")
    p.add_argument("--gha-schedule", default="constant", choices=["constant", "linear", "cosine"])
    p.add_argument("--logging-steps", type=int, default=25)
    p.add_argument("--save-steps", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    p.add_argument("--eval-sequences", type=int, default=64, help="held-out sequences for the loss")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the bases stay float32)")
    p.add_argument("--report-to", default="none", help="Trainer integrations, e.g. tensorboard")
    p.add_argument("--output-dir", type=Path, default=Path("runs/finetune_trainer"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps of a minute model: finishes in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden_size, args.layers, args.experts, args.steps = 32, 2, 4, 4
        args.max_chars, args.seq_len, args.batch_size, args.eval_sequences, args.logging_steps = 30_000, 32, 4, 8, 2
    if args.model_dir is not None and not args.model_dir.is_dir():
        p.error(f"--model-dir {args.model_dir} is not a directory")
    for name in ("steps", "seq_len", "batch_size", "grad_accum", "logging_steps", "eval_sequences"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build_model(args: argparse.Namespace, vocab_size: int):
    """The stock tiny Mixtral these flags describe (also the model of benchmarks/trainer_overhead.py)."""
    from _recipe_args import small_model

    return small_model(args, vocab_size)


def load_model_and_tokenizer(args: argparse.Namespace):
    """(patched model, tokenizer): a tiny Mixtral + ByteTokenizer, or the local checkpoint's own."""
    import star_hf
    from star_hf.experiments.data import load_tokenizer
    from star_hf.experiments.runs import load_checkpoint

    star_config = star_hf.StarConfig(gha_lr=args.gha_lr, seed=args.seed)
    tokenizer = load_tokenizer(args.model_dir)
    if args.model_dir is None:
        return star_hf.patch_model(build_model(args, len(tokenizer)), star_config), tokenizer
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(args.model_dir), "star_config", None):
        return star_hf.from_pretrained(args.model_dir), tokenizer  # already patched: keep its STAR routers
    try:
        model = load_checkpoint(args.model_dir, tokenizer=tokenizer)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return star_hf.patch_model(model, star_config), tokenizer


def held_out_loss(model, dataset, batch_size: int) -> float:
    from star_hf.experiments.evaluation import evaluate_causal_lm

    return evaluate_causal_lm(model, [{"input_ids": ids} for ids in dataset.sequences.split(batch_size)]).loss


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import Trainer, TrainingArguments

    import star_hf
    from star_hf.experiments.data import (
        load_text_corpus,
        make_lm_dataset,
        split_documents,
    )

    model, tokenizer = load_model_and_tokenizer(args)
    train_docs, eval_docs = split_documents(load_text_corpus(args.corpus, args.max_chars), 0.05, seed=args.seed)
    train = make_lm_dataset(train_docs, tokenizer, args.seq_len)
    held_out = make_lm_dataset(eval_docs, tokenizer, args.seq_len, max_sequences=args.eval_sequences)
    print(f"{len(star_hf.find_star_routers(model))} STAR routers; {len(train)} training and {len(held_out)} held-out "
          f"sequences of {args.seq_len} tokens from {args.corpus!r}")

    before = held_out_loss(model, held_out, args.batch_size)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.01,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or args.steps,
        bf16=args.bf16,
        report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=args.seed,
    )
    callback = star_hf.StarCallback(schedule=args.gha_schedule)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=[callback])
    trainer.train()
    after = held_out_loss(model, held_out, args.batch_size)

    final = args.output_dir / "final"
    trainer.save_model(str(final))  # a patched checkpoint: star_hf.from_pretrained(final) restores it
    report = star_hf.routing_report(model)
    (final / "routing_report.md").write_text(report.to_markdown())
    summary = {
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "held_out_perplexity_after": math.exp(after),
        "steps": trainer.state.global_step,
        "routing": report.summary(),
        "checkpoint": str(final),
    }
    (final / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"held-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(after):.1f})")
    print(report.to_markdown())
    print(f"saved {final}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
