"""star_hf.patching.discovery: where each router's linear gate lives, read from the model itself."""

from __future__ import annotations

import pytest
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from star_hf.patching.discovery import RouterSite, UnsupportedRouter, scan_routers

from .test_architectures import CASES, REFUSED


def _gates(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "switch_transformers", "longcat_flash", "phimoe", "jetmoe"])
def test_each_site_names_the_module_that_owns_the_gate_weight(name):
    model = CASES[name].build()
    sites, unsupported = scan_routers(model)
    modules = _gates(model)
    assert not unsupported and len(sites) == CASES[name].num_routers
    for site in sites:
        assert modules[site.path] is site.gate and modules[site.router_path] is site.router
        weight = site.gate.weight
        assert weight.shape == (site.num_experts, site.hidden_size)
        bias = getattr(site.gate, "bias", None)
        assert site.has_bias == (isinstance(bias, nn.Parameter) and bias.shape == (site.num_experts,))
        assert site.verified and type(site.router).__name__ in CASES[name].router_classes


def test_gate_children_and_how_the_router_reads_them():
    switch = scan_routers(CASES["switch_transformers"].build())[0]
    assert all(s.path == s.router_path + ".classifier" and not s.observe_at_router for s in switch)
    longcat = scan_routers(CASES["longcat_flash"].build())[0]
    # Longcat-Flash's router reads classifier.weight itself instead of calling the child.
    assert all(s.path != s.router_path and s.observe_at_router for s in longcat)
    mixtral = scan_routers(CASES["mixtral"].build())[0]
    assert all(s.path == s.router_path and s.gate is s.router for s in mixtral)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_routers_without_a_linear_gate_are_reported_not_located(name):
    build, router_class = REFUSED[name]
    sites, unsupported = scan_routers(build())
    assert unsupported and all(isinstance(u, UnsupportedRouter) for u in unsupported)
    assert {u.class_name for u in unsupported} == {router_class}
    assert all("no E×D linear gate" in u.reason for u in unsupported)


def test_a_model_without_experts_has_no_router():
    assert scan_routers(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == ([], [])


def test_peft_wrappers_are_seen_through_to_the_copy_that_runs():
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["gate"])  # PEFT copies each router
    model = get_peft_model(CASES["mixtral"].build(), config)
    sites, _ = scan_routers(model)
    assert sites and all(isinstance(s, RouterSite) for s in sites)
    assert all(s.path.endswith(".modules_to_save.default") for s in sites)
