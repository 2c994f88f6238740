"""star_hf.persistence.text: the one reader of user text, the byte tokenizer, the tokenizer loader."""

from __future__ import annotations

import pytest
import torch

from star_hf.errors import CorruptFileError
from star_hf.persistence.text import ByteTokenizer, format_bytes, load_tokenizer, make_lm_dataset, read_text_documents


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — 東京"
    ids = tok.encode(text, add_special_tokens=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text


def test_paragraphs_are_documents(tmp_path):
    (tmp_path / "t.txt").write_text("first paragraph\nstill first\n\n\n  \nsecond\n", encoding="utf-8")
    assert read_text_documents(tmp_path / "t.txt") == ["first paragraph\nstill first", "second"]
    assert read_text_documents(tmp_path / "t.txt", max_chars=5) == ["first"]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a UTF-8 text file"),
        (b"text\x00with a NUL", "not a text file"),
        (b"\n\n  \n", "holds no text"),
    ],
)
def test_binary_or_empty_files_are_refused(tmp_path, content, match):
    (tmp_path / "f.txt").write_bytes(content)
    with pytest.raises(CorruptFileError, match=match):
        read_text_documents(tmp_path / "f.txt")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text_documents(tmp_path / "none.txt")


def test_load_tokenizer_fallbacks(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert load_tokenizer(tmp_path, fallback="none") is None
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="fallback"):
        load_tokenizer(tmp_path, fallback="spaces")


def test_lm_blocks_cut_the_stream():
    data = make_lm_dataset(["ab", "cd"], ByteTokenizer(), seq_len=4)
    assert data.sequences.tolist() == [[1, 100, 101, 2], [1, 102, 103, 2]]  # bos a b eos, bos c d eos
    data = make_lm_dataset(["ab", "cd"], ByteTokenizer(), seq_len=5)
    assert data.sequences.tolist() == [[1, 100, 101, 2, 1]]  # the partial block is dropped
    with pytest.raises(ValueError, match="fewer than one sequence"):
        make_lm_dataset(["a"], ByteTokenizer(), seq_len=8)


@pytest.mark.parametrize(
    "n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (5 * 2**20, "5.0 MiB"), (3 * 2**40, "3.0 TiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text
