"""Loading state dicts written in Transformers' checkpoint layout into a patched model.

Transformers v5 keeps some models in a different layout in memory than on disk: loading converts
checkpoint keys (Mixtral's ``block_sparse_moe.experts.3.w1.weight`` become slices of
``mlp.experts.gate_up_proj``) and ``save_pretrained`` reverts the conversion. Only ``from_pretrained``
applies the forward conversion; ``nn.Module.load_state_dict`` does not. The Trainer resumes from
its own checkpoints with ``load_state_dict`` (``Trainer._load_from_checkpoint`` and
``trainer_utils.load_sharded_checkpoint``), so on 5.23 the converted weights — Mixtral's experts
and routers, the STAR parameters and the basis among them — are silently left at their current
values.

:func:`to_model_layout` applies Transformers' own conversion table to a state dict, and the
load-state-dict pre-hook installed by ``patch_model`` applies it to every ``load_state_dict`` of a
patched model, so resuming a patched model restores every tensor. Keys already in the model's
layout pass through untouched.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
import torch.nn as nn

from star_hf.paths import find_hf_model

__all__ = ["CheckpointLayoutHook", "attach_checkpoint_layout_hook", "detach_checkpoint_layout_hook", "to_model_layout"]


def _conversions(model: nn.Module) -> tuple[list, list]:
    """The (renamings, converters) Transformers applies when loading a checkpoint of ``model``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        PrefixChange,
        WeightConverter,
        WeightRenaming,
    )

    transforms = getattr(model, "_weight_conversions", None)
    if transforms is None:
        # A model built from a config: the same table save_pretrained reverts, without prefix changes
        # (as in transformers.core_model_loading.revert_weight_conversion).
        transforms = [t for t in get_model_conversion_mapping(model) if not isinstance(t, PrefixChange)]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _converted_groups(
    model: nn.Module, state_dict: dict[str, Any], expected: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], list[tuple[list[str], dict[str, Any] | None]]]:
    """Rename/convert the keys of ``state_dict`` that are not in ``expected``.

    Returns the one-to-one renames (old key → new key) and, for many-to-one conversions, a list of
    (source keys, converted tensors by new key — or ``None`` when the group is incomplete, e.g. split
    across checkpoint shards). Keys that map to nothing in ``expected`` are left out of both.
    """
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = _conversions(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    renamed: dict[str, Any] = {}
    groups: dict[str, tuple[list[str], Any]] = {}
    for key in sorted(state_dict, key=dot_natural_key):
        if key in expected:
            continue
        new_key, pattern = rename_source_key(key, renamings, converters)
        if new_key not in expected:
            continue  # not a checkpoint-layout key of this model: leave it for the usual report
        if pattern is None:
            renamed[key] = new_key
            continue
        sources, converter = groups.setdefault(new_key, ([], deepcopy(by_pattern[pattern])))
        sources.append(key)
        converter.add_tensor(new_key, key, pattern, state_dict[key])
    results = []
    for first, (sources, converter) in groups.items():
        results.append((sources, _convert_group(model, first, converter, expected)))
    return renamed, results


def _convert_group(model: nn.Module, first: str, converter: Any, expected: dict[str, torch.Tensor]) -> dict | None:
    """The converted tensors of one group, or ``None`` if the group is incomplete."""
    try:
        realized = converter.convert(first, model=model, config=model.config)
    except (RuntimeError, ValueError, KeyError, IndexError):
        # Transformers' ops fail on a partial group (e.g. a concatenation missing one of its inputs).
        return None
    out = {}
    for name, value in realized.items():
        value = value[0] if isinstance(value, list) else value
        target = expected.get(name)
        if target is None or tuple(value.shape) != tuple(target.shape):
            return None
        out[name] = value
    return out


def to_model_layout(model: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with checkpoint-layout keys converted to ``model``'s in-memory layout.

    ``model`` is a Transformers ``PreTrainedModel`` (patched or not); keys that are already in its
    layout, and keys that belong to neither layout, are returned unchanged.
    """
    expected = model.state_dict(keep_vars=True)
    renamed, groups = _converted_groups(model, state_dict, expected)
    out = {renamed.get(k, k): v for k, v in state_dict.items()}
    for sources, converted in groups:
        if converted is not None:
            for key in sources:
                out.pop(key)
            out.update(converted)
    return out


class CheckpointLayoutHook:
    """``load_state_dict`` pre-hook that converts checkpoint-layout keys for one PreTrainedModel.

    A group split across shards (``load_sharded_checkpoint`` loads one shard per call) is kept
    until its last tensor arrives; meanwhile its keys stay in the state dict and are reported as
    unexpected, as they are not loaded yet.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] = {}

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        expected = module.state_dict(keep_vars=True)
        local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if all(k in expected for k in local) and not self.pending:
            return
        candidates = {**self.pending, **{k: v for k, v in local.items() if k not in expected}}
        renamed, groups = _converted_groups(module, candidates, expected)
        for old, new in renamed.items():
            if old in local:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        for sources, converted in groups:
            if converted is None:
                self.pending.update({k: candidates[k] for k in sources})
                continue
            for key in sources:
                self.pending.pop(key, None)
                state_dict.pop(prefix + key, None)
            state_dict.update({prefix + k: v for k, v in converted.items()})


def attach_checkpoint_layout_hook(model: nn.Module) -> None:
    """Install the conversion hook on the outermost Transformers model inside ``model`` (idempotent)."""
    target = find_hf_model(model)
    if target is None or _hook_keys(target):
        return
    target.register_load_state_dict_pre_hook(CheckpointLayoutHook())


def detach_checkpoint_layout_hook(model: nn.Module) -> None:
    """Remove every hook :func:`attach_checkpoint_layout_hook` installed in ``model``."""
    for module in model.modules():
        for key in _hook_keys(module):
            del module._load_state_dict_pre_hooks[key]


def _hook_keys(module: nn.Module) -> list[int]:
    hooks = module._load_state_dict_pre_hooks
    return [k for k, h in hooks.items() if isinstance(getattr(h, "hook", h), CheckpointLayoutHook)]
