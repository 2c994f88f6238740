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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="a local Transformers MoE checkpoint (default: build a tiny Mixtral)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--corpus", default="docstrings", help="docstrings | source | shakespeare (see star_hf.data)")
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
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(args.seed)
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(args.seq_len, 64),
        tie_word_embeddings=False,
        output_router_logits=True,  # Mixtral's load-balancing aux loss, as in fine-tuning practice
    )
    return MixtralForCausalLM(config)


def load_model_and_tokenizer(args: argparse.Namespace):
    """(patched model, tokenizer): a tiny Mixtral + ByteTokenizer, or the local checkpoint's own."""
    import star_hf
    from star_hf.data import ByteTokenizer

    star_config = star_hf.StarConfig(gha_lr=args.gha_lr, seed=args.seed)
    if args.model_dir is None:
        tokenizer = ByteTokenizer()
        return star_hf.patch_model(build_model(args, tokenizer.vocab_size), star_config), tokenizer

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    has_tokenizer = any((args.model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir) if has_tokenizer else ByteTokenizer()
    if getattr(AutoConfig.from_pretrained(args.model_dir), "star_config", None):
        model = star_hf.from_pretrained(args.model_dir)  # already patched: keep its STAR routers
    else:
        model = star_hf.patch_model(AutoModelForCausalLM.from_pretrained(args.model_dir), star_config)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise SystemExit(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{model.get_input_embeddings().num_embeddings}: put the checkpoint's tokenizer in {args.model_dir}."
        )
    return model, tokenizer


def held_out_loss(model, dataset, batch_size: int) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            ids = dataset.sequences[start : start + batch_size].to(model.device)
            total += float(model(ids, labels=ids).loss) * ids.shape[0]
            count += ids.shape[0]
    return total / count


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import Trainer, TrainingArguments

    import star_hf
    from star_hf.data import load_text_corpus, make_lm_dataset, split_documents

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
