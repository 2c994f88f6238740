"""Every recipe in recipes/ runs end to end with ``--smoke`` (seconds) and delivers what its docstring promises."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import star_hf

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_recipe_has_a_docstring_a_main_and_a_smoke_flag():
    for path in sorted(RECIPES.glob("[!_]*.py")):  # _recipe_args.py holds shared flags
        module = load(path.stem)
        assert module.__doc__ and len(module.__doc__) > 300, path.name
        assert callable(module.main) and "--smoke" in path.read_text(), path.name


@pytest.mark.slow
def test_upgrade_sft_mixtral_smoke(tmp_path):
    from transformers import AutoModelForCausalLM

    summary = load("upgrade_sft_mixtral").main(["--smoke", "--output-dir", str(tmp_path)])
    assert summary["step0_max_abs_logit_diff"] <= 1e-5  # the upgrade kept the outputs
    assert summary["response_loss_after"] < summary["response_loss_before"]
    assert summary["folded_reload_max_abs_logit_diff"] <= 1e-5 and summary["adapter_reload_max_abs_logit_diff"] <= 1e-5
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded_model")
    restored = star_hf.load_adapter(folded, tmp_path / "star_adapter")
    assert len(star_hf.find_star_routers(restored)) == 2


def test_sft_examples_take_the_loss_on_responses_only():
    recipe = load("upgrade_sft_mixtral")
    args = recipe.parse_args(["--smoke"])
    from star_hf.experiments.data import ByteTokenizer

    train, eval_batches, _collate, prompt = recipe.sft_data(args, ByteTokenizer())
    example = train[0]
    prompt_len = example["labels"].index(next(t for t in example["labels"] if t != -100))
    assert bytes(t - 3 for t in example["input_ids"][1:prompt_len]).decode().startswith(("def ", "async def "))
    batch = eval_batches[0]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert prompt.endswith('"""')


@pytest.mark.slow
def test_qwen_moe_lora_smoke(tmp_path):
    summary = load("qwen_moe_lora").main(["--smoke", "--output-dir", str(tmp_path)])
    assert summary["step0_max_abs_logit_diff"] <= 1e-5
    assert 0 < summary["router_parameters"] < summary["trainable_parameters"] < summary["total_parameters"]
    # The saved adapter restores LoRA and the trained STAR routers on a fresh base; merging + folding is exact.
    assert summary["reload_max_abs_logit_diff"] <= 1e-5 and summary["reload_max_abs_router_diff"] == 0.0
    assert summary["merged_folded_max_abs_logit_diff"] <= 1e-4
    config = json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["gate_up_proj", "down_proj"]
    assert any(m.endswith("mlp.gate") for m in config["modules_to_save"])


def test_qwen3_moe_lora_on_attention_only(tmp_path):
    summary = load("qwen_moe_lora").main(
        ["--smoke", "--arch", "qwen3_moe", "--lora-targets", "attention", "--output-dir", str(tmp_path)]
    )
    assert summary["reload_max_abs_router_diff"] == 0.0 and summary["merged_folded_max_abs_logit_diff"] <= 1e-4
    config = json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())
    assert not config.get("target_parameters") and set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }


def test_switch_seq2seq_smoke(tmp_path):
    summary = load("switch_seq2seq").main(["--smoke", "--output-dir", str(tmp_path)])
    stacks = {row["stack"] for row in summary["routers"]}
    assert stacks == {"encoder", "decoder"}
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert all(layer["drift_mean"] > 0 for layer in summary["routing"])  # GHA moved every basis
    assert summary["folded_reload_max_abs_logit_diff"] <= 1e-5 and summary["adapter_reload_max_abs_logit_diff"] <= 1e-5


def test_switch_seq2seq_upgrades_a_checkpoint_with_calibration(tmp_path):
    recipe = load("switch_seq2seq")
    args = recipe.parse_args(["--smoke"])
    from star_hf.experiments.data import ByteTokenizer

    recipe.stock_model(args, recipe.sentinels(ByteTokenizer(), args.num_sentinels)).save_pretrained(tmp_path / "ckpt")
    summary = recipe.main(["--smoke", "--model-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out")])
    assert summary["step0_max_abs_logit_diff"] <= 1e-5


@pytest.mark.slow
def test_pretrain_compare_smoke(tmp_path):
    payload = load("pretrain_compare").main(["--smoke", "--output-dir", str(tmp_path)])
    linear, star = payload["runs"]["linear"][0], payload["runs"]["star"][0]
    # Both variants are evaluated at the same steps; only STAR has an interpolation s.
    assert [p["step"] for p in linear["curve"]] == [p["step"] for p in star["curve"]] == [0, 2, 4]
    assert "s" in star["final"] and "s" not in linear["final"]
    assert (tmp_path / "curves.png").stat().st_size > 0 and "| star |" in (tmp_path / "table.md").read_text()


def test_recipes_refuse_bad_flags(tmp_path):
    for name in ("upgrade_sft_mixtral", "qwen_moe_lora", "switch_seq2seq", "pretrain_compare"):
        recipe = load(name)
        with pytest.raises(SystemExit):
            recipe.parse_args(["--steps", "0"])
        with pytest.raises(SystemExit):
            recipe.parse_args(["--model-dir", str(tmp_path / "missing")])
        with pytest.raises(SystemExit):
            recipe.parse_args(["--gha-lr", "nan"])
