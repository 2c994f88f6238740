"""STAR adapters: save_adapter / load_adapter round trips, mismatch errors, Hub path, corrupt files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import star_hf
from star_hf import (
    AdapterMismatchError,
    CorruptFileError,
    StarConfig,
    find_star_routers,
    load_adapter,
    save_adapter,
)

from .serialization_utils import (
    BUILDERS,
    LAYER_1_ON_DISK,
    assert_same_star_state,
    batch,
    outputs,
    star_state,
    trained,
)

ARCHS = list(BUILDERS)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("name", ARCHS)
def test_adapter_round_trip_into_a_stock_base(name, tmp_path):
    model = trained(name, StarConfig(num_components=3, gha_lr=1e-3))
    returned = save_adapter(model, tmp_path, base_model_name_or_path="org/tiny-base", revision="abc123")
    assert returned == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["star_adapter.safetensors", "star_config.json"]
    adapter_bytes = (tmp_path / "star_adapter.safetensors").stat().st_size
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert adapter_bytes < model_bytes / 20  # only the routers, not the model

    base = BUILDERS[name]()
    assert load_adapter(base, tmp_path) is base
    assert list(find_star_routers(base)) == list(find_star_routers(model))
    assert_same_star_state(star_state(model), star_state(base))
    inputs = batch()
    assert torch.equal(outputs(base, inputs), outputs(model, inputs))
    assert base.config.star_config == model.config.star_config


def test_adapter_config_describes_the_base_model(tmp_path):
    model = trained("mixtral")
    save_adapter(model, tmp_path, base_model_name_or_path="org/tiny-mixtral", revision="v1")
    meta = json.loads((tmp_path / "star_config.json").read_text())
    assert meta["base_model"] == {
        "name_or_path": "org/tiny-mixtral",
        "revision": "v1",
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 32,
        "num_hidden_layers": 2,
    }
    assert meta["star_config"] == model.config.star_config
    assert meta["routers"]["model.layers.0.mlp.gate"] == {
        "class": "MixtralTopKRouter",
        "num_experts": 4,
        "hidden_size": 32,
        "num_components": 4,
        "bias": False,
    }
    tensors, _ = star_hf.persistence.io.read_safetensors(tmp_path / "star_adapter.safetensors")
    # in-memory module naming (not the checkpoint's block_sparse_moe layout)
    assert sorted(tensors) == sorted(
        f"model.layers.{i}.mlp.gate.{n}"
        for i in (0, 1)
        for n in ("star_alpha", "star_basis", "star_linear_weight", "star_mixing")
    )


def test_base_name_defaults_to_the_checkpoint_it_was_loaded_from(tmp_path):
    BUILDERS["mixtral"]().save_pretrained(tmp_path / "base")
    model = star_hf.patch_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "star_config.json").read_text())
    assert meta["base_model"]["name_or_path"] == str(tmp_path / "base")


def test_adapter_on_a_sharded_bf16_checkpoint(tmp_path):
    """The real-checkpoint path: sharded base loaded with dtype/device_map, patched, adapter saved and loaded."""
    BUILDERS["qwen2_moe"]().save_pretrained(tmp_path / "base", max_shard_size="20KB")
    load = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16, device_map="cpu")  # noqa: E731
    model = star_hf.patch_model(load())
    with torch.no_grad():
        for router in find_star_routers(model).values():
            router.star_mixing.mul_(-1.5)
            router.star_basis.copy_(router.star_basis.flip(0))
    save_adapter(model, tmp_path / "adapter")
    base = load_adapter(load(), tmp_path / "adapter")
    state = star_state(base)
    assert_same_star_state(star_state(model), state)
    assert state["model.layers.0.mlp.gate.star_mixing"].dtype == torch.bfloat16
    assert state["model.layers.0.mlp.gate.star_basis"].dtype == torch.float32
    inputs = batch()
    assert torch.equal(outputs(base, inputs), outputs(model, inputs))


def test_float32_adapter_into_bf16_base_casts_parameters_and_keeps_a_float32_basis(tmp_path):
    model = trained("mixtral")
    save_adapter(model, tmp_path)
    base = load_adapter(BUILDERS["mixtral"]().to(torch.bfloat16), tmp_path)
    saved = star_state(model)
    for key, value in star_state(base).items():
        expected = saved[key] if key.endswith("star_basis") else saved[key].to(torch.bfloat16)
        assert value.dtype == expected.dtype and torch.equal(value, expected), key


# ----------------------------------------------------------------------------------- mismatches
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: BUILDERS["qwen2_moe"](), r"architecture \(model_type\): adapter 'mixtral', model 'qwen2_moe'"),
        (lambda: BUILDERS["mixtral"](hidden_size=48), r"hidden size: adapter 32, model 48"),
        (
            lambda: BUILDERS["mixtral"](num_local_experts=8),
            r"model\.layers\.0\.mlp\.gate expert count: adapter 4, model 8",
        ),
        (lambda: BUILDERS["mixtral"](num_hidden_layers=3), r"number of layers: adapter 2, model 3"),
    ],
    ids=["architecture", "hidden-size", "experts", "layers"],
)
def test_mismatch_is_a_clear_error_before_anything_changes(tmp_path, build, match):
    save_adapter(trained("mixtral"), tmp_path)
    base = build()
    before = _state(base)
    with pytest.raises(AdapterMismatchError, match=match):
        load_adapter(base, tmp_path)
    assert not find_star_routers(base) and _unchanged(base, before)
    assert "star_config" not in base.config.to_dict()


def test_router_path_mismatch_names_the_paths(tmp_path):
    save_adapter(trained("mixtral", StarConfig(layers_to_transform=[1])), tmp_path)
    meta = json.loads((tmp_path / "star_config.json").read_text())
    meta["star_config"]["layers_to_transform"] = None  # the config now selects layer 0 too
    (tmp_path / "star_config.json").write_text(json.dumps(meta))
    base = BUILDERS["mixtral"]()
    with pytest.raises(AdapterMismatchError, match=r"the adapter lacks: \['model\.layers\.0\.mlp\.gate'\]"):
        load_adapter(base, tmp_path)
    assert not find_star_routers(base)


def test_partial_adapter_patches_only_its_layers(tmp_path):
    model = trained("mixtral", StarConfig(layers_to_transform=[1]))
    save_adapter(model, tmp_path)
    base = load_adapter(BUILDERS["mixtral"](), tmp_path)
    assert list(find_star_routers(base)) == ["model.layers.1.mlp.gate"]
    inputs = batch()
    assert torch.equal(outputs(base, inputs), outputs(model, inputs))


def test_adapter_into_a_base_with_offloaded_routers_is_refused(tmp_path):
    save_adapter(trained("mixtral"), tmp_path / "adapter")
    BUILDERS["mixtral"]().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=LAYER_1_ON_DISK, offload_folder=str(tmp_path / "off")
    )
    with pytest.raises(ValueError, match=r"\['model\.layers\.1\.mlp\.gate'\] were offloaded"):
        load_adapter(base, tmp_path / "adapter")
    assert not find_star_routers(base)


# ------------------------------------------------------------------------------ already patched
def test_adapter_into_an_already_patched_model_with_the_same_config(tmp_path):
    config = StarConfig(num_components=3)
    model = trained("mixtral", config, seed=1)
    save_adapter(model, tmp_path)
    # Same config apart from the initialisation fields (seed/init), which a load overwrites anyway.
    other = trained("mixtral", StarConfig(num_components=3, seed=5, init="paper"), seed=2)
    other.train()
    other(**batch())  # pending statistics against the old basis must go
    load_adapter(other, tmp_path)
    assert_same_star_state(star_state(model), star_state(other))
    assert all(r.star_pending_statistics is None for r in find_star_routers(other).values())
    other.eval()
    inputs = batch()
    assert torch.equal(outputs(other, inputs), outputs(model, inputs))


def test_adapter_into_a_patched_model_with_another_config_is_refused(tmp_path):
    save_adapter(trained("mixtral", StarConfig(num_components=3, gha_lr=1e-3)), tmp_path)
    other = trained("mixtral", StarConfig(num_components=2))
    before = _state(other)
    with pytest.raises(
        AdapterMismatchError,
        match=r"already patched.*gha_lr: adapter 0.001, model 5e-05; "
        r"StarConfig.num_components: adapter 3, model 2\. Load",
    ):
        load_adapter(other, tmp_path)
    assert _unchanged(other, before)


# --------------------------------------------------------------------------------- Hub repo ids
def test_repo_id_goes_through_hf_hub_download(tmp_path, monkeypatch):
    model = trained("switch")
    save_adapter(model, tmp_path / "local")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(tmp_path / "local" / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    base = load_adapter(BUILDERS["switch"](), "org/star-switch", revision="r1", token="t")
    assert [c[:2] for c in calls] == [
        ("org/star-switch", "star_config.json"),
        ("org/star-switch", "star_adapter.safetensors"),
    ]
    assert all(c[2] == {"revision": "r1", "token": "t"} for c in calls)
    assert_same_star_state(star_state(model), star_state(base))


def test_failed_download_says_what_failed(monkeypatch):
    def offline(repo_id, filename, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    base = BUILDERS["mixtral"]()
    with pytest.raises(
        OSError, match=r"downloading star_config\.json from the Hugging Face Hub repo 'org/x'.*no network"
    ):
        load_adapter(base, "org/x")
    assert not find_star_routers(base)


def test_missing_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a STAR adapter folder"):
        load_adapter(BUILDERS["mixtral"](), str(tmp_path / "no" / "such" / "dir"))


# ---------------------------------------------------------------------------- corrupt adapters
def _broken_adapter(tmp_path: Path, how: str) -> Path:
    folder = tmp_path / how
    save_adapter(trained("mixtral"), folder)
    weights, config = folder / "star_adapter.safetensors", folder / "star_config.json"
    if how == "missing-config":
        config.unlink()
    elif how == "missing-weights":
        weights.unlink()
    elif how == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:200])
    elif how == "bad-json":
        config.write_text(config.read_text()[:50])
    elif how == "not-an-adapter":
        config.write_text(json.dumps({"model_type": "mixtral"}))
    elif how == "unknown-star-field":
        meta = json.loads(config.read_text())
        meta["star_config"]["gha_learning_rate"] = 1.0
        config.write_text(json.dumps(meta))
    elif how == "router-fields":
        meta = json.loads(config.read_text())
        del meta["routers"]["model.layers.1.mlp.gate"]["num_experts"]
        config.write_text(json.dumps(meta))
    elif how == "mismatched-pair":
        save_adapter(trained("mixtral", StarConfig(num_components=2)), tmp_path / "other")
        weights.write_bytes((tmp_path / "other" / "star_adapter.safetensors").read_bytes())
    return folder


@pytest.mark.parametrize(
    "how, error, match",
    [
        ("missing-config", FileNotFoundError, r"STAR adapter config .*star_config\.json does not exist"),
        ("missing-weights", FileNotFoundError, r"STAR adapter weights .*star_adapter\.safetensors does not exist"),
        ("truncated-weights", CorruptFileError, r"star_adapter\.safetensors is not a readable safetensors file"),
        ("bad-json", CorruptFileError, r"star_config\.json is not valid JSON"),
        ("not-an-adapter", CorruptFileError, r"star_config\.json is not a star_hf adapter config"),
        ("router-fields", CorruptFileError, r"router 'model\.layers\.1\.mlp\.gate' must list num_experts"),
        ("mismatched-pair", CorruptFileError, r"star_mixing: shape \(4, 2\), expected \(4, 4\)"),
    ],
)
def test_missing_or_corrupt_files_are_named(tmp_path, how, error, match):
    folder = _broken_adapter(tmp_path, how)
    base = BUILDERS["mixtral"]()
    with pytest.raises(error, match=match):
        load_adapter(base, folder)
    assert not find_star_routers(base)


def test_a_star_config_field_unknown_to_this_version_is_ignored_with_a_warning(tmp_path):
    """Forward compatibility, as PEFT does it: an older star_hf reads a newer adapter's config."""
    folder = _broken_adapter(tmp_path, "unknown-star-field")
    base = BUILDERS["mixtral"]()
    with pytest.warns(UserWarning, match=r"ignoring field\(s\) \['gha_learning_rate'\] unknown to this version"):
        load_adapter(base, folder)
    assert len(find_star_routers(base)) == 2


