"""STAR router behaviour: logits formula, gradients, statistics, update timing, caching, precision."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import star_hf
from star_hf import StarConfig, find_star_routers, gha_step, patch_model
from star_hf.gha.sanger import GHAStatistics

from .conftest import tiny_mixtral


def capture_router_inputs(model):
    """Record what each router receives (the x the gate sees), independent of star_hf."""
    seen = {}

    def make_hook(name):
        def hook(module, args):
            seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

        return hook

    handles = [r.register_forward_pre_hook(make_hook(n)) for n, r in find_star_routers(model).items()]
    return seen, handles


def naive_logits(router, x):
    """z = s ⊙ (W x + b) + (1 − s) ⊙ (M B x), written out with per-expert interpolation."""
    w = router.star_linear_weight.detach().double()
    m = router.star_mixing.detach().double()
    b = router.star_basis.double()
    x = x.double()
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for e in range(w.shape[0]):
        s = 1 / (1 + math.exp(-float(router.star_alpha[e].detach())))
        out[:, e] = s * (x @ w[e]) + (1 - s) * (x @ (b.t() @ m[e]))
    return out


def naive_sanger(basis, x, lr):
    b, x = basis.double(), x.double()
    y = x @ b.t()
    delta = torch.zeros_like(b)
    for k in range(b.shape[0]):
        delta[k] = (y[:, k : k + 1] * (x - y[:, : k + 1] @ b[: k + 1])).mean(0)
    new = b + lr * delta
    return new / new.norm(dim=1, keepdim=True)


def test_router_logits_follow_the_star_formula(input_ids):
    model = patch_model(tiny_mixtral(), StarConfig(init="paper"))
    seen, _ = capture_router_inputs(model)
    out = model(input_ids, output_router_logits=True)
    for (name, router), logits in zip(find_star_routers(model).items(), out.router_logits):
        torch.testing.assert_close(logits.double(), naive_logits(router, seen[name][0]), rtol=1e-5, atol=1e-5)


def test_gradients_reach_w_m_alpha_but_never_the_basis(input_ids):
    model = patch_model(tiny_mixtral()).train()
    model(input_ids, labels=input_ids).loss.backward()
    for router in find_star_routers(model).values():
        for p in (router.star_linear_weight, router.star_mixing, router.star_alpha):
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert not router.star_basis.requires_grad and router.star_basis.grad is None
        assert "star_basis" not in dict(router.named_parameters())


def test_training_forward_accumulates_statistics_of_the_gate_input(input_ids):
    model = patch_model(tiny_mixtral()).train()
    seen, _ = capture_router_inputs(model)
    model(input_ids)
    model(input_ids[:, :5])
    for name, router in find_star_routers(model).items():
        x = torch.cat(seen[name])
        want = GHAStatistics.from_inputs(x, router.star_basis)
        got = router.star_pending_statistics
        assert float(got.count) == x.shape[0] == 2 * 12 + 2 * 5
        torch.testing.assert_close(got.yx, want.yx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.yy, want.yy, rtol=1e-5, atol=1e-5)


def test_gha_step_applies_the_naive_update_once_and_clears(input_ids):
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=0.05)).train()
    seen, _ = capture_router_inputs(model)
    before = {n: r.star_basis.clone() for n, r in find_star_routers(model).items()}
    model(input_ids)
    model(input_ids.flip(0))
    assert gha_step(model) == 2
    for name, router in find_star_routers(model).items():
        want = naive_sanger(before[name], torch.cat(seen[name]), 0.05)
        torch.testing.assert_close(router.star_basis.double(), want, rtol=0, atol=1e-5)
        assert router.star_pending_statistics is None
    assert gha_step(model) == 0


def test_eval_forward_collects_nothing(input_ids):
    model = patch_model(tiny_mixtral())
    with torch.no_grad():
        model(input_ids)
    assert all(r.star_pending_statistics is None for r in find_star_routers(model).values())


def test_forward_mode_updates_before_the_logits(input_ids):
    model = patch_model(tiny_mixtral(), StarConfig(update="forward", gha_lr=0.05)).train()
    seen, _ = capture_router_inputs(model)
    before = {n: r.star_basis.clone() for n, r in find_star_routers(model).items()}
    out = model(input_ids, output_router_logits=True)
    for (name, router), logits in zip(find_star_routers(model).items(), out.router_logits):
        want = naive_sanger(before[name], seen[name][0], 0.05)
        torch.testing.assert_close(router.star_basis.double(), want, rtol=0, atol=1e-5)
        # the logits of this forward already use the updated basis
        torch.testing.assert_close(logits.double(), naive_logits(router, seen[name][0]), rtol=1e-5, atol=1e-5)
        assert router.star_pending_statistics is None
    # a second forward updates the basis again before the first backward has run
    second = model(input_ids.flip(0))
    (out.logits.sum() + second.logits.sum()).backward()
    assert all(r.star_mixing.grad is not None for r in find_star_routers(model).values())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputation_does_not_change_the_update(input_ids, use_reentrant):
    plain = patch_model(tiny_mixtral(), StarConfig(gha_lr=0.05)).train()
    ckpt = patch_model(tiny_mixtral(), StarConfig(gha_lr=0.05)).train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ckpt.config.use_cache = False
    for model in (plain, ckpt):
        model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    for a, b in zip(find_star_routers(plain).values(), find_star_routers(ckpt).values()):
        assert float(a.star_pending_statistics.count) == float(b.star_pending_statistics.count) == 24
        torch.testing.assert_close(a.star_pending_statistics.yx, b.star_pending_statistics.yx)
    gha_step(plain), gha_step(ckpt)
    for a, b in zip(find_star_routers(plain).values(), find_star_routers(ckpt).values()):
        torch.testing.assert_close(a.star_basis, b.star_basis)


def test_forward_mode_with_checkpointing_updates_once_per_forward(input_ids):
    plain = patch_model(tiny_mixtral(), StarConfig(update="forward", gha_lr=0.05)).train()
    ckpt = patch_model(tiny_mixtral(), StarConfig(update="forward", gha_lr=0.05)).train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for model in (plain, ckpt):
        model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    for a, b in zip(find_star_routers(plain).values(), find_star_routers(ckpt).values()):
        torch.testing.assert_close(a.star_basis, b.star_basis)


def test_padding_is_left_out_of_the_statistics():
    model = patch_model(tiny_mixtral()).train()
    g = torch.Generator().manual_seed(5)
    real = torch.randint(0, 128, (1, 9), generator=g)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), real], dim=1)  # left padding
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], dim=1).long()
    seen, handles = capture_router_inputs(model)
    model(padded, attention_mask=mask)
    for h in handles:
        h.remove()
    for name, router in find_star_routers(model).items():
        stats = router.star_pending_statistics
        assert float(stats.count) == 9
        want = GHAStatistics.from_inputs(seen[name][0][3:], router.star_basis)
        torch.testing.assert_close(stats.yx, want.yx, rtol=1e-5, atol=1e-5)
    # the mask does not outlive its forward
    star_hf.find_star_routers(model)
    model(real)
    assert float(next(iter(find_star_routers(model).values())).star_pending_statistics.count) == 18


def test_copied_router_still_sees_the_mask():
    """PEFT's modules_to_save runs a deepcopy of the router in place of the original."""
    model = patch_model(tiny_mixtral()).train()
    layer = model.model.layers[0].mlp
    layer.gate = copy.deepcopy(layer.gate)
    model(torch.randint(0, 128, (2, 6)), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]))
    assert float(layer.gate.star_pending_statistics.count) == 10


