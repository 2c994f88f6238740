"""The ``star-hf`` commands, run in-process through ``star_hf.cli.main`` on tiny checkpoints saved in tmp."""

from __future__ import annotations

import inspect as pyinspect
import json
import shutil
import string
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

import star_hf
from star_hf.cli import main

from .conftest import COMMON, tiny_mixtral, tiny_qwen2_moe, tiny_switch
from .test_hub import FakeHub

COMMANDS = ("upgrade", "inspect", "fold", "push")


def _char_tokenizer():
    """A character-level fast tokenizer (ids < 128), built offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(string.printable)))}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")), unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Stock checkpoints as users have them: sharded safetensors, with or without a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    mixtral = tiny_mixtral()
    mixtral.save_pretrained(root / "mixtral", max_shard_size="100KB")
    _char_tokenizer().save_pretrained(root / "mixtral")
    out["mixtral"] = root / "mixtral"
    for name, build in (("qwen2_moe", tiny_qwen2_moe), ("switch", tiny_switch)):
        build().save_pretrained(root / name)
        out[name] = root / name
    # star_hf's byte tokenizer needs a vocabulary of 256 ids and more
    tiny_qwen2_moe(vocab_size=300).save_pretrained(root / "qwen2_moe_bytes")
    out["qwen2_moe_bytes"] = root / "qwen2_moe_bytes"
    llama = {k: v for k, v in COMMON.items() if k != "max_position_embeddings"}
    LlamaForCausalLM(LlamaConfig(**llama)).save_pretrained(root / "llama")
    out["llama"] = root / "llama"
    text = root / "text.txt"
    text.write_text(pyinspect.getsource(json.decoder) + pyinspect.getsource(json.encoder))
    out["text"] = text
    return out


def _inputs(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_inputs(model)).logits


def _plain(folder: Path):
    from transformers import AutoConfig

    from star_hf.persistence.loading import _model_class

    return _model_class(AutoConfig.from_pretrained(folder), None).from_pretrained(folder)


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_clean_error(rc: int, err: str, *fragments: str) -> None:
    assert rc != 0
    assert "error:" in err and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"star-hf {command}" in out and "examples:" in out


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "switch"])
def test_upgrade_then_fold_keeps_outputs(tmp_path, capsys, ckpts, name):
    original = _logits(_plain(ckpts[name]))
    rc, out, _ = _run(capsys, "upgrade", ckpts[name], tmp_path / "star")
    assert rc == 0 and "patched 2 router(s)" in out
    config = json.loads((tmp_path / "star" / "config.json").read_text())
    assert config["star_config"]["init"] == "preserve"
    star = star_hf.from_pretrained(tmp_path / "star")
    assert len(star_hf.find_star_routers(star)) == 2
    torch.testing.assert_close(_logits(star), original, rtol=0, atol=1e-5)

    rc, out, _ = _run(capsys, "fold", tmp_path / "star", tmp_path / "folded")
    assert rc == 0 and "folded 2 STAR router(s)" in out
    folded = _plain(tmp_path / "folded")
    assert not star_hf.find_star_routers(folded)
    assert "star_config" not in json.loads((tmp_path / "folded" / "config.json").read_text())
    torch.testing.assert_close(_logits(folded), original, rtol=0, atol=1e-5)
    if name == "mixtral":  # the tokenizer travels along
        assert (tmp_path / "star" / "tokenizer.json").is_file() and (tmp_path / "folded" / "tokenizer.json").is_file()


def test_upgrade_star_options_from_file_and_flags(tmp_path, capsys, ckpts):
    config_file = tmp_path / "star.json"
    config_file.write_text(json.dumps({"gha_lr": 1e-4, "seed": 5, "num_components": 3}))
    rc, _, _ = _run(
        capsys,
        "upgrade",
        ckpts["qwen2_moe"],
        tmp_path / "out",
        "--config",
        config_file,
        "--num-components",
        "2",
        "--layers",
        "1",
        "--update",
        "forward",
    )
    assert rc == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["star_config"]
    assert (saved["gha_lr"], saved["seed"], saved["num_components"], saved["layers_to_transform"], saved["update"]) == (
        1e-4,
        5,
        2,
        [1],
        "forward",
    )
    routers = star_hf.find_star_routers(star_hf.from_pretrained(tmp_path / "out"))
    assert list(routers) == ["model.layers.1.mlp.gate"]
    assert routers["model.layers.1.mlp.gate"].star_basis.shape == (2, 32)


def test_upgrade_in_bfloat16_keeps_the_basis_float32(tmp_path, capsys, ckpts):
    rc, _, _ = _run(capsys, "upgrade", ckpts["mixtral"], tmp_path / "bf16", "--dtype", "bfloat16")
    assert rc == 0
    dtypes = {}
    for file in (tmp_path / "bf16").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            dtypes.update({k.rpartition(".")[2]: handle.get_slice(k).get_dtype() for k in handle.keys()})  # noqa: SIM118
    assert dtypes["star_linear_weight"] == "BF16" and dtypes["star_mixing"] == "BF16"
    assert dtypes["star_basis"] == "F32"


def _router_inputs(model, batches) -> torch.Tensor:
    """Inputs of the first router on ``batches``, captured independently with a forward pre-hook."""
    seen = []
    gate = model.model.layers[0].mlp.gate
    handle = gate.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).double())
    )
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    return torch.cat(seen)


def test_upgrade_calibrates_on_text_with_the_checkpoint_tokenizer(tmp_path, capsys, ckpts):
    from star_hf.cli._util import text_batches
    from star_hf.persistence.text import load_tokenizer

    original = _plain(ckpts["mixtral"])
    rc, out, err = _run(
        capsys,
        "upgrade",
        ckpts["mixtral"],
        tmp_path / "cal",
        "--calibration-data",
        ckpts["text"],
        "--calibration-batches",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
    )
    assert rc == 0 and "calibrated the bases on 2 batch(es), 128 tokens" in out
    assert "calibrating" in err and "2/2" in err  # the progress bar ran to the end
    star = star_hf.from_pretrained(tmp_path / "cal")
    torch.testing.assert_close(_logits(star), _logits(original), rtol=0, atol=1e-5)
    # Independent check: the basis spans the top principal directions of the router's inputs.
    batches = text_batches(
        ckpts["text"], load_tokenizer(ckpts["mixtral"], fallback="none"), vocab_size=128, num_batches=2, batch_size=2, seq_len=32
    )
    x = _router_inputs(original, batches)
    eigvals, eigvecs = torch.linalg.eigh(x.t() @ x / len(x))
    top = eigvecs[:, eigvals.argsort(descending=True)[:4]]
    basis = star_hf.find_star_routers(star)["model.layers.0.mlp.gate"].star_basis.double()
    cosines = torch.linalg.svdvals(basis @ top)  # cosines of the principal angles
    assert cosines.min() > 0.999


def test_upgrade_calibrates_with_the_byte_tokenizer(tmp_path, capsys, ckpts):
    rc, out, _ = _run(
        capsys,
        "upgrade",
        ckpts["qwen2_moe_bytes"],
        tmp_path / "cal",
        "--calibration-data",
        ckpts["text"],
        "--calibration-batches",
        "1",
        "--seq-len",
        "16",
    )
    assert rc == 0 and "calibrated the bases on 1 batch(es), 64 tokens" in out
    assert not (tmp_path / "cal" / "tokenizer.json").exists()
    # a vocabulary smaller than the byte tokenizer's is refused before anything is written
    rc, _, err = _run(capsys, "upgrade", ckpts["qwen2_moe"], tmp_path / "small", "--calibration-data", ckpts["text"])
    _assert_clean_error(rc, err, "vocabulary has 128 entries")
    assert not (tmp_path / "small").exists()


def _corrupt_copy(src: Path, dst: Path, what: str) -> Path:
    shutil.copytree(src, dst)
    if what == "weights":
        shard = min(dst.glob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (dst / "config.json").write_text("{ not json")
    return dst


def test_bad_input_gives_a_clear_error_and_writes_nothing(tmp_path, capsys, ckpts):
    out = tmp_path / "out"
    cases = [
        (["upgrade", tmp_path / "missing", out], ["does not exist"]),
        (["upgrade", ckpts["llama"], out], ["no MoE router found in LlamaForCausalLM"]),
        (
            ["upgrade", _corrupt_copy(ckpts["mixtral"], tmp_path / "bad_w", "weights"), out],
            ["model-00001-of-", "not a valid safetensors file"],
        ),
        (
            ["upgrade", _corrupt_copy(ckpts["mixtral"], tmp_path / "bad_c", "config"), out],
            ["config.json", "not valid JSON"],
        ),
        (["upgrade", ckpts["mixtral"], ckpts["qwen2_moe"]], ["already exists", "--overwrite"]),
        (["upgrade", ckpts["mixtral"], out, "--gha-lr", "-1"], ["gha_lr must be a finite number >= 0"]),
        (["upgrade", ckpts["mixtral"], out, "--num-components", "64"], ["exceeds the hidden size 32"]),
        (["upgrade", ckpts["mixtral"], out, "--calibration-data", tmp_path / "nope.txt"], ["nope.txt does not exist"]),
        (["fold", ckpts["mixtral"], out], ["not a STAR checkpoint"]),
        (["fold", tmp_path / "missing", out], ["does not exist"]),
        (["inspect", ckpts["mixtral"]], ["not a STAR checkpoint", "star-hf upgrade"]),
        (["inspect", tmp_path / "missing"], ["does not exist"]),
        (["push", ckpts["mixtral"], "not a/valid/repo"], ["invalid Hub repository id"]),
        (["push", tmp_path / "missing", "me/model"], ["does not exist"]),
    ]
    for argv, fragments in cases:
        rc, _, err = _run(capsys, *argv)
        _assert_clean_error(rc, err, f"star-hf {argv[0]}: error:", *fragments)
        assert not out.exists(), argv
    assert (ckpts["qwen2_moe"] / "config.json").is_file()  # an existing folder is left alone


@pytest.fixture(scope="module")
def star_dir(ckpts, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("star") / "mixtral-star"
    assert main(["upgrade", str(ckpts["mixtral"]), str(path), "--seed", "1"]) == 0
    return path


def test_inspect_checkpoint_with_data_and_plot(tmp_path, capsys, ckpts, star_dir):
    rc, out, _ = _run(capsys, "inspect", star_dir)
    assert rc == 0 and '"seed": 1' in out and "| `model.layers.1.mlp.gate` | 4 | 4 |" in out
    assert "expert load" not in out  # no data: no load

    plot = tmp_path / "routing.png"
    rc, out, err = _run(
        capsys,
        "inspect",
        star_dir,
        "--data",
        ckpts["text"],
        "--batches",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--plot",
        plot,
    )
    assert rc == 0 and "measuring expert load" in err
    row = next(line for line in out.splitlines() if line.startswith("| `model.layers.0.mlp.gate`"))
    assert row.split("|")[4].strip() == "64"  # tokens: 2 batches × 2 × 16
    shares = next(line for line in out.splitlines() if line.strip().startswith("model.layers.0.mlp.gate:"))
    assert abs(sum(float(v) for v in shares.split(":")[1].split()) - 1) < 2e-3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert not list(tmp_path.glob(".*tmp*"))

    rc, _, err = _run(capsys, "inspect", star_dir, "--plot", tmp_path / "x.pdf")
    _assert_clean_error(rc, err, "PNG")


def test_inspect_adapter_folder(tmp_path, capsys, ckpts):
    model = _plain(ckpts["switch"])
    star_hf.patch_model(model, star_hf.StarConfig(num_components=3))
    star_hf.save_adapter(model, tmp_path / "adapter")
    rc, out, _ = _run(capsys, "inspect", tmp_path / "adapter", "--plot", tmp_path / "s.png")
    assert rc == 0 and '"num_components": 3' in out
    assert "| `encoder.block.1.layer.1.mlp.router.classifier` | 4 | 3 | – |" in out
    assert "| 0.500 |" in out  # s of the preserving init
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"  # the interpolation chart alone

    rc, _, err = _run(capsys, "inspect", tmp_path / "adapter", "--data", ckpts["text"])
    _assert_clean_error(rc, err, "--base-model")
    rc, out, _ = _run(
        capsys,
        "inspect",
        tmp_path / "adapter",
        "--base-model",
        ckpts["switch"],
        "--data",
        ckpts["text"],
        "--batches",
        "1",
        "--seq-len",
        "8",
    )
    assert rc == 0 and "expert load" in out and "decoder.block.1.layer.2.mlp.router.classifier:" in out


def test_push_checkpoint_and_adapter(tmp_path, capsys, monkeypatch, star_dir):
    hub = FakeHub(monkeypatch, tmp_path / "full")
    rc, out, _ = _run(capsys, "push", star_dir, "me/mixtral-star", "--private", "--token", "hf_x", "--license", "mit")
    assert rc == 0 and "pushed the full upload to me/mixtral-star" in out
    assert hub.calls[0][1]["private"] is True and hub.calls[0][1]["token"] == "hf_x"
    uploaded = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"README.md", "config.json", "tokenizer.json"} <= uploaded
    card = ModelCard.load(tmp_path / "full" / "README.md")
    assert card.data.license == "mit" and "## Routing metrics" in card.text

    hub = FakeHub(monkeypatch, tmp_path / "adapter")
    rc, _, _ = _run(
        capsys, "push", star_dir, "me/mixtral-star-adapter", "--kind", "adapter", "--base-model", "org/tiny-mixtral"
    )
    assert rc == 0
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "README.md",
        "star_config.json",
        "star_adapter.safetensors",
    }
    assert ModelCard.load(tmp_path / "adapter" / "README.md").data.base_model == "org/tiny-mixtral"

    # an adapter folder is pushed as it is, with a card whose metrics come from its tensors
    hub = FakeHub(monkeypatch, tmp_path / "again")
    rc, _, _ = _run(capsys, "push", tmp_path / "adapter", "me/again")
    assert rc == 0
    card = ModelCard.load(tmp_path / "again" / "README.md")
    assert "| `model.layers.0.mlp.gate` | 4 | 4 | – |" in card.text
    rc, _, err = _run(capsys, "push", tmp_path / "adapter", "me/again", "--kind", "folded")
    _assert_clean_error(rc, err, "can only be pushed as --kind adapter")


def test_push_stage_only_and_failed_upload(tmp_path, capsys, monkeypatch, star_dir):
    hub = FakeHub(monkeypatch, tmp_path / "uploaded", fail="upload_folder")
    rc, out, _ = _run(capsys, "push", star_dir, "me/m", "--kind", "folded", "--stage-only", tmp_path / "staged")
    assert rc == 0 and "nothing was uploaded" in out and hub.calls == []
    with safe_open(str(tmp_path / "staged" / "model.safetensors"), framework="pt") as handle:
        assert not any("star_" in k for k in handle.keys())  # noqa: SIM118 (safe_open is not a dict)

    before = {p.name: p.read_bytes() for p in star_dir.iterdir()}
    rc, _, err = _run(capsys, "push", star_dir, "me/m")
    _assert_clean_error(rc, err, "uploading", "simulated network failure", "Nothing local was changed")
    assert {p.name: p.read_bytes() for p in star_dir.iterdir()} == before
