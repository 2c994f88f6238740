"""Helpers shared by the ``star-hf`` commands: input checks, model loading, error reporting.

Bad input (a missing folder, a non-MoE checkpoint, a corrupt file) must end in one clear line on
stderr and a non-zero exit status, never in a traceback; checks run before anything is written.
"""

from __future__ import annotations

import argparse
import functools
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPES",
    "CliError",
    "check_model_dir",
    "check_new_dir",
    "check_safetensors",
    "cli_command",
    "command_parser",
    "is_adapter_folder",
    "text_batches",
    "torch_dtype",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    from star_hf.hub.upload import HubUploadError

    # ValueError covers star_hf's own checks (NoRouterError, UnsupportedRouterError, config errors).
    return (CliError, HubUploadError, SafetensorError, OSError, ValueError)


def command_parser(
    sub: argparse._SubParsersAction, name: str, *, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A sub-command parser whose ``--help`` ends with the (pre-formatted) examples of ``epilog``."""
    return sub.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 100),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def cli_command(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the expected errors of a command's ``run`` into ``star-hf CMD: error: ...`` and exit status 1."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except _known_errors() as err:
            message = str(err) or type(err).__name__
            print(f"star-hf {args.command}: error: {message}", file=sys.stderr)
            return 1

    return wrapper


def check_model_dir(path: str, what: str = "checkpoint") -> Path:
    """A folder with a readable ``config.json``."""
    folder = Path(path)
    if not folder.exists():
        raise CliError(f"{what} folder {folder} does not exist.")
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder; expected a {what} folder (config.json + *.safetensors).")
    from star_hf.persistence.io import read_json

    config = folder / "config.json"
    if not config.is_file():
        raise CliError(
            f"{folder} has no config.json; expected a Transformers {what} folder written by save_pretrained."
        )
    read_json(config, "config")
    return folder


def is_adapter_folder(folder: Path) -> bool:
    """A STAR adapter folder (``star_hf.save_adapter`` output), as opposed to a checkpoint folder."""
    from star_hf.persistence.adapter import ADAPTER_CONFIG_NAME

    return (folder / ADAPTER_CONFIG_NAME).is_file() and not (folder / "config.json").is_file()


def check_safetensors(folder: Path) -> list[Path]:
    """Every ``*.safetensors`` file of ``folder`` has a readable header (cheap: no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = " (it has PyTorch .bin weights; star_hf reads safetensors only)" if any(folder.glob("*.bin")) else ""
        raise CliError(f"{folder} has no *.safetensors weights{extra}.")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise CliError(
                f"{file} is not a valid safetensors file ({err}); the checkpoint is corrupt or truncated."
            ) from None
    return files


def check_new_dir(path: str, *, overwrite: bool, source: Path | None = None) -> Path:
    """An output folder that does not exist yet (or may be replaced with ``--overwrite``)."""
    out = Path(path)
    if source is not None and out.resolve() == source.resolve():
        raise CliError(f"the output folder must differ from the input folder ({source}).")
    if out.exists() and not overwrite:
        raise CliError(f"{out} already exists; choose another folder or pass --overwrite to replace it.")
    if out.exists() and not out.is_dir():
        raise CliError(f"{out} exists and is not a folder.")
    if not out.resolve().parent.is_dir():
        raise CliError(f"the parent folder of {out} does not exist.")
    return out


def torch_dtype(name: str | None):
    """``--dtype`` value → what ``from_pretrained(dtype=...)`` takes (``None``: Transformers' default)."""
    import torch

    if name is None or name == "auto":
        return name
    return getattr(torch, name)


def text_batches(
    path: str,
    tokenizer: Any,
    *,
    vocab_size: int,
    num_batches: int,
    batch_size: int,
    seq_len: int,
) -> list[dict[str, Any]]:
    """Up to ``num_batches`` batches of ``batch_size`` × ``seq_len`` tokens cut from a text file.

    ``tokenizer``: the checkpoint's tokenizer, or ``None`` for star_hf's byte tokenizer. Paragraphs
    are the documents of :func:`star_hf.persistence.text.make_lm_dataset` (each wrapped in bos/eos).
    """
    import torch

    from star_hf.persistence.text import ByteTokenizer, make_lm_dataset, read_text_documents

    file = Path(path)
    # A token is rarely longer than 16 characters: read only what the batches can use.
    documents = read_text_documents(file, max_chars=16 * num_batches * batch_size * seq_len)
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    try:
        sequences = make_lm_dataset(documents, tokenizer, seq_len, max_sequences=num_batches * batch_size).sequences
    except ValueError as err:
        raise CliError(f"{file}: {err} Pass a longer file or a smaller --seq-len.") from None
    if int(sequences.max()) >= vocab_size:
        raise CliError(
            f"the tokenizer produces ids up to {int(sequences.max())} but the model's vocabulary has {vocab_size} "
            "entries; put the checkpoint's own tokenizer in its folder."
        )
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in sequences.split(batch_size)]
