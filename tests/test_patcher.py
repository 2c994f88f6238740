"""patch_model / fold / find_star_routers: init modes, restriction, errors raised before any change."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import star_hf
from star_hf import (
    AlreadyPatchedError,
    NoRouterError,
    StarConfig,
    UnsupportedRouterError,
    find_star_routers,
    fold,
    gha_step,
    patch_model,
)

from .conftest import COMMON, tiny_mixtral, tiny_qwen2_moe, tiny_switch


def state_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snapshot):
    state, types = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types


def test_introspection_names_and_shapes():
    model = patch_model(tiny_mixtral(), StarConfig(num_components=3))
    routers = find_star_routers(model)
    assert list(routers) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    r = routers["model.layers.0.mlp.gate"]
    assert isinstance(r, type(tiny_mixtral().model.layers[0].mlp.gate))
    assert r.star_linear_weight.shape == (4, 32) and r.star_linear_bias is None
    assert r.star_mixing.shape == (4, 3) and r.star_alpha.shape == (4,)
    assert r.star_basis.shape == (3, 32) and r.star_basis.dtype == torch.float32
    assert r.star_config.num_components == 3
    assert "model.layers.0.mlp.gate.star_basis" in dict(model.named_buffers())
    torch.testing.assert_close(r.star_interpolation, torch.full((4,), 0.5))
    assert model.config.star_config["num_components"] == 3
    json.dumps(model.config.to_dict())  # the STAR config travels in config.json


def test_initial_mixing_is_orthonormal_and_basis_rows_unit_norm():
    for r_count in (2, 4, 6):
        model = patch_model(tiny_mixtral(), StarConfig(num_components=r_count))
        r = next(iter(find_star_routers(model).values()))
        m = r.star_mixing.detach()
        gram = m.t() @ m if r_count <= 4 else m @ m.t()
        torch.testing.assert_close(gram, torch.eye(gram.shape[0]), rtol=0, atol=1e-5)
        torch.testing.assert_close(r.star_basis.norm(dim=1), torch.ones(r_count), rtol=0, atol=1e-6)


def test_patching_is_deterministic_given_the_seed():
    a = patch_model(tiny_mixtral(), StarConfig(seed=7))
    b = patch_model(tiny_mixtral(), StarConfig(seed=7))
    c = patch_model(tiny_mixtral(), StarConfig(seed=8))
    ra, rb, rc = (next(iter(find_star_routers(m).values())) for m in (a, b, c))
    assert torch.equal(ra.star_basis, rb.star_basis) and not torch.equal(ra.star_basis, rc.star_basis)
    assert not torch.equal(ra.star_basis, list(find_star_routers(a).values())[1].star_basis)


def test_paper_init_keeps_w0_and_changes_the_function(input_ids):
    original = tiny_mixtral()
    w0 = original.model.layers[0].mlp.gate.weight.detach().clone()
    model = patch_model(copy.deepcopy(original), StarConfig(init="paper"))
    r = find_star_routers(model)["model.layers.0.mlp.gate"]
    assert torch.equal(r.star_linear_weight.detach(), w0)
    assert not torch.allclose(model(input_ids).logits, original(input_ids).logits)


def test_gha_only_preserve_is_exact_and_trains_only_mixing(input_ids):
    original = tiny_mixtral()
    model = patch_model(copy.deepcopy(original), StarConfig(gha_only=True))
    with torch.no_grad():
        assert (model(input_ids).logits - original(input_ids).logits).abs().max() <= 1e-5
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    for r in find_star_routers(model).values():
        assert r.star_mixing.grad is not None
        assert not r.star_linear_weight.requires_grad and not r.star_alpha.requires_grad
        torch.testing.assert_close(r.star_interpolation, torch.zeros(4))
        # z = M B x alone
        torch.testing.assert_close(r.star_effective_weight(), (r.star_mixing @ r.star_basis).detach())


def test_gha_only_preserve_needs_enough_components():
    model = tiny_mixtral()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match="num_components >= the number of experts"):
        patch_model(model, StarConfig(gha_only=True, num_components=2))
    assert_unchanged(model, snap)


def test_layers_to_transform_and_target_modules_restrict_patching():
    model = patch_model(tiny_mixtral(), StarConfig(layers_to_transform=[1]))
    assert list(find_star_routers(model)) == ["model.layers.1.mlp.gate"]
    model = patch_model(tiny_mixtral(), StarConfig(target_modules=r"model\.layers\.0\..*"))
    assert list(find_star_routers(model)) == ["model.layers.0.mlp.gate"]
    model = patch_model(tiny_switch(), StarConfig(target_modules=["router.classifier"], layers_to_transform=[1]))
    assert len(find_star_routers(model)) == 2
    with pytest.raises(NoRouterError, match="matches layers_to_transform"):
        patch_model(tiny_mixtral(), StarConfig(layers_to_transform=[5]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gha_lr": -1.0}, "gha_lr must be a finite number >= 0"),
        ({"num_components": 0}, "num_components must be a positive integer"),
        ({"init": "zeros"}, "init must be one of"),
        ({"update": "epoch"}, "update must be one of"),
        ({"layers_to_transform": [-1]}, "layer indices"),
        ({"target_modules": "("}, "not a valid regex"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StarConfig(**kwargs)


def test_num_components_larger_than_hidden_size():
    model = tiny_mixtral()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match="exceeds the hidden size 32"):
        patch_model(model, StarConfig(num_components=33))
    assert_unchanged(model, snap)


def test_second_patch_is_refused():
    model = patch_model(tiny_mixtral())
    snap = state_snapshot(model)
    with pytest.raises(AlreadyPatchedError, match="already has STAR routers"):
        patch_model(model)
    assert_unchanged(model, snap)


def test_non_moe_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**COMMON))
    snap = state_snapshot(model)
    with pytest.raises(NoRouterError, match=r"no MoE router found in LlamaForCausalLM; .*Supported architectures: .*mixtral"):
        patch_model(model)
    assert_unchanged(model, snap)
    with pytest.raises(star_hf.NotPatchedError, match="no STAR routers to fold"):
        fold(model)


class _MLPRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.down = nn.Linear(16, 8)
        self.up = nn.Linear(8, 4)

    def forward(self, x):
        return self.up(torch.relu(self.down(x)))


class _ToyMoE(nn.Module):
    def __init__(self, router):
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        top = self.router(x).argmax(-1)
        return torch.stack([self.experts[int(i)](xi) for xi, i in zip(x, top)])


class _LinearRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16) * 0.1)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def test_router_that_is_not_a_linear_gate_is_named_in_the_error():
    model = nn.Sequential(_ToyMoE(_LinearRouter()), _ToyMoE(_MLPRouter()))
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedRouterError, match=r"1\.router \(_MLPRouter\): no E×D linear gate") as err:
        patch_model(model)
    assert "layers_to_transform" in str(err.value)
    assert_unchanged(model, snap)
    # restricting the patch to the linear router works (with the explicit opt-in for unverified classes)
    patch_model(model, StarConfig(layers_to_transform=[0]), allow_unverified=True)
    assert list(find_star_routers(model)) == ["0.router"]


def test_unverified_router_class_needs_explicit_opt_in():
    model = _ToyMoE(_LinearRouter())
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedRouterError, match="allow_unverified=True"):
        patch_model(model)
    assert_unchanged(model, snap)
    x = torch.randn(5, 16)
    ref = model(x)
    patch_model(model, allow_unverified=True)
    torch.testing.assert_close(model(x), ref)


def test_fold_returns_stock_routers_with_equal_outputs(input_ids):
    original = tiny_mixtral()
    model = patch_model(copy.deepcopy(original), StarConfig(gha_lr=0.1)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()
        assert gha_step(model) == 2
    model.eval()
    with torch.no_grad():
        star_out = model(input_ids).logits
        fold(model)
        folded_out = model(input_ids).logits
    torch.testing.assert_close(folded_out, star_out, rtol=1e-5, atol=1e-5)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert model.state_dict().keys() == original.state_dict().keys()
    assert not hasattr(model.config, "star_config")
    assert not find_star_routers(model)
    # a folded model can be patched again
    patch_model(model)


def test_fold_switch_and_gate_bias(input_ids):
    model = tiny_switch(router_bias=True)
    reference = copy.deepcopy(model)
    patch_model(model, allow_unverified=False)
    r = next(iter(find_star_routers(model).values()))
    assert r.star_linear_bias is not None
    with torch.no_grad():
        r.star_alpha.add_(0.3)
        r.star_linear_bias.add_(0.2)
        want = model(input_ids=input_ids, decoder_input_ids=input_ids).logits
        fold(model)
        got = model(input_ids=input_ids, decoder_input_ids=input_ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_state_dict_round_trip_and_folded_gate_keys(input_ids):
    model = patch_model(tiny_qwen2_moe())
    sd = model.state_dict()
    gate_keys = sorted(k for k in sd if ".mlp.gate." in k)
    assert "model.layers.0.mlp.gate.weight" in gate_keys  # folded gate, for plain-Transformers readers
    assert "model.layers.0.mlp.gate.star_basis" in gate_keys
    torch.testing.assert_close(
        sd["model.layers.0.mlp.gate.weight"], find_star_routers(model)["model.layers.0.mlp.gate"].star_effective_weight()
    )
    other = patch_model(tiny_qwen2_moe(), StarConfig(seed=3))
    other.load_state_dict(sd, strict=True)
    torch.testing.assert_close(other(input_ids).logits, model(input_ids).logits)


def test_find_star_routers_through_a_peft_wrapper(input_ids):
    from peft import LoraConfig, get_peft_model

    model = patch_model(tiny_mixtral())
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=2))
    routers = find_star_routers(peft_model)
    # PEFT runs the trainable copies star_hf's PEFT integration puts in modules_to_save.
    assert len(routers) == 2 and all(p.endswith("mlp.gate.modules_to_save.default") for p in routers)
    peft_model.train()
    peft_model(input_ids=input_ids, labels=input_ids)
    assert gha_step(peft_model) == 2


def test_patch_a_peft_wrapped_model(input_ids):
    from peft import LoraConfig, get_peft_model

    original = tiny_mixtral()
    peft_model = get_peft_model(copy.deepcopy(original), LoraConfig(target_modules=["q_proj"], r=2))
    patch_model(peft_model)
    assert len(find_star_routers(peft_model)) == 2
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=input_ids).logits, original(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_supported_architectures_lists_the_required_ones():
    archs = star_hf.supported_architectures()
    for required in ("mixtral", "qwen2_moe", "qwen3_moe", "switch_transformers"):
        assert required in archs
