"""Test-time subspace adaptation: API contract, exactness against a naive per-token GHA, safety."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import star_hf
from star_hf import StarConfig, find_star_routers, patch_model
from star_hf.adaptation import AdaptationActiveError
from star_hf.gha.sanger import TokenWeights, guarded_sanger_step_

from .conftest import tiny_mixtral, tiny_switch

LR = 0.05


def naive_gha(basis: torch.Tensor, tokens: list[torch.Tensor], lr: float) -> torch.Tensor:
    """The spec's update written per token: Δb_k = mean_n y_nk (x_n − Σ_{j≤k} y_nj b_j)."""
    b = basis.double()
    delta = torch.zeros_like(b)
    for x in tokens:
        x = x.double()
        y = b @ x
        for k in range(b.shape[0]):
            delta[k] += y[k] * (x - (y[: k + 1, None] * b[: k + 1]).sum(0))
    new = b + lr * delta / len(tokens)
    return new / new.norm(dim=1, keepdim=True)


def naive_router_logits(router, basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """z = s ⊙ W x + (1 − s) ⊙ M B x for a given basis (float64)."""
    s = torch.sigmoid(router.star_alpha.detach().double())[:, None]
    w = router.star_linear_weight.detach().double()
    m = router.star_mixing.detach().double()
    return x.double() @ (s * w + (1 - s) * (m @ basis.double())).t()


def test_fused_per_forward_step_equals_naive_gha_and_guards_on_device():
    g = torch.Generator().manual_seed(0)
    basis = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    x = torch.randn(2, 5, 16, generator=g)
    weight = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 0])
    got = basis.clone()
    skipped = guarded_sanger_step_(got, x, 0.1, TokenWeights.from_weights(weight))
    real = [t for t, w in zip(x.reshape(-1, 16), weight) if w]
    torch.testing.assert_close(got.double(), naive_gha(basis, real, 0.1), rtol=0, atol=1e-6)
    assert not skipped
    got = basis.clone()
    guarded_sanger_step_(got, x, 0.1)  # no weights: every token counts
    torch.testing.assert_close(got.double(), naive_gha(basis, list(x.reshape(-1, 16)), 0.1), rtol=0, atol=1e-6)
    for bad in (float("nan"), float("inf")):
        poisoned, got = x.clone(), basis.clone()
        poisoned[0, 3, 2] = bad
        assert guarded_sanger_step_(got, poisoned, 0.1, TokenWeights.from_weights(weight))
        assert torch.equal(got, basis)
    got = basis.clone()
    assert not guarded_sanger_step_(got, x, 0.1, TokenWeights.from_weights(torch.zeros(10)))
    assert torch.equal(got, basis)  # no real token: untouched, and not a non-finite skip


def test_unweighted_step_equals_the_weighted_step_when_every_token_is_real():
    # A host-resident mask without padding takes the unweighted path; a device mask keeps the weights.
    g = torch.Generator().manual_seed(1)
    basis = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    x = torch.randn(3, 5, 16, generator=g)
    weighted, unweighted = basis.clone(), basis.clone()
    guarded_sanger_step_(weighted, x, 0.1, TokenWeights.from_weights(torch.ones(15)))
    guarded_sanger_step_(unweighted, x, 0.1)
    torch.testing.assert_close(unweighted, weighted, rtol=0, atol=1e-6)
    assert not torch.equal(unweighted, basis)


def record_routers(model):
    """Per router: the inputs (pre-hook, before any update) and the logits of every forward."""
    inputs, logits, handles = {}, {}, []
    for path, router in find_star_routers(model).items():
        handles.append(router.register_forward_pre_hook(lambda m, a, p=path: inputs.setdefault(p, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())))
        handles.append(router.register_forward_hook(lambda m, a, out, p=path: logits.setdefault(p, []).append(out[0].detach().clone())))
    return inputs, logits, handles


def bases(model) -> dict[str, torch.Tensor]:
    return {p: r.star_basis.clone() for p, r in find_star_routers(model).items()}


