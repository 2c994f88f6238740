"""User text and tokenizers: the one way star_hf reads a text file and finds a checkpoint's tokenizer.

Used by calibration from the command line (``star-hf upgrade --calibration-data``) and by the
experiment machinery. A text file must be UTF-8 text: a binary file (a ``.safetensors`` passed by
mistake) is refused instead of being fed to the model as bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from star_hf.errors import CorruptFileError

__all__ = [
    "TOKENIZER_FILES",
    "ByteTokenizer",
    "LMDataset",
    "format_bytes",
    "load_tokenizer",
    "make_lm_dataset",
    "read_text_documents",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 3–258 are the bytes 0–255; 0 = pad, 1 = bos, 2 = eos.

    ``vocab_size`` (259) is the size the model's embedding needs. ``__call__`` follows the
    Transformers tokenizer convention (``{"input_ids": ..., "attention_mask": ...}``).
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 259

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        names = {self.pad_token_id: "<pad>", self.bos_token_id: "<s>", self.eos_token_id: "</s>"}
        out, pending = [], bytearray()
        for i in ids:
            if i >= self.offset:
                pending.append(i - self.offset)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(names.get(i, f"<{i}>"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, list]:
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        batch = [self.encode(t, add_special_tokens) for t in text]
        return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}


class LMDataset(torch.utils.data.Dataset):
    """Fixed-length causal-LM examples (``input_ids``, ``attention_mask``, ``labels``) from a token matrix."""

    def __init__(self, sequences: torch.Tensor) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.sequences[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def make_lm_dataset(
    documents: Sequence[str], tokenizer, seq_len: int, max_sequences: int | None = None
) -> LMDataset:
    """Concatenate the documents (each wrapped in bos/eos) and cut the stream into ``seq_len`` blocks.

    ``tokenizer`` is a :class:`ByteTokenizer` or any Transformers tokenizer; the last partial block
    is dropped. Raises ``ValueError`` if the text does not fill one block.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    stream: list[int] = []
    limit = None if max_sequences is None else max_sequences * seq_len
    for ids in tokenizer(list(documents), add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        if limit is not None and len(stream) >= limit:
            break
    n = len(stream) // seq_len if limit is None else min(len(stream) // seq_len, max_sequences)
    if n == 0:
        raise ValueError(f"the documents hold {len(stream)} tokens, fewer than one sequence of {seq_len}.")
    return LMDataset(torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len))


def load_tokenizer(model_dir: str | os.PathLike | None = None, *, fallback: Literal["bytes", "none"] = "bytes"):
    """The tokenizer saved in a checkpoint folder; for a folder without one (or no folder), star_hf's
    :class:`ByteTokenizer` (``fallback="bytes"``) or ``None`` (``fallback="none"``)."""
    if fallback not in ("bytes", "none"):
        raise ValueError(f"fallback must be 'bytes' or 'none', got {fallback!r}.")
    if model_dir is not None and any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as err:
            raise CorruptFileError(f"cannot load the tokenizer in {model_dir}: {err}") from None
    return ByteTokenizer() if fallback == "bytes" else None


def read_text_documents(path: str | os.PathLike, max_chars: int | None = None) -> list[str]:
    """The paragraphs (blocks separated by blank lines) of a UTF-8 text file, as documents.

    Reads at most ``max_chars`` characters. Raises ``FileNotFoundError`` for a missing file and
    :class:`~star_hf.errors.CorruptFileError` for a file that is not UTF-8 text or holds no text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist.")
    try:
        with open(path, encoding="utf-8", errors="strict") as handle:
            text = handle.read() if max_chars is None else handle.read(max_chars)
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{path} is not a UTF-8 text file ({err.reason} at byte {err.start}).") from None
    if "\x00" in text:
        raise CorruptFileError(f"{path} is not a text file (it holds NUL bytes).")
    documents = [d.strip("\n") for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not documents:
        raise CorruptFileError(f"text file {path} holds no text.")
    return documents


def format_bytes(num_bytes: float) -> str:
    """A size for people: ``512 B``, ``3.4 MiB``, ``1.2 GiB`` (binary units)."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
