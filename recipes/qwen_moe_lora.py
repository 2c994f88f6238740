"""LoRA fine-tuning of a Qwen-MoE model (Qwen2-MoE or Qwen3-MoE) whose routers are trainable STAR routers.

What it shows, in order:

1. a stock Qwen-MoE checkpoint: ``--model-dir``, or by default a small Qwen2-MoE (``--arch qwen3_moe``
   for Qwen3-MoE) pretrained here for ``--pretrain-steps`` on the standard library's docstrings;
2. ``star_hf.patch_model(init="preserve")`` + ``star_hf.calibrate`` (outputs unchanged, checked), then
   ``peft.get_peft_model`` with LoRA on the attention projections and on the fused experts
   (``target_parameters=["gate_up_proj", "down_proj"]``). star_hf's PEFT integration keeps the
   routers out of LoRA and trains them fully (W, b, M, α by gradient, the basis by GHA) without the
   user naming them;
3. ``transformers.Trainer`` + ``star_hf.StarCallback()`` fine-tuning on a new domain — the standard
   library's Python source code (the base has only seen English prose) — with the held-out loss and
   routing along the way;
4. ``model.save_pretrained``: the LoRA weights plus the trained STAR routers (basis included);
5. the adapter reloaded on a freshly loaded and patched base (``PeftModel.from_pretrained``) and
   compared with the trained model (logits and router tensors), and ``merge_and_unload`` +
   ``star_hf.fold`` giving a stock model with the same outputs.

    python recipes/qwen_moe_lora.py                      # a few minutes on 2 CPU cores
    python recipes/qwen_moe_lora.py --smoke              # seconds (CI)
    python recipes/qwen_moe_lora.py --arch qwen3_moe --lora-targets attention

On a real checkpoint (GPUs; launch with accelerate for several processes):

    accelerate launch --num-processes 8 recipes/qwen_moe_lora.py --model-dir /ckpts/Qwen1.5-MoE-A2.7B \\
        --dtype bfloat16 --bf16 --gradient-checkpointing --seq-len 2048 --batch-size 4 --steps 2000 \\
        --lr 2e-4 --gha-lr 5e-5 --lora-r 16 --lora-alpha 32 --train-file my_code_corpus.txt
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipes/_recipe_args.py

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_up_proj", "down_proj"]  # Transformers 5 fuses the experts into 3-D parameters


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
    add_run_arguments(p, steps=150, batch_size=16, lr=2e-3, seq_len=128, output_dir="runs/qwen_moe_lora")
    add_text_arguments(p, corpus="source", max_chars=400_000)  # the new domain: Python source code
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", nargs="+", default=["attention", "experts"], choices=["attention", "experts"])
    small = add_small_model_arguments(p, pretrain_steps=300)
    small.add_argument("--arch", default="qwen2_moe", choices=["qwen2_moe", "qwen3_moe"])
    args = p.parse_args(argv)
    shrink_for_smoke(args)
    prepare_run(p, args)
    if min(args.lora_r, args.lora_alpha) < 1:
        p.error("--lora-r and --lora-alpha must be >= 1")
    return args


def base_loader(args: argparse.Namespace, tokenizer):
    """A function returning a fresh copy of the stock base model (reloaded, or copied from memory)."""
    from _recipe_args import base_model

    from star_hf.experiments.runs import load_checkpoint

    if args.model_dir is not None:
        return lambda: load_checkpoint(args.model_dir, dtype=args.dtype, tokenizer=tokenizer)
    pretrained = base_model(args, tokenizer, args.arch)
    return lambda: copy.deepcopy(pretrained)


def lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=ATTENTION if "attention" in args.lora_targets else [],
        target_parameters=EXPERTS if "experts" in args.lora_targets else None,
    )


def router_differences(a, b) -> float:
    """Max |Δ| over the STAR tensors (W, b, M, α, B) of the routers of two models, router by router."""
    import star_hf

    worst = 0.0
    for ra, rb in zip(star_hf.find_star_routers(a).values(), star_hf.find_star_routers(b).values(), strict=True):
        for name in ("star_linear_weight", "star_mixing", "star_alpha", "star_basis"):
            worst = max(worst, (getattr(ra, name).detach() - getattr(rb, name).detach()).abs().max().item())
    return worst


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from _recipe_args import text_options, trainer_options
    from peft import PeftModel, get_peft_model
    from transformers.utils import logging as hf_logging

    import star_hf
    from star_hf.experiments.data import load_tokenizer
    from star_hf.experiments.runs import RoutingCurve, lm_data, logits_of, train_model
    from star_hf.persistence.io import atomic_directory, write_json

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.model_dir)
    fresh_base = base_loader(args, tokenizer)
    train, eval_batches = lm_data(tokenizer, **text_options(args))
    star_config = star_hf.StarConfig(init="preserve", gha_lr=args.gha_lr, seed=args.seed)

    model = fresh_base()
    reference = logits_of(model, eval_batches[0])
    star_hf.patch_model(model, star_config)
    star_hf.calibrate(model, [{"input_ids": train.sequences[: args.batch_size]}])
    step0 = (logits_of(model, eval_batches[0]) - reference).abs().max().item()
    model = get_peft_model(model, lora_config(args))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    routers = star_hf.find_star_routers(model)
    router_params = sum(p.numel() for r in routers.values() for p in r.parameters() if p.requires_grad)
    print(
        f"{type(model.base_model.model).__name__}: {len(routers)} STAR routers (step-0 max |Δ logit| {step0:.1e}); "
        f"trainable {trainable:,} of {total:,} parameters, of which {router_params:,} in the routers"
    )

    curve = RoutingCurve(eval_batches)
    record = train_model(
        model,
        train,
        star=True,
        curve=curve,
        eval_every=args.eval_every,
        progress="LoRA + STAR",
        **trainer_options(args),
    )
    trained_logits = logits_of(model, eval_batches[0])
    report = star_hf.routing_report(model)
    with atomic_directory(args.output_dir, keep_existing=True) as folder:
        model.save_pretrained(folder / "peft_adapter")

        # A fresh base, patched with the same StarConfig, then the adapter: LoRA and routers come back.
        reloaded = PeftModel.from_pretrained(star_hf.patch_model(fresh_base(), star_config), folder / "peft_adapter")
        reload_logits = (logits_of(reloaded, eval_batches[0]) - trained_logits).abs().max().item()
        reload_routers = router_differences(model, reloaded)
        stock = star_hf.fold(reloaded.merge_and_unload())
        merged_logits = (logits_of(stock, eval_batches[0]) - trained_logits).abs().max().item()
        before, after = curve.points[0], curve.points[-1]
        summary = {
            "step0_max_abs_logit_diff": step0,
            "trainable_parameters": trainable,
            "router_parameters": router_params,
            "total_parameters": total,
            "held_out_loss_before": before["val_loss"],
            "held_out_loss_after": after["val_loss"],
            "load_entropy_after": after["load_entropy"],
            "s_mean": after["s"],
            "seconds": record["seconds"],
            "routing": report.summary(),
            "reload_max_abs_logit_diff": reload_logits,
            "reload_max_abs_router_diff": reload_routers,
            "merged_folded_max_abs_logit_diff": merged_logits,
        }
        write_json(folder / "summary.json", summary)
    print(report.to_markdown())
    print(
        f"held-out loss on the new domain {before['val_loss']:.4f} -> {after['val_loss']:.4f}; adapter reloaded on a "
        f"fresh patched base: max |Δ logit| {reload_logits:.1e}, max |Δ router tensor| {reload_routers:.1e}; "
        f"merged + folded stock model: max |Δ logit| {merged_logits:.1e}"
    )
    print(f"saved {args.output_dir / 'peft_adapter'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
