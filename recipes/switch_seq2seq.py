"""Switch Transformers seq2seq training with STAR routers on T5-style span-corruption denoising.

What it shows: STAR on an encoder-decoder. Switch Transformers routes with a ``classifier`` gate in
the sparse layers of both stacks; star_hf patches all of them. The task is a real text-to-text task
built from text on the machine — the span corruption T5 and Switch were pretrained with
(``star_hf.experiments.data.make_span_corruption_dataset``): about 15 % of the tokens of each block of the
standard library's docstrings, in spans of mean length 3, are replaced by sentinel tokens in the
input, and the model writes the missing spans after their sentinels. Training uses
``transformers.Trainer`` with ``star_hf.StarCallback()`` (the routers' load-balancing and z losses on);
the held-out loss and the routing of every encoder and decoder router (top-1 load, coefficient of
variation, normalised entropy, interpolation s, basis health) are reported before and after, and the
model is saved as a STAR adapter plus a folded stock export.

Default: a small Switch model built here (byte vocabulary plus ``--num-sentinels`` sentinel ids;
``--layers`` encoder and as many decoder layers, every second one sparse), trained from scratch with
``StarConfig(init="paper")``. With ``--model-dir`` a pretrained checkpoint is
upgraded with ``init="preserve"`` and a ``star_hf.calibrate`` warm start (outputs unchanged, checked)
and fine-tuned; its tokenizer's ``<extra_id_N>`` tokens are the sentinels.

    python recipes/switch_seq2seq.py                  # a few minutes on 2 CPU cores
    python recipes/switch_seq2seq.py --smoke          # seconds (CI)

On a real checkpoint (GPUs):

    accelerate launch --num-processes 8 recipes/switch_seq2seq.py --model-dir /ckpts/switch-base-8 \\
        --bf16 --seq-len 512 --batch-size 16 --steps 5000 --lr 1e-4 --gha-lr 5e-5
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    add_run_arguments(p, steps=300, batch_size=16, lr=2e-3, seq_len=128, output_dir="runs/switch_seq2seq")
    p.add_argument("--noise-density", type=float, default=0.15, help="share of tokens masked out")
    p.add_argument("--mean-span-length", type=float, default=3.0, help="mean length of a masked span")
    p.add_argument("--num-sentinels", type=int, default=100, help="sentinel ids (the byte vocabulary's extension)")
    p.add_argument("--max-chars", type=int, default=400_000, help="characters of docstrings to read")
    p.add_argument("--eval-sequences", type=int, default=32, help="held-out examples")
    add_small_model_arguments(p)
    args = p.parse_args(argv)
    shrink_for_smoke(args)
    prepare_run(p, args)
    if not 0 < args.noise_density < 1 or args.mean_span_length < 1 or args.num_sentinels < 1:
        p.error("need 0 < --noise-density < 1, --mean-span-length >= 1 and --num-sentinels >= 1")
    return args


def sentinels(tokenizer, count: int) -> list[int]:
    """The tokenizer's ``<extra_id_N>`` ids (T5 / Switch tokenizers), else ids after its vocabulary."""
    extra = [f"<extra_id_{i}>" for i in range(count)]
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if all(token in vocab for token in extra):
        return [vocab[token] for token in extra]
    return [len(tokenizer) + i for i in range(count)]


def stock_model(args: argparse.Namespace, sentinel_ids: list[int]):
    """The checkpoint of ``--model-dir``, or a small Switch model with room for the sentinel ids."""
    from star_hf.experiments.runs import load_checkpoint, tiny_moe

    if args.model_dir is not None:
        model = load_checkpoint(args.model_dir, dtype=args.dtype)
        if max(sentinel_ids) >= model.config.vocab_size:
            raise SystemExit(f"{args.model_dir} embeds {model.config.vocab_size} ids; its tokenizer has no sentinels.")
        return model
    return tiny_moe(
        "switch_transformers",
        max(sentinel_ids) + 1,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_experts=args.experts,
        max_positions=max(args.seq_len, 64),
    )


