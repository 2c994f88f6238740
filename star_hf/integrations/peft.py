"""PEFT integration: STAR routers are trained fully alongside an adapter, never LoRA-adapted.

When PEFT injects an adapter (``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``,
Transformers' ``model.add_adapter``) into a model with STAR routers, the router module paths are
added to the adapter config's ``modules_to_save``. PEFT then, by its own rules:

- never puts a LoRA layer on a router or inside one (also for ``target_modules="all-linear"``, which
  would otherwise catch routers that are, or own, an ``nn.Linear``, and whose merge would write into
  the re-parametrised weight and lose the delta);
- keeps a trainable copy of each router per adapter (``ModulesToSaveWrapper``) and saves it with the
  adapter, buffers included, so the adapter carries the trained W, b, M, α and basis B;
- restores those copies in ``PeftModel.from_pretrained`` on a freshly patched base model, and returns
  them in ``merge_and_unload()``.

The paths are written into the config, so the saved ``adapter_config.json`` lists them: loading needs
no star_hf-specific step beyond patching the base model first. The copies share the model's one StarConfig
(``deepcopy`` would give each its own) and keep the router's own trainability (``gha_only`` freezes
W, b and α) whatever PEFT toggles.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable

from peft import PeftModel
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    check_target_module_exists,
)
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from star_hf.paths import canonical_path
from star_hf.router.star_router import (
    STAR_BUFFER_NAMES,
    STAR_PARAMETER_NAMES,
    StarGateHostMixin,
    StarRouterMixin,
)

__all__ = [
    "StarModulesToSaveWrapper",
    "add_routers_to_adapters",
    "install",
    "refuse_adapted_routers",
    "router_module_paths",
]

_STAR_TENSOR_NAMES = STAR_PARAMETER_NAMES + STAR_BUFFER_NAMES
_GHA_ONLY_FROZEN = ("star_linear_weight", "star_linear_bias", "star_alpha")


class StarModulesToSaveWrapper(ModulesToSaveWrapper):
    """A ``ModulesToSaveWrapper`` around (a module holding) STAR routers.

    PEFT sets ``requires_grad=True`` on every parameter of the active copy whenever it activates or
    re-enables an adapter; this wrapper then re-applies the routers' own trainability.
    """

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        _freeze_gha_only(self.modules_to_save.values())

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        _freeze_gha_only(self.modules_to_save.values())


def _star_modules(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    return ((n, m) for n, m in module.named_modules() if isinstance(m, (StarRouterMixin, StarGateHostMixin)))


def _freeze_gha_only(modules: Iterable[nn.Module]) -> None:
    for module in modules:
        for _, router in _star_modules(module):
            if isinstance(router, StarRouterMixin) and router.star_config.gha_only:
                for name in _GHA_ONLY_FROZEN:
                    param = getattr(router, name)
                    if param is not None:
                        param.requires_grad_(False)


def router_module_paths(model: nn.Module) -> list[str]:
    """Paths (in the unwrapped model) of the modules PEFT must keep as full trainable copies.

    That is every STAR router, except that a router reading its gate child's weight directly
    (Switch Transformers) is kept whole, gate included. Routers inside a module that is already a
    ``ModulesToSaveWrapper`` are trained through that module's copy and are not listed.
    """
    modules = dict(model.named_modules())
    wrapped = {canonical_path(p) for p, m in modules.items() if isinstance(m, ModulesToSaveWrapper)}
    hosts = {canonical_path(p) for p, m in modules.items() if isinstance(m, StarGateHostMixin)}
    paths: list[str] = []
    for path, module in modules.items():
        if not isinstance(module, (StarRouterMixin, StarGateHostMixin)):
            continue
        logical = canonical_path(path)
        if isinstance(module, StarRouterMixin) and logical.rpartition(".")[0] in hosts:
            continue
        parts = logical.split(".")
        if any(".".join(parts[:i]) in wrapped for i in range(1, len(parts))):
            continue
        if logical not in paths:
            paths.append(logical)
    return paths


def _covered(path: str, modules_to_save: Iterable[str]) -> bool:
    # PEFT wraps every module whose name ends with an entry (peft.utils.other._set_trainable).
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p.endswith(m) for p in prefixes for m in modules_to_save)


def _warn_if_targeted(config, model: nn.Module, paths: list[str]) -> None:
    """A user who names a router in ``target_modules`` / ``target_parameters`` learns it is trained fully."""
    target_modules = getattr(config, "target_modules", None)
    target_parameters = getattr(config, "target_parameters", None) or []
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        target_modules = None
    if not target_modules and not target_parameters:
        return
    probe = copy.copy(config)
    probe.modules_to_save = None
    probe.target_modules = target_modules
    probe.target_parameters = target_parameters
    keys = [canonical_path(k) for k, _ in model.named_modules()]
    hit = []
    for path in paths:
        inside = [k for k in keys if k == path or k.startswith(path + ".")]
        by_module = target_modules and any(check_target_module_exists(probe, k) for k in inside)
        params = [f"{k}.{n}" for k in inside for n in ("weight", "bias")]
        by_param = any(p in target_parameters or any(p.endswith("." + t) for t in target_parameters) for p in params)
        if by_module or by_param:
            hit.append(path)
    if hit:
        warnings.warn(
            f"star_hf: the PEFT config targets the STAR router(s) {hit}. STAR routers are not LoRA-adapted: they "
            "are trained fully (W, b, M, α by gradient, the basis by GHA) and saved with the adapter through "
            "`modules_to_save`. The other targets are adapted as requested; drop the routers from `target_modules` "
            "/ `target_parameters` to silence this warning.",
            UserWarning,
            stacklevel=4,
        )


def _add_paths_to_config(config, model: nn.Module) -> list[str]:
    """Add the STAR router paths ``config.modules_to_save`` does not cover yet; returns those added."""
    if not hasattr(config, "modules_to_save"):
        return []  # prompt-learning methods: the base model stays frozen, routers included
    existing = list(config.modules_to_save or [])
    added = [p for p in router_module_paths(model) if not _covered(p, existing)]
    if added:
        _warn_if_targeted(config, model, added)
        config.modules_to_save = existing + added
    return added


def _wire_router_copies(model: nn.Module) -> None:
    """Turn every wrapper holding STAR routers into a :class:`StarModulesToSaveWrapper`; its copies share
    the model's StarConfig and keep the routers' own trainability."""
    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        originals = dict(_star_modules(module.original_module))
        if not originals:
            continue
        if type(module) is ModulesToSaveWrapper:
            module.__class__ = StarModulesToSaveWrapper
        for replica in module.modules_to_save.values():
            for name, router in _star_modules(replica):
                original = originals.get(name)
                if isinstance(original, StarRouterMixin):
                    router.star_config = original.star_config
        _freeze_gha_only(module.modules_to_save.values())


def _hf_root_and_adapters(model: nn.Module):
    """(model the adapters were injected into, {adapter name: config}, active adapter names) or None."""
    # PeftModel / PeftMixedModel hold a tuner as ``base_model`` (a Transformers model's ``base_model``
    # is its inner model instead); prompt-learning PeftModels hold none.
    tuner = model if isinstance(model, BaseTuner) else getattr(model, "base_model", None)
    if isinstance(tuner, BaseTuner):
        return tuner.model, tuner.peft_config, list(tuner.active_adapters)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs and any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        # Transformers' PEFT integration (``model.add_adapter``): the adapters live in the model itself.
        active = model.active_adapters() if callable(getattr(model, "active_adapters", None)) else list(configs)
        return model, configs, list(active)
    return None


def add_routers_to_adapters(model: nn.Module) -> None:
    """Give the adapters of an already PEFT-wrapped ``model`` its (newly patched) STAR routers.

    Called by :func:`star_hf.patch_model` after patching a model that carries PEFT adapters: each
    adapter config gets the router paths in ``modules_to_save`` and each router gets its trainable
    copy, exactly as if the model had been patched before the adapters were added, so that
    ``save_pretrained`` writes the STAR routers into the adapter. No-op for a model without adapters.
    """
    found = _hf_root_and_adapters(model)
    if found is None:
        return
    root, configs, active = found
    for adapter_name, config in configs.items():
        added = _add_paths_to_config(config, root)
        for path in added:
            parent_path, _, child_name = path.rpartition(".")
            parent = root.get_submodule(parent_path)
            target = getattr(parent, child_name)
            # What PEFT's ``set_additional_trainable_modules`` does for one module, except that the model's
            # active adapter ends up active here whatever order the adapters come in.
            created = not isinstance(target, ModulesToSaveWrapper)
            if created:
                target = ModulesToSaveWrapper(target, adapter_name)
                setattr(parent, child_name, target)
            else:
                target.update(adapter_name)
            if adapter_name in active:
                target.set_adapter(adapter_name, inference_mode=config.inference_mode)
            elif created:
                target.set_adapter([], inference_mode=config.inference_mode)
    _wire_router_copies(root)


def refuse_adapted_routers(model: nn.Module, router_paths: list[str]) -> None:
    """Raise before patching if PEFT put an adapter layer on (or around) one of the routers.

    That happens when the adapter was added before patching and targeted routers (``"all-linear"``
    catches them on several architectures): the router would be patched underneath a LoRA layer whose
    delta then bypasses STAR or is lost in a merge.
    """
    adapted = []
    for path in router_paths:
        parts = path.split(".")
        ancestors = (model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts)))
        if any(isinstance(m, BaseTunerLayer) for m in ancestors):
            adapted.append(path)
    if adapted:
        raise ValueError(
            f"the router(s) {adapted} carry a PEFT adapter layer (the PEFT config targeted them, e.g. through "
            "target_modules='all-linear'), so star_hf cannot upgrade them. Patch the base model before adding the "
            "adapter: star_hf.patch_model(base); peft.get_peft_model(base, config). PEFT then leaves the STAR "
            "routers out of LoRA and trains them fully."
        )


def _warn_if_star_routers_dropped(model_id, load_result) -> None:
    """An adapter saved with STAR routers, loaded into a model that was not patched, loses them."""
    dropped = [k for k in getattr(load_result, "unexpected_keys", []) if k.rpartition(".")[2] in _STAR_TENSOR_NAMES]
    if dropped:
        warnings.warn(
            f"star_hf: the adapter {str(model_id)!r} holds trained STAR routers ({len(dropped)} tensors, e.g. "
            f"{dropped[0]!r}), but the model it was loaded into has no STAR routers: PEFT loaded only their folded "
            "gates (the outputs the adapter had when saved, but no basis left to learn). To keep STAR routing, "
            "patch the base model first: star_hf.patch_model(base, StarConfig(...)), then "
            "PeftModel.from_pretrained(base, ...).",
            UserWarning,
            stacklevel=3,
        )


def install() -> None:
    """Hook PEFT once (idempotent); both hooks are no-ops for models and adapters without STAR routers.

    ``BaseTuner.inject_adapter`` (every way an adapter is added or loaded) first adds the STAR router
    paths to ``modules_to_save``, then wires the router copies PEFT made. ``PeftModel.load_adapter``
    warns when an adapter's STAR routers found no STAR router to load into.
    """
    inject = BaseTuner.inject_adapter
    if not getattr(inject, "_star_hf_wrapped", False):

        @functools.wraps(inject)
        def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs):
            _add_paths_to_config(self.peft_config[adapter_name], model)
            result = inject(self, model, adapter_name, *args, **kwargs)
            _wire_router_copies(model)
            return result

        inject_adapter._star_hf_wrapped = True
        BaseTuner.inject_adapter = inject_adapter

    load = PeftModel.load_adapter
    if not getattr(load, "_star_hf_wrapped", False):

        @functools.wraps(load)
        def load_adapter(self, model_id, adapter_name: str, *args, **kwargs):
            result = load(self, model_id, adapter_name, *args, **kwargs)
            _warn_if_star_routers_dropped(model_id, result)
            return result

        load_adapter._star_hf_wrapped = True
        PeftModel.load_adapter = load_adapter
