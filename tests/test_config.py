"""StarConfig: validation that only validates, Literal modes with help, PEFT-style layer selection,
forward-compatible loading."""

from __future__ import annotations

import dataclasses
import json
import typing
import warnings

import pytest

from star_hf import StarConfig, find_star_routers, patch_model
from star_hf.config import INIT_MODES, UPDATE_MODES

from .conftest import tiny_switch


def test_every_field_has_help_text():
    for f in dataclasses.fields(StarConfig):
        assert f.metadata.get("help"), f.name


def test_modes_are_literal_types():
    hints = typing.get_type_hints(StarConfig)
    assert typing.get_args(hints["init"]) == INIT_MODES == ("preserve", "paper")
    assert typing.get_args(hints["update"]) == UPDATE_MODES == ("step", "forward")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gha_lr": float("inf")}, "gha_lr must be a finite number"),
        ({"gha_lr": float("nan")}, "gha_lr must be a finite number"),
        ({"gha_lr": True}, "gha_lr must be a finite number"),
        ({"num_components": 2.0}, "num_components must be a positive integer"),
        ({"gha_only": "yes"}, "gha_only must be True or False"),
        ({"layers_to_transform": ["1"]}, "layers_to_transform must be a list of layer indices"),
        ({"layers_pattern": ""}, "layers_pattern must be a non-empty string"),
        ({"target_modules": 3}, "target_modules must be a regex"),
        ({"seed": -1}, "seed must be an integer in"),
        ({"seed": 2**63}, "seed must be an integer in"),
        ({"seed": 1.5}, "seed must be an integer in"),
        ({"seed": None}, "seed must be an integer in"),
    ],
)
def test_invalid_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StarConfig(**kwargs)


def test_every_problem_is_named_at_once():
    with pytest.raises(ValueError) as err:
        StarConfig(gha_lr=-1, init="zeros", seed="x")
    assert all(s in str(err.value) for s in ("gha_lr", "init", "seed"))


def test_validate_changes_nothing():
    config = StarConfig(layers_to_transform=[1, 0], target_modules=["gate"])
    before = dataclasses.asdict(config)
    config.validate()
    assert dataclasses.asdict(config) == before


def test_a_single_layer_index_becomes_a_list():
    assert StarConfig(layers_to_transform=3).layers_to_transform == [3]


def test_json_round_trip():
    config = StarConfig(gha_lr=1e-3, num_components=3, layers_to_transform=[1], layers_pattern="block", seed=7)
    assert StarConfig.from_json_string(config.to_json_string()) == config


def test_unknown_fields_load_with_one_warning():
    data = {**StarConfig().to_dict(), "a_field_from_the_future": 1, "patched_modules": ["x"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = StarConfig.from_dict(json.loads(json.dumps(data)))
    assert config == StarConfig()
    (warning,) = caught
    assert "['a_field_from_the_future', 'patched_modules']" in str(warning.message)


def test_no_runtime_state_is_written_into_the_config():
    config = StarConfig()
    before = dataclasses.asdict(config)
    model = patch_model(tiny_switch(), config)
    assert dataclasses.asdict(config) == before and find_star_routers(model)


@pytest.mark.parametrize(
    "path, pattern, selected",
    [
        ("model.layers.1.mlp.gate", None, True),
        ("model.layers.11.mlp.gate", None, False),
        ("encoder.block.1.layer.1.mlp.router.classifier", None, True),
        ("encoder.block.3.layer.1.mlp.router.classifier", None, False),  # "layer.1" is not the layer index
        ("encoder.block.3.layer.1.mlp.router.classifier", "layer", True),  # unless asked for
        ("base_model.model.model.layers.1.mlp.gate.modules_to_save.default", None, True),
    ],
)
def test_layers_to_transform_indexes_the_models_layer_list(path, pattern, selected):
    assert StarConfig(layers_to_transform=[1], layers_pattern=pattern).selects(path) is selected


def test_switch_layers_to_transform_patches_that_block_only():
    """Regression: with sparse blocks 1 and 3, layers_to_transform=[1] patched block 3 too (its router
    sits at encoder.block.3.layer.1...)."""
    model = tiny_switch(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    every = sorted(
        find_star_routers(
            patch_model(
                tiny_switch(
                    num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2
                )
            )
        )
    )
    assert any(".block.3." in p for p in every)  # the model has routers in block 3
    patched = sorted(find_star_routers(patch_model(model, StarConfig(layers_to_transform=[1]))))
    assert patched == [p for p in every if ".block.1." in p] and len(patched) == 2