def denoising_data(args: argparse.Namespace, tokenizer, sentinel_ids: list[int]):
    """Training examples, held-out batches and the collator of the span-corruption task."""
    from star_hf.experiments.data import (
        PadCollator,
        load_text_corpus,
        make_span_corruption_dataset,
        split_documents,
    )

    train_docs, eval_docs = split_documents(load_text_corpus("docstrings", args.max_chars), 0.05, seed=0)
    options = {"noise_density": args.noise_density, "mean_span_length": args.mean_span_length}
    train = make_span_corruption_dataset(train_docs, tokenizer, args.seq_len, sentinel_ids, seed=args.seed, **options)
    held = make_span_corruption_dataset(
        eval_docs,
        tokenizer,
        args.seq_len,
        sentinel_ids,
        seed=10_000 + args.seed,
        max_examples=args.eval_sequences,
        **options,
    )
    collate = PadCollator(tokenizer.pad_token_id)
    chunks = [held.examples[i : i + args.batch_size] for i in range(0, len(held), args.batch_size)]
    return train, [collate(c) for c in chunks], collate


def routing_rows(evaluation) -> list[dict]:
    """Per router: stack, top-1 load CV and normalised entropy on the held-out tokens."""
    from star_hf.training.metrics import load_statistics

    rows = []
    for path, load in evaluation.load.items():
        cv, entropy = load_statistics(load)
        rows.append(
            {
                "router": path,
                "stack": "encoder" if "encoder" in path.split(".") else "decoder",
                "load_cv": cv,
                "load_entropy": entropy,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from _recipe_args import trainer_options
    from transformers.utils import logging as hf_logging

    import star_hf
    from star_hf.experiments.data import load_tokenizer
    from star_hf.experiments.runs import (
        evaluate_seq2seq,
        export_star_model,
        logits_of,
        train_model,
    )
    from star_hf.persistence.io import atomic_directory, write_json

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.model_dir)
    sentinel_ids = sentinels(tokenizer, args.num_sentinels)
    model = stock_model(args, sentinel_ids)
    train, eval_batches, collate = denoising_data(args, tokenizer, sentinel_ids)
    step0 = None
    if args.model_dir is None:  # from scratch: the paper's initialisation
        star_hf.patch_model(model, star_hf.StarConfig(init="paper", gha_lr=args.gha_lr, seed=args.seed))
    else:  # an upgrade: outputs preserved, bases warm-started on the task's inputs
        reference = logits_of(model, eval_batches[0])
        star_hf.patch_model(model, star_hf.StarConfig(init="preserve", gha_lr=args.gha_lr, seed=args.seed))
        star_hf.calibrate(model, [collate(train.examples[: args.batch_size])])
        step0 = (logits_of(model, eval_batches[0]) - reference).abs().max().item()
    routers = star_hf.find_star_routers(model)
    print(f"{len(train)} denoising examples; {len(routers)} STAR routers: {', '.join(routers)}")

    before = evaluate_seq2seq(model, eval_batches)
    model.config.output_router_logits = True  # Switch's router z-loss and load-balancing loss in training
    record = train_model(
        model,
        train,
        star=True,
        eval_every=max(1, args.steps // 10),
        data_collator=collate,
        progress="span corruption",
        **trainer_options(args),
    )
    after = evaluate_seq2seq(model, eval_batches)
    report = star_hf.routing_report(model)
    rows = routing_rows(after)
    with atomic_directory(args.output_dir, keep_existing=True) as folder:
        checks = export_star_model(model, folder, args.output_dir, probe=eval_batches[0])
        summary = {
            "step0_max_abs_logit_diff": step0,
            "held_out_loss_before": before.loss,
            "held_out_loss_after": after.loss,
            "held_out_perplexity_after": after.perplexity,
            "routers": rows,
            "routing": report.to_dicts(),
            "seconds": record["seconds"],
            **checks,
        }
        write_json(folder / "summary.json", summary)
    print(report.to_markdown())
    for stack in ("encoder", "decoder"):
        mine = [r for r in rows if r["stack"] == stack]
        print(
            f"{stack}: {len(mine)} routers, held-out top-1 load CV {statistics.fmean(r['load_cv'] for r in mine):.3f}, "
            f"entropy {statistics.fmean(r['load_entropy'] for r in mine):.3f}"
        )
    print(
        f"held-out denoising loss {before.loss:.4f} -> {after.loss:.4f} (perplexity {after.perplexity:.2f}); reload "
        f"checks: folded {checks['folded_reload_max_abs_logit_diff']:.1e}, adapter "
        f"{checks['adapter_reload_max_abs_logit_diff']:.1e}"
        + ("" if step0 is None else f"; step-0 max |Δ logit| of the upgrade {step0:.1e}")
    )
    print(f"saved {args.output_dir / 'star_adapter'} and {args.output_dir / 'folded_model'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
