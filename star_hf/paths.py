"""Module paths in (possibly wrapped) Transformers models: one implementation of each rule.

* :func:`hf_root` finds the Transformers model inside a wrapper (PEFT, DDP, accelerate, ...).
* :func:`canonical_path` names a module as the unwrapped model names it, without PEFT's wrapper
  segments (``.original_module``, ``.modules_to_save.<adapter>``).
* :func:`is_repo_id` / :func:`check_repo_id` tell a Hugging Face Hub repository id (``owner/name``)
  from a local path, by the Hub's own rules (``huggingface_hub.utils.validate_repo_id``).
* :func:`layer_index` is the index of a module's layer in the model's own layer list — the
  outermost indexed list on its path (``model.layers.3``, Switch's ``encoder.block.3``), not any
  number in the path (Switch routers sit at ``encoder.block.3.layer.1.mlp.router``), as PEFT's
  ``layers_to_transform`` + ``layers_pattern`` mean it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch.nn as nn

__all__ = ["canonical_path", "check_repo_id", "find_hf_model", "hf_root", "is_repo_id", "layer_index"]

_PEFT_COPY = re.compile(r"\.modules_to_save\.[^.]+")
_PEFT_ORIGINAL = re.compile(r"\.original_module(?=\.|$)")


def hf_root(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the outermost Transformers ``PreTrainedModel`` in ``model`` (itself or under a wrapper)."""
    from transformers import PreTrainedModel

    for path, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return path, module
    raise TypeError(f"{type(model).__name__} is not (and does not wrap) a Transformers PreTrainedModel.")


def find_hf_model(model: nn.Module) -> nn.Module | None:
    """The outermost Transformers model in ``model``, or ``None`` for a plain ``nn.Module``."""
    try:
        return hf_root(model)[1]
    except TypeError:
        return None


def canonical_path(path: str, root_prefix: str = "") -> str:
    """``path`` relative to the Transformers model at ``root_prefix``, without PEFT's wrapper segments."""
    if root_prefix:
        if path != root_prefix and not path.startswith(root_prefix + "."):
            raise ValueError(f"{path!r} is not inside {root_prefix!r}")
        path = path[len(root_prefix) + 1 :]
    return _PEFT_ORIGINAL.sub("", _PEFT_COPY.sub("", path))


def layer_index(path: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer index of the module at ``path``: the number after the first ``layers_pattern`` segment
    (any of them, if several), or by default the outermost numeric segment. ``None`` if there is none."""
    parts = canonical_path(path).split(".")
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or ())
    for i, part in enumerate(parts):
        if part.isdigit() and (not patterns or (i > 0 and parts[i - 1] in patterns)):
            return int(part)
    return None


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` naming the rule a Hub repository id breaks."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid Hub repository id {repo_id!r}: {err}") from None


def is_repo_id(text: str | None) -> bool:
    """Whether ``text`` names a Hub repository rather than a local path (an existing path never is)."""
    if not isinstance(text, str) or not text or os.path.exists(text) or text.startswith((".", "/", "~")):
        return False
    try:
        check_repo_id(text)
    except ValueError:
        return False
    return True
