"""Whole patched checkpoints, plain-Transformers loading, fold/export and atomic writes.

Every checkpoint here is a folder written locally by ``save_pretrained`` (sharded with a small
``max_shard_size``, in Transformers' original key layout — Mixtral's ``block_sparse_moe``).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, MixtralForCausalLM

import star_hf
from star_hf import StarConfig, find_star_routers, fold, from_pretrained
from star_hf.persistence.io import (
    CorruptFileError,
    atomic_directory,
    read_json,
    read_safetensors,
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
SHARD = "20KB"  # tiny models: several shards each


def _checkpoint_keys(folder: Path) -> list[str]:
    keys = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys += list(handle.keys())
    return keys


def _auto(model):
    return AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def load_reports():
    """Messages of Transformers' LOAD REPORTs (its loggers do not propagate to pytest's caplog)."""
    logger = logging.getLogger("transformers.modeling_utils")
    handler = _Collect()
    logger.addHandler(handler)
    yield lambda: [m for m in handler.messages if "LOAD REPORT" in m]
    logger.removeHandler(handler)


# ------------------------------------------------------------------------- whole patched models
@pytest.mark.parametrize("name", ARCHS)
def test_patched_checkpoint_round_trip_sharded(name, tmp_path, load_reports):
    model = trained(name, StarConfig(gha_lr=1e-3, num_components=3, seed=7))
    inputs = batch()
    model.save_pretrained(tmp_path, max_shard_size=SHARD)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["star_config"] == model.config.star_config

    loaded = from_pretrained(tmp_path)
    assert not load_reports(), "star_hf's own load must not show the STAR keys as UNEXPECTED"
    assert type(loaded) is type(model)
    routers = find_star_routers(loaded)
    assert list(routers) == list(find_star_routers(model))
    assert (
        next(iter(routers.values())).star_config.to_dict() == StarConfig.from_dict(model.config.star_config).to_dict()
    )
    assert loaded.config.star_config == model.config.star_config
    assert_same_star_state(star_state(model), star_state(loaded))
    assert torch.equal(outputs(model, inputs), outputs(loaded, inputs))
    for router in routers.values():  # trainable as configured, no stale statistics
        assert router.star_mixing.requires_grad and router.star_pending_statistics is None


def test_mixtral_checkpoint_keeps_the_original_key_layout(tmp_path):
    model = trained("mixtral")
    model.save_pretrained(tmp_path, max_shard_size=SHARD)
    keys = _checkpoint_keys(tmp_path)
    assert "model.layers.0.block_sparse_moe.gate.star_basis" in keys  # renamed along with the folded gate
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp.gate." in k for k in keys)
    loaded = from_pretrained(tmp_path)
    assert_same_star_state(star_state(model), star_state(loaded))


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_and_device_map(name, tmp_path):
    model = trained(name)
    model.save_pretrained(tmp_path, max_shard_size=SHARD)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    saved = star_state(model)
    for key, value in star_state(loaded).items():
        if key.endswith("star_basis"):
            assert value.dtype == torch.float32 and torch.equal(value, saved[key])
        else:
            assert value.dtype == torch.bfloat16 and torch.equal(value, saved[key].to(torch.bfloat16)), key
    inputs = batch()
    reference = outputs(model, inputs)
    assert (outputs(loaded, inputs).float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_partially_patched_checkpoint_round_trip(tmp_path):
    model = trained("qwen2_moe", StarConfig(layers_to_transform=[1], logits_fp32=True, update="forward"))
    model.save_pretrained(tmp_path, max_shard_size=SHARD)
    loaded = from_pretrained(tmp_path)
    assert list(find_star_routers(loaded)) == ["model.layers.1.mlp.gate"]
    config = find_star_routers(loaded)["model.layers.1.mlp.gate"].star_config
    assert config.layers_to_transform == [1] and config.logits_fp32 and config.update == "forward"
    assert_same_star_state(star_state(model), star_state(loaded))
    inputs = batch()
    assert torch.equal(outputs(model, inputs), outputs(loaded, inputs))


def test_routers_offloaded_by_the_device_map_are_refused(tmp_path):
    trained("mixtral").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"routers \['model\.layers\.1\.mlp\.gate'\] were offloaded"):
        from_pretrained(tmp_path / "ckpt", device_map=LAYER_1_ON_DISK, offload_folder=str(tmp_path / "offload"))


def test_fp32_protected_gate_keeps_float32_star_parameters_under_bf16(tmp_path):
    class Fp32GateMixtral(MixtralForCausalLM):
        _keep_in_fp32_modules_strict = ["gate.weight"]

    model = trained("mixtral")
    model.save_pretrained(tmp_path, max_shard_size=SHARD)
    loaded = from_pretrained(tmp_path, model_class=Fp32GateMixtral, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    saved = star_state(model)
    for key, value in star_state(loaded).items():
        assert value.dtype == torch.float32 and torch.equal(value, saved[key]), key


def test_output_loading_info_leaves_star_keys_out(tmp_path):
    model = trained("mixtral")
    model.save_pretrained(tmp_path)
    loaded, info = from_pretrained(tmp_path, output_loading_info=True)
    assert find_star_routers(loaded)
    assert not info["unexpected_keys"] and not info["missing_keys"]


def test_other_load_findings_are_still_reported(tmp_path, load_reports):
    model = trained("mixtral")
    model.save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    tensors, metadata = read_safetensors(shard)
    tensors["model.extra.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(tensors, str(shard), metadata=metadata)
    from_pretrained(tmp_path)
    (report,) = load_reports()
    assert "model.extra.weight" in report


# ------------------------------------------------------------------------- plain Transformers
@pytest.mark.parametrize("name", ARCHS)
def test_plain_transformers_loads_the_equivalent_stock_model(name, tmp_path, load_reports):
    model = trained(name)
    model.save_pretrained(tmp_path, max_shard_size=SHARD)
    plain = _auto(model).from_pretrained(tmp_path)
    assert not find_star_routers(plain)
    (report,) = load_reports()  # the star_* keys are listed, so the user sees what was left out
    assert "star_basis" in report and "UNEXPECTED" in report
    inputs = batch()
    assert (outputs(plain, inputs) - outputs(model, inputs)).abs().max() <= 1e-5


def test_checkpoint_resaved_by_plain_transformers_is_refused_clearly(tmp_path):
    model = trained("mixtral")
    model.save_pretrained(tmp_path / "patched")
    AutoModelForCausalLM.from_pretrained(tmp_path / "patched").save_pretrained(tmp_path / "resaved")
    with pytest.raises(ValueError, match="re-saved by plain Transformers"):
        from_pretrained(tmp_path / "resaved")


def test_stock_checkpoint_and_adapter_folder_are_refused_clearly(tmp_path):
    BUILDERS["mixtral"]().save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="no 'star_config'"):
        from_pretrained(tmp_path / "stock")
    star_hf.save_adapter(trained("mixtral"), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="load_adapter"):
        from_pretrained(tmp_path / "adapter")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_shard_is_named(tmp_path, damage):
    trained("mixtral").save_pretrained(tmp_path, max_shard_size=SHARD)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[2]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(
        CorruptFileError, match=rf"unreadable files: {shard.name} \({damage if damage == 'missing' else ''}"
    ):
        from_pretrained(tmp_path)


def test_checkpoint_with_missing_star_tensors_is_refused(tmp_path):
    model = trained("mixtral")
    model.save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    tensors, metadata = read_safetensors(shard)
    del tensors["model.layers.1.block_sparse_moe.gate.star_mixing"]
    from safetensors.torch import save_file

    save_file(tensors, str(shard), metadata=metadata)
    with pytest.raises(CorruptFileError, match=r"model\.layers\.1\.mlp\.gate: missing star_mixing"):
        from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ARCHS)
def test_fold_then_save_is_a_stock_checkpoint(name, tmp_path, load_reports):
    model = trained(name)
    inputs = batch()
    expected = outputs(model, inputs)
    fold(model).save_pretrained(tmp_path, max_shard_size=SHARD)
    assert "star_config" not in json.loads((tmp_path / "config.json").read_text())
    assert not any("star_" in k for k in _checkpoint_keys(tmp_path))
    plain = _auto(model).from_pretrained(tmp_path)
    assert not load_reports()  # nothing missing, nothing unexpected
    assert (outputs(plain, inputs) - expected).abs().max() <= 1e-5


def test_fold_with_gate_bias(tmp_path):
    model = trained("switch", router_bias=True)
    assert all(r.star_linear_bias is not None for r in find_star_routers(model).values())
    inputs = batch()
    expected = outputs(model, inputs)
    model.save_pretrained(tmp_path / "patched")
    assert_same_star_state(star_state(model), star_state(from_pretrained(tmp_path / "patched")))
    fold(model).save_pretrained(tmp_path / "folded")
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "folded")
    assert (outputs(plain, inputs) - expected).abs().max() <= 1e-5


# --------------------------------------------------------------------------------- atomic writes
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _debris(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def _failing_writer(monkeypatch, after: int):
    """Make safetensors' writer raise on its call number ``after + 1`` (after writing part of a file)."""
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", save_file)  # imported by name there