def left_padded_batch(pad: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


@pytest.fixture
def model():
    return patch_model(tiny_mixtral(), StarConfig(gha_lr=LR))


def test_episodic_block_adapts_inside_and_restores_on_exit(model, input_ids):
    before = bases(model)
    with star_hf.test_time_adaptation(model) as handle:
        assert handle.active and handle.mode == "episodic"
        model(input_ids)
        inside = bases(model)
    assert all(not torch.equal(inside[p], before[p]) for p in before)
    assert all(torch.equal(b, before[p]) for p, b in bases(model).items())
    assert not handle.active
    model(input_ids)  # adaptation never runs outside the block
    assert all(torch.equal(b, before[p]) for p, b in bases(model).items())


def test_continual_block_keeps_the_adapted_bases(model, input_ids):
    with star_hf.test_time_adaptation(model, mode="continual"):
        model(input_ids)
        adapted = bases(model)
    after = bases(model)
    assert all(torch.equal(after[p], adapted[p]) for p in after)
    model(input_ids)
    assert all(torch.equal(b, adapted[p]) for p, b in bases(model).items())


def test_nothing_but_the_bases_changes(model, input_ids):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers() if not n.endswith("star_basis")}
    with star_hf.test_time_adaptation(model, mode="continual"):
        out = model(input_ids, labels=input_ids)  # gradients enabled: the update itself takes none
        model.generate(input_ids, max_new_tokens=2, do_sample=False)
        assert not model.training
    assert out.loss.requires_grad
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]) and p.grad is None and p.requires_grad == flags[name]
    for name, b in model.named_buffers():
        if name.endswith("star_basis"):
            assert not b.requires_grad and b.dtype == torch.float32
        else:
            assert torch.equal(b, buffers[name])


def test_update_equals_naive_gha_on_real_tokens_of_a_left_padded_batch(model):
    ids, mask = left_padded_batch()
    before = bases(model)
    inputs, logits, handles = record_routers(model)
    with star_hf.test_time_adaptation(model, mode="continual", lr=LR):
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    for path, router in find_star_routers(model).items():
        (x,) = inputs[path]
        real = [x[i] for i in range(x.shape[0]) if mask.reshape(-1)[i] == 1]
        want = naive_gha(before[path], real, LR)
        torch.testing.assert_close(router.star_basis.double(), want, rtol=0, atol=1e-5)
        # the logits of that same forward already use the updated basis
        torch.testing.assert_close(logits[path][0].double(), naive_router_logits(router, want, x), rtol=0, atol=1e-5)


def test_all_padding_forward_neither_updates_nor_counts_as_skipped(model):
    before = bases(model)
    with star_hf.test_time_adaptation(model, mode="continual"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.zeros(1, 4, dtype=torch.long))
    for path, router in find_star_routers(model).items():
        assert torch.equal(router.star_basis, before[path]) and router.star_skipped_updates == 0


def test_generate_with_cache_equals_naive_gha_step_by_step(model):
    ids, mask = left_padded_batch()
    before = bases(model)
    inputs, _, handles = record_routers(model)
    new_tokens = 4
    with star_hf.test_time_adaptation(model, mode="continual", lr=LR):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    for h in handles:
        h.remove()
    assert out.shape[1] == ids.shape[1] + new_tokens
    real_prompt = mask.reshape(-1) == 1
    for path, router in find_star_routers(model).items():
        steps = inputs[path]
        # the prompt, then one new token per row per step (the cache holds the rest)
        assert [s.shape[0] for s in steps] == [ids.numel()] + [ids.shape[0]] * (new_tokens - 1)
        want = before[path]
        want = naive_gha(want, [t for t, r in zip(steps[0], real_prompt) if r], LR)
        for step in steps[1:]:
            want = naive_gha(want, list(step), LR)
        torch.testing.assert_close(router.star_basis.double(), want, rtol=0, atol=1e-5)


def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>")