def test_mask_padding_false_counts_every_token():
    model = patch_model(tiny_mixtral(), StarConfig(mask_padding=False)).train()
    ids = torch.randint(0, 128, (2, 6))
    model(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]))
    assert float(next(iter(find_star_routers(model).values())).star_pending_statistics.count) == 12


def test_eval_weight_is_cached_until_a_parameter_or_the_basis_changes(input_ids):
    model = patch_model(tiny_mixtral())
    router = next(iter(find_star_routers(model).values()))
    with torch.no_grad():
        w1 = router.weight
        assert router.weight is w1
        router.star_mixing.add_(0.1)
        w2 = router.weight
        assert w2 is not w1 and not torch.equal(w1, w2)
        router.star_basis.mul_(-1)
        w3 = router.weight
        assert w3 is not w2
        torch.testing.assert_close(w3, router._star_compute_effective()[0])
    # with gradients enabled the weight is recomputed so that autograd sees the parameters
    assert router.weight.requires_grad


def test_eval_cache_sees_fused_optimizer_steps(input_ids):
    # Fused AdamW (the Trainer's default) updates parameters without bumping their version counters.
    model = patch_model(tiny_mixtral())
    router = next(iter(find_star_routers(model).values()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.eval()
    with torch.no_grad():
        stale = router.weight.clone()
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(router.weight, stale)
        torch.testing.assert_close(router.weight, router._star_compute_effective()[0], rtol=0, atol=0)


def test_non_finite_inputs_skip_the_update_and_warn_once(input_ids):
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=0.1)).train()
    routers = list(find_star_routers(model).values())
    before = [r.star_basis.clone() for r in routers]
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        emb[input_ids[0, 0]] = float("nan")
    model(input_ids)
    star_hf.router.star_router._nonfinite_warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert gha_step(model) == 0
        model(input_ids)
        gha_step(model)
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    for r, b in zip(routers, before):
        assert torch.equal(r.star_basis, b) and torch.isfinite(r.star_basis).all()
        assert r.star_skipped_updates == 2


