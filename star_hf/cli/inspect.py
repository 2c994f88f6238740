"""``star-hf inspect``: the STAR config and routing report of a STAR checkpoint or adapter folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from star_hf.cli._util import (
    CliError,
    check_model_dir,
    check_safetensors,
    cli_command,
    command_parser,
    is_adapter_folder,
    text_batches,
)

EPILOG = """examples:
  star-hf inspect ./mixtral-star
  star-hf inspect ./mixtral-star --data corpus.txt --batches 4 --plot routing.png
  star-hf inspect ./star-adapter
  star-hf inspect ./star-adapter --base-model ./mixtral --data corpus.txt

Prints the STAR config and one row per router: experts E, components R, mean interpolation s, basis
orthonormality error ||B B^T - I||_F and, with --data, the expert load (tokens, coefficient of
variation, normalised entropy) over a few batches of the text file, run in eval mode. --plot writes
a per-layer expert-load heat map (with --data) and a bar chart of the interpolation s per layer.
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = command_parser(
        sub,
        name,
        help="print the STAR config and a routing report of a checkpoint or adapter",
        description="Show the STAR configuration and per-router routing metrics of a STAR checkpoint or STAR "
        "adapter folder; optionally measure the expert load on a text file and plot it.",
        epilog=EPILOG,
    )
    p.add_argument("dir", metavar="DIR", help="STAR checkpoint folder or STAR adapter folder")
    p.add_argument("--data", metavar="FILE", help="UTF-8 text file to measure the expert load on")
    p.add_argument("--batches", type=int, default=4, help="batches of --data to run (default 4)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--base-model", metavar="MODEL_DIR", help="base checkpoint of an adapter folder (needed for --data)")
    p.add_argument("--plot", metavar="FILE.png", help="write the expert-load heat map and interpolation bar chart")
    p.set_defaults(run=run)


def _load_model(folder: Path, base_model: str | None):
    """A patched model from a STAR checkpoint, or from a base checkpoint plus an adapter folder."""
    from transformers import AutoConfig

    from star_hf.persistence.adapter import load_adapter
    from star_hf.persistence.loading import _model_class, from_pretrained

    if is_adapter_folder(folder):
        base_dir = check_model_dir(base_model, "base checkpoint")
        check_safetensors(base_dir)
        base = _model_class(AutoConfig.from_pretrained(str(base_dir)), None).from_pretrained(
            str(base_dir), use_safetensors=True
        )
        return load_adapter(base, folder), base_dir
    check_model_dir(str(folder), "STAR checkpoint")
    if not getattr(AutoConfig.from_pretrained(str(folder)), "star_config", None):
        raise CliError(
            f"{folder} is not a STAR checkpoint (its config.json has no star_config); upgrade it first with "
            "`star-hf upgrade`."
        )
    check_safetensors(folder)
    return from_pretrained(str(folder)), folder


def _measure_load(model, batches) -> None:
    """Run ``batches`` in eval mode with a RoutingMonitor attached (it stays attached for the report)."""
    import torch
    from tqdm.auto import tqdm

    from star_hf.training.metrics import RoutingMonitor

    RoutingMonitor(model)
    model.eval()
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    with torch.no_grad():
        for batch in tqdm(batches, desc="measuring expert load", unit="batch"):
            if encoder_decoder:
                batch = {
                    **batch,
                    "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["input_ids"]),
                }
            model(**batch)


def _print_report(star_config: dict, report) -> None:
    print("STAR config:")
    print(json.dumps(star_config, indent=2, sort_keys=True))
    print(f"\nrouting report ({len(report.layers)} router(s)):")
    print(report.to_markdown())
    loaded = [r for r in report.layers if r.load is not None]
    if loaded:
        print("expert load (share of routed tokens per expert):")
        for r in loaded:
            total = sum(r.load) or 1.0
            print(f"  {r.path}: " + " ".join(f"{c / total:.3f}" for c in r.load))


@cli_command
def run(args: argparse.Namespace) -> int:
    from star_hf.experiments.plotting import plot_routing
    from star_hf.hub.card import adapter_routing_report
    from star_hf.persistence.text import load_tokenizer

    folder = Path(args.dir)
    if not folder.is_dir():
        raise CliError(f"folder {folder} does not exist.")
    if args.batches < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise CliError("--batches and --batch-size must be >= 1 and --seq-len >= 2.")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise CliError(f"--plot writes a PNG file; got {args.plot!r}.")
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise CliError(f"the folder of --plot {args.plot} does not exist.")
    if is_adapter_folder(folder) and args.base_model is None:
        if args.data:
            raise CliError("measuring the expert load of an adapter needs its base model: pass --base-model MODEL_DIR.")
        star_config, report = adapter_routing_report(folder)
    else:
        from star_hf.training.metrics import routing_report

        model, tokenizer_dir = _load_model(folder, args.base_model)
        if args.data:
            config = model.config
            batches = text_batches(
                args.data,
                load_tokenizer(tokenizer_dir, fallback="none"),
                vocab_size=config.get_text_config().vocab_size,
                num_batches=args.batches,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
            )
            _measure_load(model, batches)
        report = routing_report(model)
        star_config = model.config.star_config
    _print_report(star_config, report)
    if args.plot:
        plot_routing(report, Path(args.plot))
        print(f"\nwrote {args.plot}")
    return 0
