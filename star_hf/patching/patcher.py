"""``patch_model``, ``find_star_routers`` and ``fold``: turning routers into STAR routers and back.

Patching changes the *class* of each gate-owning module to a generated subclass (it stays an
instance of the architecture's router class, so Transformers keeps recording ``router_logits`` and
computing aux losses, also when its output hooks were installed by an earlier forward) and
replaces the gate's ``weight`` parameter by the STAR parameters. Nothing else in the model changes.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict

import torch
import torch.nn as nn

from star_hf.config import StarConfig
from star_hf.errors import (
    AlreadyPatchedError,
    BrokenUpstreamError,
    NoRouterError,
    NotPatchedError,
    UnsupportedRouterError,
)
from star_hf.gha.init import initial_tensors
from star_hf.integrations import trainer as trainer_watch
from star_hf.patching.architectures import (
    LOGITS_FP32_REFUSED,
    check_versions,
    supported_architectures,
    upstream_failure,
)
from star_hf.patching.checkpoint_layout import (
    attach_checkpoint_layout_hook,
    detach_checkpoint_layout_hook,
)
from star_hf.patching.discovery import (
    RouterSite,
    UnsupportedRouter,
    _active_named_modules,
    scan_routers,
)
from star_hf.paths import find_hf_model, layer_index
from star_hf.router.generated import gate_host_class_for, star_class_for
from star_hf.router.masking import attach_mask_hooks, detach_mask_hooks
from star_hf.router.star_router import (
    STAR_BUFFER_NAMES,
    STAR_PARAMETER_NAMES,
    StarGateHostMixin,
    StarRouterMixin,
)

__all__ = [
    "find_star_routers",
    "fold",
    "patch_model",
]

_INSTANCE_STATE = (
    "star_config",
    "_star_path",
    "_star_bias_slot",
    "_star_stats",
    "_star_cache",
    "_star_adaptation",
    "_star_skipped_host",
    "_star_skipped_pending",
    "_star_skip_flags",
    "_star_pending_forwards",
    "_star_pending_limit",
)


def find_star_routers(model: nn.Module) -> "OrderedDict[str, StarRouterMixin]":
    """Module path → STAR router, in model order (only the copies a PEFT wrapper actually runs)."""
    return OrderedDict((p, m) for p, m in _active_named_modules(model) if isinstance(m, StarRouterMixin))


def _all_star_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (StarRouterMixin, StarGateHostMixin))]


def _peft_integration():
    """``star_hf.integrations.peft`` where PEFT is installed (it is a dependency, but optional at run time)."""
    if importlib.util.find_spec("peft") is None:
        return None
    from star_hf.integrations import peft

    return peft


def _layers_hint(sites: list[RouterSite], unsupported: list[UnsupportedRouter]) -> str:
    """The ``layers_to_transform`` that keeps exactly the linear-gate layers (mixed models: DeepSeek-V4)."""

    refused = {layer_index(u.path) for u in unsupported}
    linear = sorted({layer_index(s.path) for s in sites} - refused - {None})
    if not linear:
        return ""
    return f" The linear gates are in layers {linear}: StarConfig(layers_to_transform={linear}) patches only those."


def _check_sites(model: nn.Module, config: StarConfig, allow_unverified: bool) -> list[RouterSite]:
    """Every check runs before the model is touched."""
    if _all_star_modules(model):
        raise AlreadyPatchedError(
            f"{type(model).__name__} already has STAR routers (patch_model was called before). "
            "Use the model as it is, or star_hf.fold(model) first to start again from a stock router."
        )
    import transformers

    hf_model = find_hf_model(model)
    failure = None if hf_model is None else upstream_failure(type(hf_model).__name__, transformers.__version__)
    if failure is not None and not allow_unverified:
        raise BrokenUpstreamError(failure.message(transformers.__version__))
    sites, unsupported = scan_routers(model)
    if not sites and not unsupported:
        raise NoRouterError(
            f"no MoE router found in {type(model).__name__}; star_hf upgrades the routers of mixture-of-experts "
            f"models. Supported architectures: {', '.join(supported_architectures())}."
        )
    all_paths = [s.path for s in sites] + [u.path for u in unsupported]
    sites = [s for s in sites if config.selects(s.path) or config.selects(s.router_path)]
    unsupported = [u for u in unsupported if config.selects(u.path)]
    if unsupported:
        details = "; ".join(f"{u.path} ({u.class_name}): {u.reason}" for u in unsupported)
        raise UnsupportedRouterError(
            f"{type(model).__name__} has routers that are not linear gates, which STAR cannot upgrade: {details}. "
            f"Leave them out with StarConfig(layers_to_transform=...) or StarConfig(target_modules=...).{_layers_hint(sites, unsupported)}"
        )
    if not sites:
        raise NoRouterError(
            f"no router of {type(model).__name__} matches layers_to_transform={config.layers_to_transform} / "
            f"target_modules={config.target_modules!r}; routers found: {all_paths}."
        )
    refused = {type(s.router).__name__ for s in sites} & set(LOGITS_FP32_REFUSED) if config.logits_fp32 else set()
    if refused:
        reasons = "; ".join(f"{name}: {LOGITS_FP32_REFUSED[name]}" for name in sorted(refused))
        raise UnsupportedRouterError(
            f"StarConfig(logits_fp32=True) is not available for {type(model).__name__} ({reasons}). "
            "Leave logits_fp32 off (router logits then follow the model's dtype) or run the model in float32."
        )
    unverified = sorted({s.router_class_name for s in sites if not s.verified})
    if unverified and not allow_unverified:
        raise UnsupportedRouterError(
            f"router class(es) {unverified} are not among the architectures star_hf is verified on "
            f"({', '.join(supported_architectures())}). Their gates look linear, so the generic patcher may work: "
            "pass patch_model(..., allow_unverified=True) and check that the patched model's outputs match."
        )
    for s in sites:
        r = config.num_components or s.num_experts
        if r > s.hidden_size:
            raise ValueError(
                f"StarConfig.num_components={r} exceeds the hidden size {s.hidden_size} of router {s.path}: "
                "the basis cannot have more orthonormal directions than its input has dimensions."
            )
        if config.gha_only and config.init == "preserve" and r < s.num_experts:
            raise ValueError(
                f"gha_only with init='preserve' needs num_components >= the number of experts ({s.num_experts}) "
                f"at {s.path}, so that M B can reproduce the original gate; got {r}."
            )
    if (peft := _peft_integration()) is not None:
        peft.refuse_adapted_routers(model, [s.path for s in sites])
    return sites


def _convert(site: RouterSite, config: StarConfig, index: int) -> None:
    gate = site.gate
    w0 = gate._parameters.pop("weight")
    bias_slot = "bias" in gate._parameters
    b0 = gate._parameters.pop("bias") if bias_slot else None
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + index) % 2**63)
    t = initial_tensors(
        w0.detach(),
        b0.detach() if site.has_bias else None,
        config.num_components or site.num_experts,
        config.init,
        config.gha_only,
        generator,
    )
    gate.__class__ = star_class_for(type(gate))
    train_linear = not config.gha_only
    gate.register_parameter("star_linear_weight", nn.Parameter(t.linear_weight, requires_grad=train_linear))
    bias = None if t.linear_bias is None else nn.Parameter(t.linear_bias, requires_grad=train_linear)
    gate.register_parameter("star_linear_bias", bias)
    gate.register_parameter("star_mixing", nn.Parameter(t.mixing))
    gate.register_parameter("star_alpha", nn.Parameter(t.alpha, requires_grad=train_linear))
    gate.register_buffer("star_basis", t.basis, persistent=True)
    gate.star_config = config
    gate._star_path = site.path
    gate._star_bias_slot = bias_slot
    if site.observe_at_router:
        site.router.__class__ = gate_host_class_for(type(site.router))
        site.router._star_gate_name = site.path.rsplit(".", 1)[1]


def patch_model(model: nn.Module, config: StarConfig | None = None, *, allow_unverified: bool = False) -> nn.Module:
    """Replace every MoE router of ``model`` by a STAR router initialised from its weights.

    Args:
        model: a Transformers MoE model (causal LM, seq2seq, base model) or a PEFT wrapper of one.
        config: the STAR hyperparameters (default ``StarConfig()``: preserve init, per-step GHA).
        allow_unverified: also patch router classes outside :func:`star_hf.supported_architectures`
            whose gate is linear, and model classes broken upstream in the installed Transformers.

    Returns:
        The same model object, patched in place. With ``init="preserve"`` its outputs equal the
        original's (float32 round-off).
    """
    check_versions()
    config = StarConfig() if config is None else config
    config.validate()
    sites = _check_sites(model, config, allow_unverified)
    for index, site in enumerate(sites):
        _convert(site, config, index)
    attach_mask_hooks(model, [s.path for s in sites])
    # Trainer resume loads checkpoints with load_state_dict, which skips Transformers' key conversion.
    attach_checkpoint_layout_hook(model)
    trainer_watch.install()
    if (peft := _peft_integration()) is not None:
        # From now on PEFT keeps STAR routers out of LoRA; adapters added before patching save them too.
        peft.install()
        peft.add_routers_to_adapters(model)
    if (hf_model := find_hf_model(model)) is not None:
        hf_model.config.star_config = config.to_dict()
    return model


def _fold_router(router: StarRouterMixin) -> None:
    with torch.no_grad():
        w_eff, b_eff = router._star_compute_effective()
    dtype = router.star_linear_weight.dtype
    requires_grad = router.star_mixing.requires_grad
    had_bias_slot = router._star_bias_slot
    for name in STAR_PARAMETER_NAMES:
        router._parameters.pop(name, None)
    for name in STAR_BUFFER_NAMES:
        router._buffers.pop(name, None)
    for name in _INSTANCE_STATE:
        router.__dict__.pop(name, None)
    router.__class__ = type(router)._star_base_class
    router.weight = nn.Parameter(w_eff.to(dtype), requires_grad=requires_grad)
    if b_eff is not None:
        router.bias = nn.Parameter(b_eff.to(dtype), requires_grad=requires_grad)
    elif had_bias_slot:
        router.register_parameter("bias", None)


def fold(model: nn.Module) -> nn.Module:
    """Turn every STAR router back into the architecture's own router with W_eff and b_eff.

    The folded model has the stock architecture and state-dict keys, and in eval mode its outputs
    equal the STAR model's. Returns the same model object.
    """
    modules = _all_star_modules(model)
    if not modules:
        raise NotPatchedError(f"{type(model).__name__} has no STAR routers to fold (was it patched?).")
    for module in modules:
        if isinstance(module, StarRouterMixin):
            _fold_router(module)
        else:
            module.__dict__.pop("_star_gate_name", None)
            module.__class__ = type(module)._star_base_class
    detach_mask_hooks(model)
    detach_checkpoint_layout_hook(model)
    hf_model = find_hf_model(model)
    if hf_model is not None and hasattr(hf_model.config, "star_config"):
        del hf_model.config.star_config
    return model
