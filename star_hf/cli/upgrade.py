"""``star-hf upgrade``: patch a local MoE checkpoint with STAR routers, optionally calibrate, save."""

from __future__ import annotations

import argparse
from pathlib import Path

from star_hf.cli._util import (
    DTYPES,
    CliError,
    check_model_dir,
    check_new_dir,
    check_safetensors,
    cli_command,
    command_parser,
    text_batches,
    torch_dtype,
)

EPILOG = """examples:
  star-hf upgrade ./mixtral ./mixtral-star
  star-hf upgrade ./mixtral ./mixtral-star --gha-lr 5e-5 --num-components 16 --layers 0 1 2
  star-hf upgrade ./qwen-moe ./qwen-moe-star --config star.json --dtype bfloat16
  star-hf upgrade ./mixtral ./mixtral-star --calibration-data corpus.txt --calibration-batches 16

The STAR flags override the values read from --config. With init "preserve" (the default) the
upgraded model computes exactly what the original computed; --calibration-data warm-starts each
basis from the top principal directions of real router inputs (outputs still unchanged).
"""

# StarConfig field -> the flag that sets it
_STAR_FLAGS = {
    "gha_lr": "gha_lr",
    "num_components": "num_components",
    "init": "init",
    "update": "update",
    "gha_only": "gha_only",
    "layers_to_transform": "layers",
    "target_modules": "target_modules",
    "logits_fp32": "logits_fp32",
    "seed": "seed",
}


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = command_parser(
        sub,
        name,
        help="patch a local MoE checkpoint with STAR routers and save it",
        description="Load a local Transformers MoE checkpoint, upgrade its routers to STAR routers, optionally "
        "calibrate the bases on a text file, and save the patched checkpoint (atomically).",
        epilog=EPILOG,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint folder (config.json + *.safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the patched checkpoint")
    p.add_argument("--config", metavar="JSON_FILE", help="a StarConfig as JSON (fields of star_hf.StarConfig)")
    star = p.add_argument_group("STAR configuration (override --config)")
    star.add_argument("--gha-lr", type=float, help="GHA learning rate of the bases (default 5e-5)")
    star.add_argument("--num-components", type=int, metavar="R", help="basis size R (default: number of experts)")
    star.add_argument("--init", choices=("preserve", "paper"), help="initialisation (default: preserve)")
    star.add_argument("--update", choices=("step", "forward"), help="when GHA updates the bases (default: step)")
    star.add_argument("--gha-only", action="store_true", default=None, help="route with z = M B x alone")
    star.add_argument("--layers", type=int, nargs="+", metavar="L", help="patch only these layer indices")
    star.add_argument("--target-modules", metavar="REGEX", help="patch only routers whose path fully matches")
    star.add_argument("--logits-fp32", action="store_true", default=None, help="float32 router logits")
    star.add_argument("--seed", type=int, help="seed of the random initialisation")
    star.add_argument(
        "--allow-unverified", action="store_true", help="also patch linear routers of unverified architectures"
    )
    cal = p.add_argument_group("calibration warm start")
    cal.add_argument("--calibration-data", metavar="FILE", help="UTF-8 text file to calibrate the bases on")
    cal.add_argument("--calibration-batches", type=int, default=8, metavar="N", help="batches to run (default 8)")
    cal.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    cal.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype to load the weights in (default: Transformers' default)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(run=run)


def star_config_from_args(args: argparse.Namespace):
    """The StarConfig of --config, with the STAR flags that were given on top."""
    from star_hf.config import StarConfig
    from star_hf.persistence.io import read_json

    values = read_json(Path(args.config), "--config file") if args.config else {}
    for field, flag in _STAR_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            values[field] = value
    try:
        return StarConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CliError(f"invalid STAR configuration: {err}") from None


def _preflight(model_class: type, config, star_config, allow_unverified: bool) -> None:
    """Patch a weightless (meta-device) copy: a non-MoE or unsupported checkpoint fails before loading."""
    import copy

    import torch

    from star_hf.patching.patcher import patch_model

    build = getattr(model_class, "_from_config", None) or model_class.from_config  # concrete or Auto class
    with torch.device("meta"):
        skeleton = build(copy.deepcopy(config))
    patch_model(skeleton, copy.deepcopy(star_config), allow_unverified=allow_unverified)


@cli_command
def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from star_hf.patching.patcher import find_star_routers, patch_model
    from star_hf.persistence.io import atomic_directory
    from star_hf.persistence.loading import _model_class
    from star_hf.persistence.text import load_tokenizer
    from star_hf.training.calibration import calibrate

    model_dir = check_model_dir(args.model_dir)
    out_dir = check_new_dir(args.out_dir, overwrite=args.overwrite, source=model_dir)
    if args.calibration_batches < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise CliError("--calibration-batches and --batch-size must be >= 1 and --seq-len >= 2.")
    star_config = star_config_from_args(args)
    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "star_config", None):
        raise CliError(f"{model_dir} is already a STAR checkpoint (its config.json has star_config).")
    check_safetensors(model_dir)
    model_class = _model_class(config, None)
    _preflight(model_class, config, star_config, args.allow_unverified)
    tokenizer = load_tokenizer(model_dir, fallback="none")
    batches = None
    if args.calibration_data:
        batches = text_batches(
            args.calibration_data,
            tokenizer,
            vocab_size=config.get_text_config().vocab_size,
            num_batches=args.calibration_batches,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
        )

    model = model_class.from_pretrained(str(model_dir), dtype=torch_dtype(args.dtype), use_safetensors=True)
    patch_model(model, star_config, allow_unverified=args.allow_unverified)
    routers = find_star_routers(model)
    print(f"patched {len(routers)} router(s) of {type(model).__name__} with STAR")
    if batches is not None:
        # text_batches already cut the data to --calibration-batches; calibrate exhausts the bar.
        calibrate(model, tqdm(batches, desc="calibrating", unit="batch"))
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        print(f"calibrated the bases on {len(batches)} batch(es), {tokens} tokens of {args.calibration_data}")
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"saved the STAR checkpoint to {out_dir}")
    return 0
