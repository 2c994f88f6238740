"""Padding-aware statistics: hand the attention mask of the current forward to the routers.

Routers only see flattened hidden states; the 2-D ``attention_mask`` (batch × sequence) is an
argument of the (sub)model that owns them. A :class:`TokenMaskSlot` is hooked onto that submodel:
its pre-hook stores the mask, its post-hook clears it, and routers read one weight per token.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

__all__ = ["TokenMaskSlot", "attach_mask_slots", "detach_mask_slots"]

_MASK_ARG = "attention_mask"


class TokenMaskSlot:
    """The attention mask of the forward currently running through one submodel."""

    def __init__(self, positional_index: int | None) -> None:
        self.positional_index = positional_index
        self.mask: torch.Tensor | None = None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get(_MASK_ARG)
        if mask is None and self.positional_index is not None and len(args) > self.positional_index:
            mask = args[self.positional_index]
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        self.mask = None

    def token_weight(self, num_tokens: int) -> torch.Tensor | None:
        """One 0/1 weight per router token, or ``None`` when the mask does not describe them.

        Router tokens are the batch's positions flattened in (batch, sequence) order; during cached
        generation they are the last ``num_tokens / batch`` positions of each row.
        """
        mask = self.mask
        if mask is None:
            return None
        batch, length = mask.shape
        if num_tokens == batch * length:
            return mask.reshape(-1)
        if num_tokens % batch == 0 and num_tokens // batch < length:
            return mask[:, length - num_tokens // batch :].reshape(-1)
        return None


def _mask_owner(model: nn.Module, router_path: str) -> tuple[str, nn.Module] | None:
    """The innermost Transformers (sub)model above ``router_path`` whose forward takes a mask."""
    from transformers import PreTrainedModel

    parts = router_path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:cut])
        module = model.get_submodule(path)
        if isinstance(module, PreTrainedModel) and _MASK_ARG in inspect.signature(module.forward).parameters:
            return path, module
    return None


def attach_mask_slots(model: nn.Module, routers: dict[str, nn.Module]) -> None:
    """Give every router (path → module) the mask slot of its owning submodel."""
    slots: dict[int, TokenMaskSlot] = {}
    for path, router in routers.items():
        owner = _mask_owner(model, path)
        if owner is None:
            continue
        _, module = owner
        slot = slots.get(id(module))
        if slot is None:
            params = list(inspect.signature(module.forward).parameters)
            slot = TokenMaskSlot(params.index(_MASK_ARG))
            module.register_forward_pre_hook(slot.pre_hook, with_kwargs=True)
            module.register_forward_hook(slot.post_hook, with_kwargs=True, always_call=True)
            slots[id(module)] = slot
        router._star_mask_slot = slot


def detach_mask_slots(model: nn.Module) -> None:
    """Remove every mask hook that :func:`attach_mask_slots` installed."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if isinstance(getattr(fn, "__self__", None), TokenMaskSlot)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
