"""``star-hf fold``: turn a STAR checkpoint into a stock checkpoint any serving stack loads."""

from __future__ import annotations

import argparse

from star_hf.cli._util import (
    DTYPES,
    CliError,
    check_model_dir,
    check_new_dir,
    check_safetensors,
    cli_command,
    command_parser,
    torch_dtype,
)

EPILOG = """examples:
  star-hf fold ./mixtral-star ./mixtral-folded
  star-hf fold ./mixtral-star ./mixtral-folded --dtype bfloat16 --overwrite

Each STAR router becomes the architecture's own linear gate with W_eff = s*W + (1-s)*M B and
b_eff = s*b. The result has the stock architecture and state-dict keys: plain
transformers.AutoModelForCausalLM.from_pretrained loads it, and in eval mode it computes exactly what
the STAR model computed. The tokenizer, if IN_DIR has one, is copied along.
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = command_parser(
        sub,
        name,
        help="fold a STAR checkpoint back into a stock checkpoint",
        description="Load a STAR checkpoint with star_hf.from_pretrained, fold every STAR router into the "
        "equivalent linear gate, and save a stock Transformers checkpoint (atomically).",
        epilog=EPILOG,
    )
    p.add_argument(
        "in_dir", metavar="IN_DIR", help="STAR checkpoint folder (written by save_pretrained or star-hf upgrade)"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the stock checkpoint")
    p.add_argument("--dtype", choices=DTYPES, help="dtype to load and save the weights in (default: as saved)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(run=run)


@cli_command
def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from star_hf.patching.patcher import find_star_routers, fold
    from star_hf.persistence.io import atomic_directory
    from star_hf.persistence.loading import from_pretrained
    from star_hf.persistence.text import load_tokenizer

    in_dir = check_model_dir(args.in_dir, "STAR checkpoint")
    out_dir = check_new_dir(args.out_dir, overwrite=args.overwrite, source=in_dir)
    if not getattr(AutoConfig.from_pretrained(str(in_dir)), "star_config", None):
        raise CliError(
            f"{in_dir} is not a STAR checkpoint (its config.json has no star_config); there is nothing to fold."
        )
    check_safetensors(in_dir)
    tokenizer = load_tokenizer(in_dir, fallback="none")
    model = from_pretrained(str(in_dir), dtype=torch_dtype(args.dtype))
    count = len(find_star_routers(model))
    fold(model)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"folded {count} STAR router(s) of {type(model).__name__}; saved the stock checkpoint to {out_dir}")
    return 0