def test_pipeline_forwards_adapt_and_the_block_restores(model):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=_char_tokenizer(), device="cpu")
    before = bases(model)
    with star_hf.test_time_adaptation(model) as handle:
        pipe("hello world", max_new_tokens=3, do_sample=False)
        assert all(not torch.equal(r.star_basis, before[p]) for p, r in find_star_routers(model).items())
        handle.reset()
        assert all(torch.equal(r.star_basis, before[p]) for p, r in find_star_routers(model).items())
        pipe("again", max_new_tokens=2, do_sample=False)
    assert all(torch.equal(b, before[p]) for p, b in bases(model).items())


def test_seq2seq_routers_adapt_in_encoder_and_decoder():
    model = patch_model(tiny_switch(), StarConfig(gha_lr=LR))
    before = bases(model)
    ids = torch.randint(1, 128, (2, 6))
    with star_hf.test_time_adaptation(model, mode="continual"):
        model.generate(ids, max_new_tokens=3, do_sample=False)
    moved = {p for p, b in bases(model).items() if not torch.equal(b, before[p])}
    assert moved == set(before) and any("encoder" in p for p in moved) and any("decoder" in p for p in moved)


def test_learning_rate_and_layer_selection(model, input_ids):
    paths = list(find_star_routers(model))
    with star_hf.test_time_adaptation(model, layers=[1]) as handle:
        assert handle.paths == [paths[1]]
        assert handle.learning_rates == {paths[1]: LR}  # default: the router's own gha_lr
        before = bases(model)
        model(input_ids)
        after = bases(model)
    assert torch.equal(after[paths[0]], before[paths[0]]) and not torch.equal(after[paths[1]], before[paths[1]])
    with star_hf.test_time_adaptation(model, lr=0.0, layers=[paths[0]]) as handle:
        assert handle.paths == [paths[0]] and handle.learning_rates == {paths[0]: 0.0}
        model(input_ids)
        assert torch.allclose(find_star_routers(model)[paths[0]].star_basis, before[paths[0]], atol=1e-6)
    with pytest.raises(ValueError, match="matches no STAR router"):
        star_hf.enable_test_time_adaptation(model, layers=[7])
    with pytest.raises(ValueError, match="matches no STAR router"):
        star_hf.enable_test_time_adaptation(model, layers=["model.layers.0.mlp.experts"])


def test_exception_inside_the_block_restores_and_switches_adaptation_off(model, input_ids):
    before = bases(model)
    with pytest.raises(RuntimeError, match="request failed"):
        with star_hf.test_time_adaptation(model):
            model(input_ids)
            raise RuntimeError("request failed")
    assert all(torch.equal(b, before[p]) for p, b in bases(model).items())
    model(input_ids)
    assert all(torch.equal(b, before[p]) for p, b in bases(model).items())
    with pytest.raises(RuntimeError):
        with star_hf.test_time_adaptation(model, mode="continual"):
            raise RuntimeError("request failed")
    assert all("_star_adaptation" not in r.__dict__ for r in find_star_routers(model).values())


def test_bad_calls_raise_clear_errors_before_changing_anything(model, input_ids):
    with pytest.raises(ValueError, match="no STAR routers.*patch_model"):
        star_hf.enable_test_time_adaptation(tiny_mixtral())
    with pytest.raises(ValueError, match="mode must be one of"):
        star_hf.enable_test_time_adaptation(model, mode="per-token")
    for lr in (-1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="lr must be"):
            star_hf.enable_test_time_adaptation(model, lr=lr)
    model.train()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        star_hf.enable_test_time_adaptation(model)
    model.eval()
    assert all("_star_adaptation" not in r.__dict__ for r in find_star_routers(model).values())
    with star_hf.test_time_adaptation(model, mode="continual"):
        with pytest.raises(AdaptationActiveError, match="does not nest"):
            star_hf.enable_test_time_adaptation(model, layers=[0])
        before = bases(model)
        model(input_ids)  # the outer block is still adapting
        assert all(not torch.equal(b, before[p]) for p, b in bases(model).items())


