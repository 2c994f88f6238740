"""recipes/finetune_trainer.py --smoke runs end to end (CI) and saves a checkpoint star_hf reloads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import star_hf

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "finetune_trainer.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("finetune_trainer", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_trains_logs_routing_metrics_and_saves(tmp_path, capsys):
    summary = load_recipe().main(["--smoke", "--output-dir", str(tmp_path)])
    final = tmp_path / "final"
    assert summary["steps"] == 4 and summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert json.loads((final / "summary.json").read_text()) == summary
    assert "star/load_entropy_mean" in capsys.readouterr().out  # in the Trainer's printed logs
    reloaded = star_hf.from_pretrained(final)
    assert star_hf.routing_report(reloaded).summary()["star/orthonormality_error_max"] == pytest.approx(
        summary["routing"]["star/orthonormality_error_max"]
    )
    assert "| router |" in (final / "routing_report.md").read_text()


def test_bad_arguments_are_refused(tmp_path):
    recipe = load_recipe()
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model-dir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--steps", "0"])
