"""star_hf.paths: the one implementation of hf_root, canonical_path and layer_index."""

from __future__ import annotations

import pytest
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from star_hf import patch_model
from star_hf.paths import canonical_path, check_repo_id, find_hf_model, hf_root, is_repo_id, layer_index

from .conftest import tiny_mixtral


def test_hf_root_finds_the_transformers_model_under_wrappers():
    model = tiny_mixtral()
    assert hf_root(model) == ("", model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert hf_root(peft_model) == ("base_model.model", model)
    wrapper = nn.ModuleDict({"inner": model})
    assert hf_root(wrapper) == ("inner", model)
    assert find_hf_model(nn.Linear(2, 2)) is None
    with pytest.raises(TypeError, match="does not wrap"):
        hf_root(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "path, prefix, canonical",
    [
        ("model.layers.0.mlp.gate", "", "model.layers.0.mlp.gate"),
        ("base_model.model.model.layers.0.mlp.gate", "base_model.model", "model.layers.0.mlp.gate"),
        ("model.layers.0.mlp.gate.modules_to_save.default", "", "model.layers.0.mlp.gate"),
        ("model.layers.0.mlp.gate.original_module", "", "model.layers.0.mlp.gate"),
        ("m.layers.0.mlp.modules_to_save.second.router.classifier", "", "m.layers.0.mlp.router.classifier"),
        ("model.original_modules.x", "", "model.original_modules.x"),  # only whole segments
    ],
)
def test_canonical_path(path, prefix, canonical):
    assert canonical_path(path, prefix) == canonical


def test_canonical_path_refuses_a_path_outside_the_prefix():
    with pytest.raises(ValueError, match="is not inside"):
        canonical_path("other.layers.0", "base_model.model")


@pytest.mark.parametrize(
    "path, pattern, index",
    [
        ("model.layers.7.mlp.gate", None, 7),
        ("encoder.block.3.layer.1.mlp.router.classifier", None, 3),
        ("encoder.block.3.layer.1.mlp.router.classifier", "layer", 1),
        ("encoder.block.3.layer.1.mlp.router.classifier", ["blocks", "block"], 3),
        ("model.layers.2.mlp.experts.5", None, 2),
        ("0.router", None, 0),
        ("lm_head", None, None),
        ("model.layers.7.mlp.gate", "h", None),
        ("base_model.model.model.layers.4.mlp.gate.modules_to_save.default", None, 4),
    ],
)
def test_layer_index(path, pattern, index):
    assert layer_index(path, pattern) == index


def test_the_paths_of_a_patched_peft_model_name_the_routers_of_the_base():
    peft_model = get_peft_model(patch_model(tiny_mixtral()), LoraConfig(r=2, target_modules=["q_proj"]))
    prefix, _ = hf_root(peft_model)
    routers = [p for p, _ in peft_model.named_modules() if p.endswith("modules_to_save.default")]
    assert [canonical_path(p, prefix) for p in routers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert [layer_index(p) for p in routers] == [0, 1]


@pytest.mark.parametrize(
    "text, repo",
    [
        ("mistralai/Mixtral-8x7B-v0.1", True),
        ("gpt2", True),
        ("me/my--model", False),
        ("me/../etc", False),
        ("./local/folder", False),
        ("/abs/folder", False),
        ("a/b/c", False),
        ("", False),
        (None, False),
    ],
)
def test_is_repo_id(text, repo):
    assert is_repo_id(text) is repo


def test_an_existing_folder_is_never_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not is_repo_id("owner/name")
    with pytest.raises(ValueError, match="invalid Hub repository id"):
        check_repo_id("me/../x")