def test_save_adapter_keeps_other_files_of_the_folder(tmp_path):
    (tmp_path / "README.md").write_text("notes")
    save_adapter(trained("mixtral"), tmp_path)
    assert (tmp_path / "README.md").read_text() == "notes"
    assert {p.name for p in tmp_path.iterdir()} == {"README.md", "star_config.json", "star_adapter.safetensors"}


def test_save_adapter_of_an_unpatched_model_is_refused(tmp_path):
    with pytest.raises(star_hf.NotPatchedError, match="no STAR routers"):
        save_adapter(BUILDERS["mixtral"](), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_adapter_of_a_deepcopy_and_of_a_wrapped_model(tmp_path):
    model = trained("mixtral")
    wrapper = torch.nn.Sequential()
    wrapper.add_module("inner", copy.deepcopy(model))
    save_adapter(wrapper, tmp_path)  # paths are relative to the Transformers model inside
    base = load_adapter(BUILDERS["mixtral"](), tmp_path)
    assert_same_star_state(star_state(model), star_state(base))


def test_adapter_of_a_peft_wrapped_model_uses_the_transformers_paths(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = trained("mixtral")
    expected = star_state(model)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2))
    save_adapter(peft_model, tmp_path)
    meta = json.loads((tmp_path / "star_config.json").read_text())
    assert list(meta["routers"]) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    base = load_adapter(BUILDERS["mixtral"](), tmp_path)
    state = star_state(base)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
