"""star_hf.experiments.data text tasks for the recipes: docstring SFT pairs, response-only labels, padding, T5 span corruption."""

from __future__ import annotations

import random

import pytest
import torch

from star_hf.experiments.data import (
    ByteTokenizer,
    PadCollator,
    docstring_pairs,
    make_sft_dataset,
    make_span_corruption_dataset,
    span_corruption,
)

SENTINELS = list(range(1000, 1100))


def uncorrupt(inputs: list[int], targets: list[int]) -> list[int]:
    """Put every target span back in place of its sentinel (written independently of the code under test)."""
    spans, current = {}, None
    for t in targets:
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs:
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


@pytest.mark.parametrize("n", [2, 3, 10, 57, 512])
@pytest.mark.parametrize("density", [0.15, 0.5])
def test_span_corruption_is_invertible_and_drops_the_requested_share(n, density):
    tokens = list(range(n))
    inputs, targets = span_corruption(tokens, SENTINELS, random.Random(n), noise_density=density, mean_span_length=3)
    assert uncorrupt(inputs, targets) == tokens
    used = [t for t in inputs if t in SENTINELS]
    assert used == SENTINELS[: len(used)] and [t for t in targets if t in SENTINELS] == used
    assert inputs[0] == 0  # T5 starts with kept tokens
    noise = len(targets) - len(used)
    assert noise == min(max(1, round(n * density)), n - 1)
    if n >= 57:
        assert abs(len(used) - noise / 3) <= 1  # mean span length ~3


def test_span_corruption_is_seeded_and_respects_the_sentinel_budget():
    tokens = list(range(300))
    a = span_corruption(tokens, SENTINELS, random.Random(7))
    assert a == span_corruption(tokens, SENTINELS, random.Random(7))
    assert a != span_corruption(tokens, SENTINELS, random.Random(8))
    inputs, targets = span_corruption(tokens, SENTINELS[:2], random.Random(0), noise_density=0.3)
    assert sum(t in SENTINELS for t in inputs) == 2 and uncorrupt(inputs, targets) == tokens
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_corruption([5], SENTINELS, random.Random(0))
    with pytest.raises(ValueError, match="noise_density"):
        span_corruption(tokens, SENTINELS, random.Random(0), noise_density=1.0)


def test_span_corruption_dataset_is_reproducible_text_to_text():
    tok = ByteTokenizer()
    docs = ["The quick brown fox jumps over the lazy dog. " * 8, "Pack my box with five dozen liquor jugs. " * 8]
    a = make_span_corruption_dataset(docs, tok, 40, SENTINELS, seed=3, max_examples=5)
    b = make_span_corruption_dataset(docs, tok, 40, SENTINELS, seed=3, max_examples=5)
    assert len(a) == 5 and [a[i] for i in range(5)] == [b[i] for i in range(5)]
    stream = [t for d in docs for t in tok.encode(d, add_special_tokens=True)]
    for i in range(5):
        ex = a[i]
        assert ex["input_ids"][-1] == ex["labels"][-1] == tok.eos_token_id
        assert uncorrupt(ex["input_ids"][:-1], ex["labels"][:-1]) == stream[40 * i : 40 * (i + 1)]


def test_docstring_pairs_and_response_only_labels():
    pairs = docstring_pairs(50)
    assert len(pairs) == 50 and pairs == docstring_pairs(50)
    for prompt, response in pairs:
        assert prompt.startswith(("def ", "async def ")) and prompt.endswith('):\n    """')
        assert response.endswith('"""') and len(response) > 40
    tok = ByteTokenizer()
    dataset = make_sft_dataset([("def f(x):", "Return x.")], tok, max_len=64)
    ex = dataset[0]
    prompt_len = 1 + len("def f(x):")  # bos + prompt bytes
    assert ex["input_ids"] == [tok.bos_token_id, *tok.encode("def f(x):"), *tok.encode("Return x."), tok.eos_token_id]
    assert ex["labels"] == [-100] * prompt_len + ex["input_ids"][prompt_len:]
    cut = make_sft_dataset([("def f(x):", "Return x."), ("x" * 70, "never seen")], tok, max_len=12)
    assert len(cut) == 1 and len(cut[0]["input_ids"]) == 12 and cut[0]["labels"][-2:] == cut[0]["input_ids"][-2:]
    with pytest.raises(ValueError, match="no \\(prompt, response\\) pair"):
        make_sft_dataset([("x" * 70, "y")], tok, max_len=12)


def test_pad_collator_pads_inputs_and_labels_separately():
    batch = PadCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [9]}, {"input_ids": [8], "labels": [10, 11]}]
    )
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[9, -100], [10, 11]]))