def test_interrupted_save_pretrained_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    good = trained("mixtral", seed=1)
    star_hf.save_pretrained(good, target, max_shard_size=SHARD)
    (target / "tokenizer.json").write_text("{}")
    before = _snapshot(target)
    _failing_writer(monkeypatch, after=2)
    with pytest.raises(OSError, match="disk full"):
        star_hf.save_pretrained(trained("mixtral", seed=2), target, max_shard_size=SHARD)
    assert _snapshot(target) == before
    assert not _debris(tmp_path)
    monkeypatch.undo()
    assert_same_star_state(star_state(good), star_state(from_pretrained(target)))


def test_save_pretrained_replaces_weights_and_keeps_other_files(tmp_path):
    target = tmp_path / "ckpt"
    star_hf.save_pretrained(trained("mixtral", seed=1), target, max_shard_size=SHARD)
    (target / "tokenizer.json").write_text("{}")
    newer = trained("mixtral", seed=2)
    star_hf.save_pretrained(newer, target)  # one file now: the old shards must not linger
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert_same_star_state(star_state(newer), star_state(from_pretrained(target)))
    assert not _debris(tmp_path)


def test_save_pretrained_writes_nothing_on_other_ranks(tmp_path):
    star_hf.save_pretrained(trained("mixtral"), tmp_path / "ckpt", is_main_process=False)
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.iterdir())


