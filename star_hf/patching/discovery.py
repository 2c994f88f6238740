"""Finding the MoE routers of a Transformers model and the linear gate inside each.

One generic mechanism covers the architectures: Transformers names every router class in
``_can_record_outputs["router_logits"]``; a module is also taken as a router when it sits next to an
``experts`` module under a router-like name. The gate is then the module that owns the E×D weight:
the router itself (``F.linear(x, self.weight)`` or an ``nn.Linear`` subclass) or its one child
``nn.Linear`` with E outputs.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch.nn as nn

from star_hf.patching.architectures import VERIFIED_ROUTERS

__all__ = ["RouterSite", "UnsupportedRouter", "scan_routers"]

_ROUTER_NAMES = ("gate", "router", "gating", "wg")
_EXPERT_COUNT_ATTRS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")


@dataclass
class RouterSite:
    """Where one router's linear gate lives."""

    path: str  # module path of the gate owner, which becomes the STAR router
    router_path: str  # module path of the architecture's router (equal to ``path`` unless the gate is a child)
    gate: nn.Module
    router: nn.Module
    num_experts: int
    hidden_size: int
    has_bias: bool
    # True when the router reads ``child.weight`` directly instead of calling the child gate, so the
    # gate's input must be captured at the router's own forward.
    observe_at_router: bool

    @property
    def router_class_name(self) -> str:
        cls = type(self.router)
        return f"{cls.__module__}.{cls.__qualname__}"

    @property
    def verified(self) -> bool:
        return type(self.router).__name__ in VERIFIED_ROUTERS


@dataclass
class UnsupportedRouter:
    path: str
    class_name: str
    reason: str


def _recorded_router_classes(model: nn.Module) -> tuple[type, ...]:
    classes: list[type] = []
    for module in model.modules():
        spec = getattr(type(module), "_can_record_outputs", None) or {}
        entries = spec.get("router_logits")
        if entries is None:
            continue
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            cls = entry if isinstance(entry, type) else getattr(entry, "target_class", None)
            if isinstance(cls, type) and cls not in classes:
                classes.append(cls)
    return tuple(classes)


def _active_named_modules(model: nn.Module, prefix: str = ""):
    """``named_modules`` that skips PEFT copies not used by the forward (inactive or original)."""
    yield prefix, model
    children = dict(model.named_children())
    if "original_module" in children and "modules_to_save" in children:
        active = model.active_adapter if isinstance(model.active_adapter, str) else next(iter(model.active_adapter), None)
        # Like the wrapper's forward: the original runs when adapters are off or none of its copies is active.
        if getattr(model, "disable_adapters", False) or active not in model.modules_to_save:
            children = {"original_module": children["original_module"]}
        else:
            children = {f"modules_to_save.{active}": model.modules_to_save[active]}
    for name, child in children.items():
        yield from _active_named_modules(child, f"{prefix}.{name}" if prefix else name)


def _candidate_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    recorded = _recorded_router_classes(model)
    found: dict[str, nn.Module] = {}
    for path, module in _active_named_modules(model):
        if recorded and isinstance(module, recorded):
            found[path] = module
        children = dict(module.named_children())
        if "experts" in children:
            for name in _ROUTER_NAMES:
                if name in children:
                    found.setdefault(f"{path}.{name}" if path else name, children[name])
    # A recorded module that contains other routers (an attention block holding an MoA router, a
    # wrapper block holding text and vision MoE blocks) is not itself a gate.
    paths = sorted(found)
    return [(p, found[p]) for p in paths if not any(q.startswith(p + ".") for q in paths)]


def _expert_counts(router: nn.Module) -> set[int]:
    return {v for a in _EXPERT_COUNT_ATTRS if isinstance(v := getattr(router, a, None), int)}


def _reads_child_weight_directly(router: nn.Module, child: str) -> bool:
    try:
        source = inspect.getsource(type(router).forward)
    except (OSError, TypeError):
        return False
    return re.search(rf"self\.{child}\s*\(", source) is None and f"self.{child}.weight" in source


def _routes_by_token_id(router: nn.Module) -> bool:
    # Hash routing (DeepSeek-V4's first layers) picks the experts from a token-id table; its gate
    # only weights the chosen experts, so a structure-aware gate would not change the routing.
    try:
        return "input_ids" in inspect.signature(type(router).forward).parameters
    except (TypeError, ValueError):
        return False


def _locate_gate(path: str, router: nn.Module) -> RouterSite | UnsupportedRouter:
    cls_name = type(router).__name__
    if _routes_by_token_id(router):
        reason = (
            "its experts are chosen by a token-id lookup table (hash routing), not by the gate's logits, "
            "so a structure-aware gate cannot change its routing"
        )
        return UnsupportedRouter(path, cls_name, reason)
    weight = router._parameters.get("weight")
    if isinstance(router, nn.Linear) or (isinstance(weight, nn.Parameter) and weight.dim() == 2):
        bias = router._parameters.get("bias")
        has_bias = isinstance(bias, nn.Parameter) and bias.shape == weight.shape[:1]
        return RouterSite(path, path, router, router, weight.shape[0], weight.shape[1], has_bias, False)
    counts = _expert_counts(router)
    # A gate child must be the router's only linear map: with more, the logits come from an MLP.
    linears = [(n, c) for n, c in router.named_modules() if isinstance(c, nn.Linear)]
    if len(linears) == 1 and "." not in linears[0][0] and (not counts or linears[0][1].out_features in counts):
        name, child = linears[0]
        return RouterSite(
            path=f"{path}.{name}",
            router_path=path,
            gate=child,
            router=router,
            num_experts=child.out_features,
            hidden_size=child.in_features,
            has_bias=child.bias is not None,
            observe_at_router=_reads_child_weight_directly(router, name),
        )
    reason = (
        "no E×D linear gate producing one logit per expert was found "
        f"(expert count {sorted(counts) or 'unknown'}; linear children "
        f"{[(n, c.out_features) for n, c in linears] or 'none'}): its logits are not a single linear map "
        "of the router input (e.g. an MLP router, product keys or a lookup table)"
    )
    return UnsupportedRouter(path, cls_name, reason)


def scan_routers(model: nn.Module) -> tuple[list[RouterSite], list[UnsupportedRouter]]:
    """All routers of ``model``: those with a linear gate, and those STAR cannot upgrade."""
    sites: list[RouterSite] = []
    unsupported: list[UnsupportedRouter] = []
    for path, router in _candidate_routers(model):
        located = _locate_gate(path, router)
        (sites if isinstance(located, RouterSite) else unsupported).append(located)
    return sites, unsupported
