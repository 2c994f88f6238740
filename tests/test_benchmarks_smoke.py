"""The evidence benchmarks run end to end in their ``--smoke`` setting and write what they promise."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs a whole benchmark in its --smoke setting

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path: Path) -> dict:
    module = _load(name)
    assert module.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    return json.loads((tmp_path / f"{name}.json").read_text())


def _finite(summary: dict) -> None:
    for variant, figures in summary.items():
        for key, stats in figures.items():
            assert math.isfinite(stats["mean"]), (variant, key)


def test_synthetic_routing_smoke(tmp_path):
    result = _run("synthetic_routing", tmp_path)
    summary = result["summary"]
    assert set(summary) == {"linear", "linear, STAR init", "star η=0", "star η=5e-05", "star η=0.01"}
    _finite(summary)
    assert 0.0 <= summary["linear"]["nmi"]["mean"] <= 1.0
    # The frozen-basis control keeps its basis; GHA moves it.
    frozen = result["runs"]["star η=0"][0]["curve"]["drift"]
    moving = result["runs"]["star η=0.01"][0]["curve"]["drift"]
    assert frozen[-1] == 0.0 and moving[-1] > 0.0


def test_tiny_lm_smoke(tmp_path):
    result = _run("tiny_lm", tmp_path)
    assert set(result["summary"]) == {"linear", "linear, STAR init", "star η=0", "star η=5e-05", "star η=0.001"}
    _finite(result["summary"])
    # Every variant is evaluated before training and at the end.
    for runs in result["runs"].values():
        steps = [p["step"] for p in runs[0]["curve"]]
        assert steps[0] == 0 and steps[-1] == 4


def test_upgrade_smoke(tmp_path):
    result = _run("upgrade", tmp_path)
    _finite(result["summary"])
    for variant, runs in result["runs"].items():
        for run in runs:
            assert run["step0"]["val_loss_abs_diff"] <= 1e-5, variant
            assert run["step0"]["logits_max_abs_diff"] <= 1e-5, variant
