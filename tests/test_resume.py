"""Checkpoint and resume: Trainer checkpoints of patched models restore every tensor exactly.

Transformers 5.23 saves Mixtral checkpoints in the original layout (``block_sparse_moe.*``, one
tensor per expert) but the Trainer resumes with ``load_state_dict``, which does not convert them
back; star_hf's load hook (star_hf/checkpoint_layout.py) does. See README "Training with the Trainer".
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import load_sharded_checkpoint

from star_hf import StarCallback, StarConfig, gha_step, patch_model
from star_hf.patching.checkpoint_layout import (
    detach_checkpoint_layout_hook,
    to_model_layout,
)

from .conftest import tiny_mixtral, tiny_qwen2_moe, tiny_switch
from .trainer_helpers import TokenDataset, training_args


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps (as a crash right after a checkpoint would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def _trainer(model, out, max_steps, save_steps=None):
    args = training_args(
        out,
        max_steps=max_steps,
        gradient_accumulation_steps=2,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 1,
    )
    callback = StarCallback(gha_lr=0.05, schedule="linear")  # the schedule needs the restored step counter
    return Trainer(model=model, args=args, train_dataset=TokenDataset(24), callbacks=[callback])


def test_resume_equals_uninterrupted_training(tmp_path):
    full = patch_model(tiny_mixtral())
    _trainer(full, tmp_path / "full", max_steps=4).train()

    interrupted = _trainer(patch_model(tiny_mixtral()), tmp_path / "run", max_steps=4, save_steps=2)
    interrupted.add_callback(StopAt(2))
    interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = load_file(checkpoint / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.gate.star_basis" in saved  # the upstream layout on disk
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["StarCallback"]["attributes"]["basis_digest"]

    resumed = patch_model(tiny_mixtral(), StarConfig(seed=7))  # other initial STAR tensors: all must be loaded
    _trainer(resumed, tmp_path / "run", max_steps=4).train(resume_from_checkpoint=str(checkpoint))
    assert_same_state(full, resumed, atol=1e-6)


def test_resume_refuses_a_checkpoint_whose_bases_were_not_loaded(tmp_path):
    model = patch_model(tiny_mixtral())
    _trainer(model, tmp_path, max_steps=1, save_steps=1).train()
    resumed = patch_model(tiny_mixtral(), StarConfig(seed=7))
    detach_checkpoint_layout_hook(resumed)  # what plain Transformers 5.23 does: keys left unconverted
    with pytest.raises(RuntimeError, match="were not loaded"):
        _trainer(resumed, tmp_path, max_steps=2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_load_best_model_at_end_restores_the_best_checkpoint_exactly(tmp_path):
    """``Trainer._load_best_model`` has the same plain ``load_state_dict`` as resuming."""
    model = patch_model(tiny_mixtral())
    data = TokenDataset(8)
    args = training_args(
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        learning_rate=0.05,  # large enough for the evaluation loss to differ between checkpoints
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[StarCallback(gha_lr=0.1)])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")  # the last state is not the best one
    saved = to_model_layout(model, load_file(f"{best}/model.safetensors"))
    for key, value in model.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    assert all(k in saved for k in model.state_dict() if "star_" in k or "experts" in k)


def _trained(build):
    model = patch_model(build(), StarConfig(gha_lr=0.1))
    ids = TokenDataset(4).ids
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        kwargs = {"decoder_input_ids": ids} if build is tiny_switch else {}
        model(ids, labels=ids, **kwargs).loss.backward()
        opt.step()
        opt.zero_grad()
        gha_step(model)
    return model.eval()


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe, tiny_switch])
def test_load_state_dict_of_a_saved_checkpoint_restores_everything(tmp_path, build):
    trained = _trained(build)
    trained.save_pretrained(tmp_path)
    fresh = patch_model(build(), StarConfig(seed=3))
    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not result.unexpected_keys  # (tied embeddings are saved once, hence "missing")
    assert_same_state(trained, fresh)


@pytest.mark.slow
def test_sharded_checkpoint_with_expert_groups_split_across_shards(tmp_path):
    trained = _trained(tiny_mixtral)
    trained.save_pretrained(tmp_path, max_shard_size="40KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    gate_up = {weight_map[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(4) for w in "w1 w3".split()}
    assert len(gate_up) > 1  # one converted tensor (experts.gate_up_proj) is assembled from several shards
    fresh = patch_model(tiny_mixtral(), StarConfig(seed=3))
    load_sharded_checkpoint(fresh, tmp_path, strict=False)  # what the Trainer's resume calls
    assert_same_state(trained, fresh)