def test_interrupted_save_adapter_keeps_the_previous_adapter(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    star_hf.save_adapter(trained("mixtral", seed=1), target)
    before = _snapshot(target)
    _failing_writer(monkeypatch, after=0)
    with pytest.raises(OSError, match="disk full"):
        star_hf.save_adapter(trained("mixtral", seed=2), target)
    assert _snapshot(target) == before and not _debris(tmp_path)


def test_keyboard_interrupt_inside_atomic_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("good")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "good" and not _debris(tmp_path)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_directory_replaces_or_merges(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr("star_hf.persistence.io._exchange", lambda a, b: False)
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("1")
    assert _snapshot(target) == {"a.txt": b"1", "sub/b.txt": b"1"}
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not the 0700 of a tempfile.mkdtemp folder
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "c.txt").write_text("2")
        (tmp / "a.txt").write_text("2")
    assert _snapshot(target) == {"a.txt": b"2", "c.txt": b"2", "sub/b.txt": b"1"}
    with atomic_directory(target) as tmp:
        (tmp / "d.txt").write_text("3")
    assert _snapshot(target) == {"d.txt": b"3"}
    assert not _debris(tmp_path)


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with atomic_directory(tmp_path / "f"):
            pass


def test_readers_name_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"thing .*nope\.json does not exist"):
        read_json(tmp_path / "nope.json", "thing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"bad\.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(CorruptFileError, match="must hold a JSON object"):
        read_json(tmp_path / "list.json")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(100)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"cut\.safetensors is not a readable safetensors file"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(CorruptFileError, match="pickle.safetensors"):
        read_safetensors(tmp_path / "pickle.safetensors")
