"""Command-line flags shared by the scripts in ``recipes/``, and what they turn into.

Every recipe builds its parser with :func:`recipe_parser` and takes the same run flags (model source,
length, optimisation, STAR, output, ``--smoke``) from :func:`add_run_arguments`; recipes that train
on plain text add :func:`add_text_arguments`, and those that build a small model when no checkpoint
is given add :func:`add_small_model_arguments`.
:func:`prepare_run` checks them, :func:`trainer_options` / :func:`text_options` turn them into the
keyword arguments of :func:`star_hf.experiments.runs.train_model` / :func:`star_hf.experiments.runs.lm_data`,
and :func:`base_model` / :func:`small_model` into the model to start from.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from star_hf.experiments.runs import SMOKE_SIZES

__all__ = [
    "add_run_arguments",
    "add_small_model_arguments",
    "add_text_arguments",
    "base_model",
    "prepare_run",
    "recipe_parser",
    "shrink_for_smoke",
    "small_model",
    "text_options",
    "trainer_options",
]

# What --smoke sets, for the flags a recipe has: every stage runs, in seconds (the demo's --smoke too).
SMOKE = SMOKE_SIZES


def recipe_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a recipe's docstring."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seq_len: int,
    output_dir: str,
    model_dir_help: str = "a local stock checkpoint (default: a small model built here)",
) -> None:
    """The flags every recipe has: model source, run length, optimisation, STAR, output, ``--smoke``."""
    parser.add_argument("--model-dir", type=Path, help=model_dir_help)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="--model-dir dtype"
    )
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="sequences per device and micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=lr, help="AdamW peak learning rate (cosine, 5%% warm-up)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence")
    parser.add_argument("--gha-lr", type=float, default=5e-5, help="GHA learning rate of the bases (paper: 5e-5)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the bases stay float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 without --model-dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path(output_dir))
    parser.add_argument("--smoke", action="store_true", help="a minute model and a few steps: finishes in seconds")


def add_text_arguments(parser: argparse.ArgumentParser, *, corpus: str, max_chars: int) -> None:
    """Flags of the text to train on: a :mod:`star_hf.experiments.data` corpus or a file, and the held-out part."""
    parser.add_argument("--corpus", default=corpus, help=f"star_hf.experiments.data corpus to train on (default: {corpus})")
    parser.add_argument("--train-file", type=Path, help="a UTF-8 text file to train on instead of --corpus")
    parser.add_argument("--max-chars", type=int, default=max_chars, help="characters of --corpus to read")
    parser.add_argument("--eval-sequences", type=int, default=32, help="held-out sequences")
    parser.add_argument("--eval-every", type=int, default=25, help="held-out evaluation interval (steps)")


def add_small_model_arguments(parser: argparse.ArgumentParser, *, pretrain_steps: int | None = None) -> Any:
    """The sizes of the small model built without ``--model-dir`` (and its pretraining steps); returns
    the argument group, for recipe-specific additions."""
    group = parser.add_argument_group("the small model built without --model-dir")
    if pretrain_steps is not None:
        group.add_argument(
            "--pretrain-steps", type=int, default=pretrain_steps, help="pretraining on stdlib docstrings"
        )
    group.add_argument("--hidden-size", type=int, default=64)
    group.add_argument("--layers", type=int, default=4)
    group.add_argument("--experts", type=int, default=8)
    return group


def small_model(args: argparse.Namespace, vocab_size: int, seed: int | None = None) -> Any:
    """The small Mixtral of the size flags (``--hidden-size``, ``--layers``, ``--experts``,
    ``--top-k``), fresh weights drawn under ``seed`` (default ``--seed``)."""
    from star_hf.experiments.runs import tiny_moe

    return tiny_moe(
        "mixtral",
        vocab_size,
        seed=args.seed if seed is None else seed,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        max_positions=max(args.seq_len, 64),
    )


def shrink_for_smoke(args: argparse.Namespace, **overrides: Any) -> None:
    """With ``--smoke``, set the flags of :data:`SMOKE` the recipe has (then ``overrides``)."""
    if args.smoke:
        for name, value in {**SMOKE, **overrides}.items():
            if hasattr(args, name):
                setattr(args, name, value)


def prepare_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the shared flags (``parser.error`` on a bad one) and set the torch CPU threads: 1 for the
    small built-in models (the fastest for tiny matrices, by far on a busy machine), else torch's default."""
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir} is not a Transformers checkpoint folder (no config.json)")
    if getattr(args, "train_file", None) is not None and not args.train_file.is_file():
        parser.error(f"--train-file {args.train_file} is not a file")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_sequences", "eval_every", "max_chars"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "pretrain_steps", 0) < 0:
        parser.error("--pretrain-steps must be >= 0")
    if not (math.isfinite(args.lr) and math.isfinite(args.gha_lr)) or args.lr < 0 or args.gha_lr < 0:
        parser.error("--lr and --gha-lr must be finite numbers >= 0")
    threads = args.threads if args.threads is not None else (1 if args.model_dir is None else None)
    if threads is not None:
        torch.set_num_threads(threads)


def trainer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`star_hf.experiments.runs.train_model` given by the run flags."""
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "grad_accum": args.grad_accum,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def text_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`star_hf.experiments.runs.lm_data` given by the run and text flags."""
    return {
        "seq_len": args.seq_len,
        "eval_sequences": args.eval_sequences,
        "batch_size": args.batch_size,
        "corpus": args.corpus,
        "max_chars": args.max_chars,
        "train_file": args.train_file,
    }


def base_model(args: argparse.Namespace, tokenizer: Any, model_type: str) -> Any:
    """The stock checkpoint of ``--model-dir``, or a small ``model_type`` model of the size flags,
    pretrained for ``--pretrain-steps`` on the standard library's docstrings."""
    from star_hf.experiments.runs import load_checkpoint, pretrain_tiny_moe

    if args.model_dir is not None:
        return load_checkpoint(args.model_dir, dtype=args.dtype, tokenizer=tokenizer)
    return pretrain_tiny_moe(
        model_type,
        tokenizer,
        steps=args.pretrain_steps,
        seq_len=args.seq_len,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_experts=args.experts,
    )
