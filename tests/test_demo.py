"""``star-hf demo``: every stage runs end to end (``--smoke``), user data and checkpoints come in through
flags, and bad input is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import star_hf
from star_hf.cli import main
from star_hf.experiments.data import load_dataset_documents, read_text_documents
from star_hf.experiments.demo import DemoConfig


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", "--smoke", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_smoke_demo_writes_the_report_folder(demo_run, capsys):
    out, results = demo_run
    for name in ("report.md", "loss_curves.png", "routing.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for section in (
        "## Configuration",
        "## Step 0",
        "## Fine-tuning: baseline vs STAR",
        "## Routing after fine-tuning",
        "## Test-time adaptation on a shifted domain",
        "## Files",
        "![loss curves](loss_curves.png)",
    ):
        assert section in report, section
    assert results["command"].startswith("star-hf demo --output-dir")
    assert list(results["finetune"]) == ["baseline", "STAR"]


def test_smoke_demo_upgrade_keeps_step0_and_both_runs_start_equal(demo_run):
    _, results = demo_run
    step0 = results["step0"]
    assert step0["unchanged"] and step0["calibrated_max_abs_logit_diff"] <= 1e-5
    base, star = (results["finetune"][name]["curve"] for name in ("baseline", "STAR"))
    assert base[0]["val_loss"] == pytest.approx(star[0]["val_loss"], abs=1e-5)
    assert [p["step"] for p in star] == [0, 2, 4]
    # Training ran: the STAR bases moved by GHA, and the models diverged from the common start.
    assert all(layer["drift_mean"] > 0 for layer in results["routing_report"])
    assert base[-1]["val_loss"] < base[0]["val_loss"]


def test_smoke_demo_adaptation_moves_the_bases_only_when_adapting(demo_run):
    _, results = demo_run
    rows = results["tta"]["rows"]
    assert {r["domain"] for r in rows} == {"original (held out)", "shifted"}
    adapted = [r for r in rows if r["model"] == "STAR" and r["adaptation"] != "none"]
    assert len(adapted) == 2 and all(r["basis_shift"] > 0 for r in adapted)
    assert all(0.0 <= r["top1_changed"] <= 1.0 for r in adapted)


def test_smoke_demo_exports_reload_as_the_fine_tuned_star_model(demo_run):
    """The folded export loads in plain Transformers; the adapter on it restores STAR routers with the same logits."""
    from transformers import AutoModelForCausalLM

    out, results = demo_run
    assert results["checks"]["folded_reload_max_abs_logit_diff"] <= 1e-5
    assert results["checks"]["adapter_reload_max_abs_logit_diff"] <= 1e-5
    folded = AutoModelForCausalLM.from_pretrained(out / "folded_model")
    assert not star_hf.find_star_routers(folded)
    adapted = star_hf.load_adapter(AutoModelForCausalLM.from_pretrained(out / "folded_model"), out / "star_adapter")
    assert len(star_hf.find_star_routers(adapted)) == 2
    ids = torch.randint(3, 259, (2, 16))
    torch.testing.assert_close(_logits(adapted, ids), _logits(folded, ids), rtol=0, atol=1e-5)
    pretrained = AutoModelForCausalLM.from_pretrained(out / "base_model")  # before fine-tuning: different
    assert not torch.allclose(_logits(pretrained, ids), _logits(folded, ids), atol=1e-3)
    meta = json.loads((out / "star_adapter" / "star_config.json").read_text())
    assert str(out / "folded_model") in json.dumps(meta)
    assert results["files"]["star_adapter"] < results["files"]["folded_model"]


def test_demo_upgrades_a_local_checkpoint_on_user_text(demo_run, tmp_path):
    out, _ = demo_run
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog, number {i}." for i in range(60)]
    (tmp_path / "train.txt").write_text("\n\n".join(paragraphs))
    (tmp_path / "eval.txt").write_text("\n\n".join(paragraphs[:8]))
    (tmp_path / "shift.txt").write_text("\n\n".join(f"x_{i} = [{i}, {i * i}]  # code" for i in range(40)))
    report = tmp_path / "report"
    args = [
        "demo",
        "--smoke",
        "--output-dir",
        str(report),
        "--model-dir",
        str(out / "base_model"),
        "--train-file",
        str(tmp_path / "train.txt"),
        "--eval-file",
        str(tmp_path / "eval.txt"),
        "--shift-file",
        str(tmp_path / "shift.txt"),
        "--seq-len",
        "16",
    ]
    assert main(args) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["pretrain"] is None and not (report / "base_model").exists()
    assert "train.txt" in results["data"]["train"] and "shift.txt" in results["data"]["shift"]
    assert results["step0"]["unchanged"]
    assert results["checks"]["adapter_reload_max_abs_logit_diff"] <= 1e-5
    # A second run replaces the previous report folder (it is a demo report).
    assert main(args) == 0


def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, demo_run):
    out, _ = demo_run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["demo", "--smoke", "--output-dir", str(taken)]) == 1
    assert "not a star-hf demo report" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"
    cases = [
        (["--train-file", str(tmp_path / "missing.txt")], "is not a file"),
        (["--train-file", str(taken / "keep.txt"), "--dataset-dir", str(tmp_path)], "not both"),
        (["--model-dir", str(tmp_path)], "no config.json"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--tta-lr", "nan"], "--tta-lr must be a finite number"),
        (["--shift-corpus", "wikipedia"], "--shift-corpus must be one of"),
    ]
    for extra, message in cases:
        target = tmp_path / "new"
        assert main(["demo", "--smoke", "--output-dir", str(target), *extra]) == 1
        assert message in capsys.readouterr().err, extra
        assert not target.exists()
    # A STAR checkpoint is not a base model to upgrade.
    model = star_hf.patch_model(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(out / "base_model"), star_hf.StarConfig()
    )
    model.save_pretrained(tmp_path / "star_ckpt")
    assert (
        main(["demo", "--smoke", "--output-dir", str(tmp_path / "new"), "--model-dir", str(tmp_path / "star_ckpt")])
        == 1
    )
    assert "already a STAR checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_user_text_readers(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n\n  \nsecond\n")
    assert read_text_documents(tmp_path / "a.txt") == ["first paragraph\nstill first", "second"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_text_documents(tmp_path / "empty.txt")
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"content": ["a b", "", "c d"]}),
        validation=datasets.Dataset.from_dict({"content": ["e f"]}),
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert load_dataset_documents(tmp_path / "dd", "content") == (["a b", "c d"], ["e f"])
    splits["train"].save_to_disk(str(tmp_path / "single"))
    assert load_dataset_documents(tmp_path / "single", "content") == (["a b", "c d"], None)
    with pytest.raises(ValueError, match="no column 'text'"):
        load_dataset_documents(tmp_path / "dd")
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        load_dataset_documents(tmp_path / "a.txt")


def test_config_command_reproduces_the_flags():
    config = DemoConfig(steps=7, bf16=True, train_file=Path("t.txt"))
    assert config.command() == "star-hf demo --train-file t.txt --steps 7 --bf16"
    smoke = DemoConfig.smoke(steps=9)
    assert smoke.steps == 9 and smoke.hidden_size == 16