def test_handle_reset_disable_and_context_manager(model, input_ids):
    before = bases(model)
    handle = star_hf.enable_test_time_adaptation(model, mode="continual")
    model(input_ids)
    handle.reset()  # back to the bases at enable time, still adapting
    assert all(torch.equal(b, before[p]) for p, b in bases(model).items())
    model(input_ids)
    adapted = bases(model)
    handle.disable()
    handle.disable()  # idempotent
    assert all(torch.equal(b, adapted[p]) for p, b in bases(model).items())  # continual keeps them
    with pytest.raises(RuntimeError, match="disabled"):
        handle.reset()
    with star_hf.enable_test_time_adaptation(model, mode="episodic") as again:
        model(input_ids)
        clone = copy.deepcopy(model)  # out of the handle's reach, so it does not adapt
        cloned = bases(clone)
        clone(input_ids)
        assert all(torch.equal(b, cloned[p]) for p, b in bases(clone).items())
    assert not again.active
    assert all(torch.equal(b, adapted[p]) for p, b in bases(model).items())  # episodic restored


def test_non_finite_inputs_skip_the_update_and_are_counted(model, input_ids):
    before = bases(model)
    poisoned = copy.deepcopy(model.model.embed_tokens.weight.data)
    poisoned[input_ids[0, 0]] = float("nan")
    clean = model.model.embed_tokens.weight.data.clone()
    with star_hf.test_time_adaptation(model, mode="continual"):
        model.model.embed_tokens.weight.data.copy_(poisoned)
        model(input_ids)
        model.model.embed_tokens.weight.data.copy_(clean)
        for path, router in find_star_routers(model).items():
            assert torch.equal(router.star_basis, before[path]) and torch.isfinite(router.star_basis).all()
        model(input_ids)  # a finite forward afterwards adapts normally
    with pytest.warns(RuntimeWarning, match="non-finite"):
        star_hf.router.star_router._nonfinite_warned = False
        counts = [r.star_skipped_updates for r in find_star_routers(model).values()]
    assert counts == [1, 1]
    assert all(not torch.equal(b, before[p]) and torch.isfinite(b).all() for p, b in bases(model).items())


def test_skip_counts_survive_many_forwards_and_a_move(model, input_ids, monkeypatch):
    # Per-forward skip flags are summed in groups on device; none may be lost on the way.
    poisoned = model.model.embed_tokens.weight.data.clone()
    poisoned[input_ids[0, 0]] = float("nan")
    clean = model.model.embed_tokens.weight.data.clone()
    monkeypatch.setattr(star_hf.router.star_router, "_nonfinite_warned", True)  # the warning itself is tested above
    with star_hf.test_time_adaptation(model, mode="continual"):
        for i in range(star_hf.router.star_router._SKIP_FLAGS_PER_SUM + 6):
            model.model.embed_tokens.weight.data.copy_(poisoned if i in (3, 65) else clean)
            model(input_ids)
        model.model.embed_tokens.weight.data.copy_(clean)
        model.to(torch.float32)
        assert [r.star_skipped_updates for r in find_star_routers(model).values()] == [2, 2]
        model(input_ids)
    assert [r.star_skipped_updates for r in find_star_routers(model).values()] == [2, 2]


def test_recipe_smoke_run_reports_every_domain_and_condition(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "test_time_adaptation.py"
    spec = importlib.util.spec_from_file_location("test_time_adaptation_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = recipe.main(["--smoke", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["table"] == out["table"]
    assert (tmp_path / "table.md").read_text().strip() == out["table"]
    for corpus in ("docstrings", "source"):
        rows = out["summary"][corpus]
        assert set(rows) == {"frozen"} | {f"TTA {how} (η={lr:g})" for how in ("per batch", "stream") for lr in (1e-3, 1e-2)}
        assert rows["frozen"]["drift"]["mean"] == 0 and rows["frozen"]["fluctuation"]["mean"] == 0
        assert rows["TTA stream (η=0.01)"]["drift"]["mean"] > rows["TTA per batch (η=0.01)"]["drift"]["mean"] > 0
        assert all(math.isfinite(m["mean"]) for row in rows.values() for m in row.values())
    for bad in (["--tta-lrs", "-1"], ["--seeds", "0"], ["--eval-batch-size", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            recipe.parse_args(bad)
