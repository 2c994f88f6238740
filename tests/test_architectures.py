"""Every verified architecture, one tiny model each: preserve-exactness, gradients, aux loss, statistics.

Each case builds a tiny model from its config (no hub), runs it before and after ``patch_model``
and checks that
- outputs and recorded router logits are unchanged (float32, max |Δ| ≤ 1e-5),
- the aux / z losses the architecture computes are still there and unchanged,
- a backward pass reaches W, M and α of every STAR router,
- a training forward collects GHA statistics in every STAR router,
- every router class listed in ``star_hf.architectures.VERIFIED_ROUTERS`` has a case here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from star_hf import find_star_routers, patch_model
from star_hf.architectures import VERIFIED_ROUTERS

from .conftest import COMMON, tiny_mixtral, tiny_qwen2_moe, tiny_switch


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    router_class: str
    seq2seq: bool = False
    # output fields holding router logits and aux/z losses (checked when the architecture returns them)
    logit_fields: tuple[str, ...] = ("router_logits",)
    loss_fields: tuple[str, ...] = ("aux_loss",)
    forward_kwargs: dict = field(default_factory=lambda: {"output_router_logits": True})


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        **COMMON, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]
    )
    return Qwen3MoeForCausalLM(cfg).eval()


CASES: dict[str, Case] = {
    "mixtral": Case(tiny_mixtral, "MixtralTopKRouter"),
    "qwen2_moe": Case(tiny_qwen2_moe, "Qwen2MoeTopKRouter"),
    "qwen3_moe": Case(_qwen3_moe, "Qwen3MoeTopKRouter"),
    "switch_transformers": Case(
        tiny_switch,
        "SwitchTransformersTop1Router",
        seq2seq=True,
        logit_fields=("encoder_router_logits", "decoder_router_logits"),
        loss_fields=("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"),
    ),
}


def _inputs(case: Case) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 10), generator=g)
    kwargs = {"input_ids": ids, "labels": ids, **case.forward_kwargs}
    return kwargs


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []


def test_every_verified_router_class_has_a_case():
    assert {c.router_class for c in CASES.values()} == set(VERIFIED_ROUTERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_patch_preserves_outputs_and_aux_losses(name):
    case = CASES[name]
    original = case.build()
    patched = patch_model(copy.deepcopy(original))
    assert len(find_star_routers(patched)) >= 1
    kwargs = _inputs(case)
    with torch.no_grad():
        ref, out = original(**kwargs), patched(**kwargs)
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    for f in case.logit_fields:
        a, b = _flatten(getattr(ref, f)), _flatten(getattr(out, f))
        assert len(a) == len(b) > 0, f
        for x, y in zip(a, b):
            assert (x.float() - y.float()).abs().max() <= 1e-5, f
    present = [f for f in case.loss_fields if getattr(ref, f, None) is not None]
    assert present, "the architecture should report an aux/z loss"
    for f in present:
        assert getattr(out, f) is not None, f
        torch.testing.assert_close(getattr(out, f), getattr(ref, f), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_reaches_star_parameters_and_statistics_are_collected(name):
    case = CASES[name]
    model = patch_model(case.build()).train()
    out = model(**_inputs(case))
    out.loss.backward()
    routers = find_star_routers(model)
    for path, router in routers.items():
        for pname in ("star_linear_weight", "star_mixing", "star_alpha"):
            grad = getattr(router, pname).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (path, pname)
        stats = router.star_pending_statistics
        assert stats is not None and float(stats.count) > 0, path


@pytest.mark.parametrize("name", sorted(CASES))
def test_patch_after_output_hooks_were_installed(name):
    """Transformers installs its output-recording hooks lazily, on module objects."""
    case = CASES[name]
    model = case.build()
    kwargs = _inputs(case)
    with torch.no_grad():
        ref = model(**kwargs)
        patch_model(model)
        out = model(**kwargs)
    for f in case.logit_fields:
        assert len(_flatten(getattr(out, f))) == len(_flatten(getattr(ref, f))) > 0
    for f in case.loss_fields:
        if getattr(ref, f, None) is not None:
            torch.testing.assert_close(getattr(out, f), getattr(ref, f), rtol=1e-5, atol=1e-6)
