"""star_hf.patching.checkpoint_layout: Transformers' checkpoint key conversion, applied where the
Trainer's resume skips it (a plain ``load_state_dict`` of a ``save_pretrained`` folder)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from star_hf import StarConfig, find_star_routers, fold, patch_model
from star_hf.patching.checkpoint_layout import to_model_layout

from .conftest import tiny_mixtral
from .test_resume import assert_same_state


def _trained(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model


def test_to_model_layout_also_serves_unpatched_models(tmp_path):
    model = tiny_mixtral()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path)
    fresh = tiny_mixtral()
    converted = to_model_layout(fresh, load_file(tmp_path / "model.safetensors"))
    result = fresh.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state(model, fresh)


def test_model_layout_state_dicts_pass_through_unchanged():
    model = patch_model(tiny_mixtral())
    state = model.state_dict()
    assert to_model_layout(model, state).keys() == state.keys()
    other = patch_model(tiny_mixtral(), StarConfig(seed=5))
    other.load_state_dict(state)
    assert_same_state(model, other)


def test_the_load_hook_restores_a_checkpoint_saved_in_the_original_layout(tmp_path):
    """Transformers saves Mixtral in its original checkpoint layout (other keys than in memory); the
    hook converts them on load_state_dict."""
    model = _trained(patch_model(tiny_mixtral()))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) - set(model.state_dict())  # the saved layout is not the in-memory one
    fresh = patch_model(tiny_mixtral(), StarConfig(seed=9))
    result = fresh.load_state_dict(saved, strict=False)
    assert not result.missing_keys
    assert_same_state(model, fresh)


def test_fold_removes_the_load_hook():
    model = patch_model(tiny_mixtral())
    hooks = len(model._load_state_dict_pre_hooks)
    assert hooks == len(tiny_mixtral()._load_state_dict_pre_hooks) + 1
    fold(model)
    assert len(model._load_state_dict_pre_hooks) == hooks - 1 and not find_star_routers(model)
