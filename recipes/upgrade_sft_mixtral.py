"""Upgrade a Mixtral-family checkpoint to STAR routing and fine-tune it on prompt/response pairs (SFT).

What it shows, in order:

1. a stock MoE checkpoint: ``--model-dir`` (any local Mixtral-family causal LM; the demo's
   ``star_hf_demo/base_model`` works too), or by default a small Mixtral pretrained here for
   ``--pretrain-steps`` on the standard library's docstrings (offline, no hub);
2. the upgrade: ``star_hf.patch_model(model, StarConfig(init="preserve"))`` and a
   ``star_hf.calibrate`` warm start of the bases on the SFT inputs; the outputs are checked to be
   unchanged (max |Δ logit| printed);
3. supervised fine-tuning with ``transformers.Trainer`` and ``star_hf.StarCallback()``; the loss is
   on the response tokens only (prompt tokens carry label -100, see ``star_hf.experiments.data.make_sft_dataset``);
4. the held-out response loss and the routing (load balance, fluctuation, s) before and after;
5. ``star_hf.save_adapter`` (the STAR routers) and a folded stock export (``star_hf.fold`` +
   ``save_pretrained``) in ``--output-dir``, each reloaded and compared with the trained model.

Data: (prompt, response) pairs from the standard library's public functions
(``star_hf.experiments.data.docstring_pairs``): the prompt is ``def name(args):`` plus the opening quotes of the
docstring, the response is the docstring — a "document this function" task with real English answers.
5 % of the pairs are held out.

    python recipes/upgrade_sft_mixtral.py                 # a few minutes on 2 CPU cores
    python recipes/upgrade_sft_mixtral.py --smoke         # seconds (CI)
    python recipes/upgrade_sft_mixtral.py --model-dir star_hf_demo/base_model

On a real checkpoint (GPUs; the Trainer places the model, accelerate launches several processes —
STAR's statistics are all-reduced across ranks, so every rank keeps the same bases):

    accelerate launch --num-processes 8 recipes/upgrade_sft_mixtral.py \\
        --model-dir /ckpts/Mixtral-8x7B-v0.1 --dtype bfloat16 --bf16 --gradient-checkpointing \\
        --seq-len 1024 --batch-size 2 --grad-accum 8 --steps 1000 --lr 1e-5 --max-pairs 20000

(full fine-tuning of 8x7B needs FSDP or DeepSpeed ZeRO-3 through ``accelerate config``; see the
README's notes on distributed training.)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/_recipe_args.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _recipe_args import (
        add_run_arguments,
        add_small_model_arguments,
        prepare_run,
        recipe_parser,
        shrink_for_smoke,
    )

    p = recipe_parser(__doc__)
    add_run_arguments(p, steps=150, batch_size=16, lr=5e-4, seq_len=192, output_dir="runs/upgrade_sft_mixtral")
    p.add_argument("--max-pairs", type=int, default=6000, help="(prompt, response) pairs to read")
    p.add_argument("--eval-every", type=int, default=25, help="held-out evaluation interval (steps)")
    p.add_argument("--calibration-batches", type=int, default=4, help="batches for the calibration warm start")
    add_small_model_arguments(p, pretrain_steps=300)
    args = p.parse_args(argv)
    shrink_for_smoke(args, seq_len=96, max_pairs=120, calibration_batches=1)
    prepare_run(p, args)
    if args.max_pairs < 20 or args.calibration_batches < 1:
        p.error("--max-pairs must be >= 20 and --calibration-batches >= 1")
    return args


def sft_data(args: argparse.Namespace, tokenizer):
    """Training examples, held-out batches and the collator of response-only-loss SFT pairs, and a
    held-out prompt."""
    from star_hf.experiments.data import (
        PadCollator,
        docstring_pairs,
        make_sft_dataset,
        split_documents,
    )

    train_pairs, eval_pairs = split_documents(docstring_pairs(args.max_pairs), eval_fraction=0.05, seed=0)
    train = make_sft_dataset(train_pairs, tokenizer, args.seq_len)
    held_out = make_sft_dataset(eval_pairs, tokenizer, args.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PadCollator(pad)
    chunks = [held_out.examples[i : i + args.batch_size] for i in range(0, len(held_out), args.batch_size)]
    return train, [collate(c) for c in chunks], collate, eval_pairs[0][0]


def generate_sample(model, tokenizer, prompt: str, new_tokens: int = 80) -> str:
    """Greedy continuation of ``prompt`` (what the fine-tuned model writes as a docstring)."""
    import torch

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = torch.cat([torch.tensor([[bos]], device=ids.device), ids], dim=1)
    new_tokens = max(1, min(new_tokens, model.config.max_position_embeddings - ids.shape[1]))
    model.eval()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from _recipe_args import base_model, trainer_options
    from transformers.utils import logging as hf_logging

    import star_hf
    from star_hf.experiments.data import load_tokenizer
    from star_hf.experiments.runs import (
        RoutingCurve,
        export_star_model,
        logits_of,
        train_model,
    )
    from star_hf.persistence.io import atomic_directory, write_json

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.model_dir)
    model = base_model(args, tokenizer, "mixtral")
    train, eval_batches, collate, prompt = sft_data(args, tokenizer)
    print(f"{len(train)} training and {sum(len(b['input_ids']) for b in eval_batches)} held-out SFT pairs")

    reference = logits_of(model, eval_batches[0])
    star_hf.patch_model(model, star_hf.StarConfig(init="preserve", gha_lr=args.gha_lr, seed=args.seed))
    calibration = [
        collate(train.examples[i * args.batch_size : (i + 1) * args.batch_size])
        for i in range(args.calibration_batches)
    ]
    star_hf.calibrate(model, calibration)
    step0 = (logits_of(model, eval_batches[0]) - reference).abs().max().item()
    print(f"upgraded {len(star_hf.find_star_routers(model))} routers; step-0 max |Δ logit| {step0:.1e}")

    curve = RoutingCurve(eval_batches)
    record = train_model(
        model,
        train,
        star=True,
        curve=curve,
        eval_every=args.eval_every,
        data_collator=collate,
        progress="SFT",
        **trainer_options(args),
    )
    before, after = curve.points[0], curve.points[-1]
    sample = generate_sample(model, tokenizer, prompt)
    report = star_hf.routing_report(model)
    with atomic_directory(args.output_dir, keep_existing=True) as folder:
        checks = export_star_model(model, folder, args.output_dir, probe=eval_batches[0])
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder / "folded_model")
        summary = {
            "step0_max_abs_logit_diff": step0,
            "response_loss_before": before["val_loss"],
            "response_loss_after": after["val_loss"],
            "response_perplexity_after": math.exp(after["val_loss"]),
            "load_entropy_before": before["load_entropy"],
            "load_entropy_after": after["load_entropy"],
            "fluctuation": [p["fluctuation"] for p in curve.points[1:]],
            "s_mean": after["s"],
            "seconds": record["seconds"],
            "routing": report.summary(),
            "sample": {"prompt": prompt, "completion": sample},
            **checks,
        }
        write_json(folder / "summary.json", summary)
    print(report.to_markdown())
    print(
        f"held-out response loss {before['val_loss']:.4f} -> {after['val_loss']:.4f} "
        f"(perplexity {summary['response_perplexity_after']:.2f}); load entropy {before['load_entropy']:.3f} -> "
        f"{after['load_entropy']:.3f}; reload checks: folded {checks['folded_reload_max_abs_logit_diff']:.1e}, "
        f"adapter {checks['adapter_reload_max_abs_logit_diff']:.1e}"
    )
    print(f"sample:\n{prompt}{sample}")
    print(f"saved {args.output_dir / 'star_adapter'} and {args.output_dir / 'folded_model'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
