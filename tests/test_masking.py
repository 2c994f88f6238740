"""star_hf.router.masking: the attention mask of the running forward reaches the routers, and only it."""

from __future__ import annotations

import threading

import torch

from star_hf import find_star_routers, fold, patch_model
from star_hf.router.masking import current_token_weight

from .conftest import tiny_mixtral, tiny_qwen2_moe, tiny_switch


def _counts(model) -> list[float]:
    return [float(r.star_pending_statistics.count) for r in find_star_routers(model).values()]


def test_no_mask_outside_a_forward():
    assert current_token_weight(12) is None


def test_padding_is_excluded_in_a_model_with_shared_experts():
    model = patch_model(tiny_qwen2_moe()).train()
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    model(torch.randint(1, 100, (2, 8)), attention_mask=mask)
    assert _counts(model) == [13.0, 13.0]


def test_encoder_padding_is_excluded_in_a_seq2seq_model():
    model = patch_model(tiny_switch()).train()
    ids = torch.randint(1, 100, (2, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])  # T5-style right padding
    model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
    encoder, decoder = (r for p, r in find_star_routers(model).items())
    assert float(encoder.star_pending_statistics.count) == 13.0
    assert float(decoder.star_pending_statistics.count) == 8.0  # the decoder inputs carry no mask


def test_masks_are_per_thread():
    model = patch_model(tiny_mixtral()).train()
    counts: dict[str, list[float]] = {}

    def run(name: str, mask: torch.Tensor) -> None:
        copy = patch_model(tiny_mixtral()).train()
        copy.load_state_dict(model.state_dict())
        copy(torch.randint(1, 100, mask.shape), attention_mask=mask)
        counts[name] = _counts(copy)

    threads = [
        threading.Thread(target=run, args=("half", torch.tensor([[0, 0, 0, 1, 1, 1]]))),
        threading.Thread(target=run, args=("full", torch.ones(1, 6, dtype=torch.long))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == {"half": [3.0, 3.0], "full": [6.0, 6.0]}


def test_fold_removes_the_mask_hooks():
    stock = tiny_mixtral()
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in stock.modules())
    model = patch_model(tiny_mixtral())
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) > hooks
    fold(model)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
