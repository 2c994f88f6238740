"""Padding-aware statistics: hand the attention mask of the current forward to the routers.

Routers only see flattened hidden states; the 2-D ``attention_mask`` (batch × sequence) is an
argument of the (sub)model that owns them. The patcher hooks that submodel: its pre-hook pushes the
mask on a thread-local stack, its post-hook pops it, and a router reads the top of the stack. Nothing
is stored on the routers, so copies of a router (``deepcopy``, PEFT's ``modules_to_save``) and copies
of the model keep working, and concurrent threads never see each other's masks.
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
import torch.nn as nn

from star_hf.gha.sanger import TokenWeights

__all__ = ["attach_mask_hooks", "current_token_weight", "current_token_weights", "detach_mask_hooks"]

_MASK_ARG = "attention_mask"
_local = threading.local()


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@functools.lru_cache(maxsize=None)
def _positional_index(cls: type) -> int | None:
    params = list(inspect.signature(cls.forward).parameters)[1:]  # drop self
    return params.index(_MASK_ARG) if _MASK_ARG in params else None


def push_mask_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get(_MASK_ARG)
    index = _positional_index(type(module))
    if mask is None and index is not None and len(args) > index:
        mask = args[index]
    _stack().append(_ForwardMask(mask) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)


def pop_mask_hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    stack = _stack()
    if stack:
        stack.pop()


class _ForwardMask:
    """The mask of one running forward, and the per-router-shape weights derived from it once."""

    __slots__ = ("mask", "derived")

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.derived: dict[tuple[int, torch.device], TokenWeights | None] = {}


def current_token_weight(num_tokens: int) -> torch.Tensor | None:
    """One 0/1 weight per router token of the running forward, or ``None`` if the mask does not apply.

    Router tokens are the batch's positions flattened in (batch, sequence) order; during cached
    generation they are the last ``num_tokens / batch`` positions of each row.
    """
    stack = _stack()
    entry = stack[-1] if stack else None
    return None if entry is None else _token_weight(entry.mask, num_tokens)


def current_token_weights(num_tokens: int, device: torch.device) -> TokenWeights | None:
    """:func:`current_token_weight` as :class:`~star_hf.gha.sanger.TokenWeights` on ``device``, derived once
    per forward and shared by its routers (the per-forward update of test-time adaptation).
    ``None`` also when a host-resident mask has no padding in this forward's tokens."""
    stack = _stack()
    entry = stack[-1] if stack else None
    if entry is None:
        return None
    key = (num_tokens, device)
    if key not in entry.derived:
        window = _mask_window(entry.mask, num_tokens)
        if window is None or (window.device.type == "cpu" and bool(window.all())):
            # A mask in host memory is read without a device sync. When it has no padding (every
            # decode step of a left-padded batch), the unweighted update is the same and cheaper.
            entry.derived[key] = None
        else:
            entry.derived[key] = TokenWeights.from_weights(window, device)
    return entry.derived[key]


def _mask_window(mask: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
    """The batch × (num_tokens / batch) part of the mask that the router's tokens come from."""
    batch, length = mask.shape
    if num_tokens == batch * length:
        return mask
    if num_tokens % batch == 0 and num_tokens // batch < length:
        return mask[:, length - num_tokens // batch :]
    return None


def _token_weight(mask: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
    window = _mask_window(mask, num_tokens)
    return None if window is None else window.reshape(-1)


def _mask_owner(model: nn.Module, router_path: str) -> nn.Module | None:
    """The innermost Transformers (sub)model above ``router_path`` whose forward takes a mask."""
    from transformers import PreTrainedModel

    parts = router_path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut]))
        if isinstance(module, PreTrainedModel) and _positional_index(type(module)) is not None:
            return module
    return None


def attach_mask_hooks(model: nn.Module, router_paths: list[str]) -> None:
    """Hook the submodels that receive the attention mask of the routers at ``router_paths``."""
    owners = {id(m): m for p in router_paths if (m := _mask_owner(model, p)) is not None}
    for module in owners.values():
        if push_mask_hook not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(push_mask_hook, with_kwargs=True)
            module.register_forward_hook(pop_mask_hook, with_kwargs=True, always_call=True)


def detach_mask_hooks(model: nn.Module) -> None:
    """Remove every hook that :func:`attach_mask_hooks` installed."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn in (push_mask_hook, pop_mask_hook)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