def test_autocast_keeps_basis_and_statistics_float32(input_ids):
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=0.05)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids, labels=input_ids).loss.backward()
    for r in find_star_routers(model).values():
        assert r.star_pending_statistics.yx.dtype == torch.float32
    gha_step(model)
    for r in find_star_routers(model).values():
        assert r.star_basis.dtype == torch.float32 and torch.isfinite(r.star_basis).all()


def test_bf16_model_keeps_float32_basis_and_matches_the_original(input_ids):
    original = tiny_mixtral().to(torch.bfloat16)
    ref = original(input_ids).logits.float()
    model = patch_model(copy.deepcopy(original))
    for r in find_star_routers(model).values():
        assert r.star_basis.dtype == torch.float32
        assert r.star_linear_weight.dtype == torch.bfloat16
    out = model(input_ids).logits.float()
    assert (out - ref).abs().max() < 0.1  # bf16 round-off of the re-parametrised gate
    model.to(torch.float32).to(torch.bfloat16)
    assert all(r.star_basis.dtype == torch.float32 for r in find_star_routers(model).values())


def test_float32_gate_in_bf16_model_keeps_float32_star_parameters(input_ids):
    model = tiny_mixtral().to(torch.bfloat16)
    for layer in model.model.layers:
        layer.mlp.gate.float()  # what _keep_in_fp32_modules does for fp32-protected routers
    patch_model(model)
    for r in find_star_routers(model).values():
        assert {p.dtype for p in r.parameters()} == {torch.float32}


def test_logits_fp32_option(input_ids):
    model = patch_model(tiny_mixtral().to(torch.bfloat16), StarConfig(logits_fp32=True))
    out = model(input_ids, output_router_logits=True)
    assert all(l.dtype == torch.float32 for l in out.router_logits)
    router = next(iter(find_star_routers(model).values()))
    assert router.weight.dtype == torch.float32
    assert torch.isfinite(out.logits).all()


def test_patching_on_the_meta_device_allocates_nothing():
    from accelerate import init_empty_weights
    from transformers import MixtralConfig, MixtralForCausalLM

    from .conftest import COMMON

    with init_empty_weights():
        model = MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2))
    patch_model(model)
    routers = find_star_routers(model)
    assert len(routers) == 2
    for r in routers.values():
        assert all(t.is_meta for t in list(r.parameters()) + list(r.buffers()))
        assert r.star_basis.dtype == torch.float32


def test_deepcopy_pickle_to_and_compile(input_ids):
    model = patch_model(tiny_mixtral())
    ref = model(input_ids).logits
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(input_ids).logits, ref)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(next(iter(find_star_routers(loaded).values()))).__name__.startswith("StarRouter__")
    torch.testing.assert_close(loaded(input_ids).logits, ref)
    compiled = torch.compile(clone, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids).logits, ref, rtol=1e-5, atol=1e-5)
    clone.train()
    compiled(input_ids, labels=input_ids).loss.backward()
    assert all(r.star_pending_statistics is not None for r in find_star_routers(clone).values())
    assert next(iter(find_star_routers(clone).values())).star_mixing.grad is not None


def test_to_moves_pending_statistics_with_the_router(input_ids):
    model = patch_model(tiny_mixtral()).train()
    model(input_ids)
    model.to("cpu", torch.float64)
    for r in find_star_routers(model).values():
        assert r.star_basis.dtype == torch.float32
        assert r.star_pending_statistics.yx.dtype == torch.float32
    model.to(torch.float32)
    model(input_ids)
    assert gha_step(model) == 2


def test_functional_linear_of_effective_weight_equals_router_logits(input_ids):
    model = patch_model(tiny_mixtral())
    seen, _ = capture_router_inputs(model)
    out = model(input_ids, output_router_logits=True)
    for (name, router), logits in zip(find_star_routers(model).items(), out.router_logits):
        torch.testing.assert_close(logits, F.linear(seen[name][0], router.star_effective_weight()))
