"""``gha_step``: what it applies, and that it says so when there is nothing to apply."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer

from star_hf import StarCallback, StarConfig, find_star_routers, gha_step, patch_model

from .conftest import tiny_mixtral
from .trainer_helpers import TokenDataset, bases, training_args

IDLE = "collected GHA statistics"


def _idle_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if IDLE in str(w.message)]


def _step(model, batch) -> None:
    model(batch, labels=batch).loss.backward()


def test_eval_mode_model_warns_once_and_updates_nothing():
    model = patch_model(tiny_mixtral())  # tiny_mixtral, like from_pretrained, returns eval mode
    ids = TokenDataset(4).ids
    start = bases(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _step(model, ids)
            assert gha_step(model) == 0
    (message,) = _idle_warnings(caught)
    assert "eval mode" in message and "model.train()" in message and "2 STAR routers" in message
    assert all(torch.equal(b, start[n]) for n, b in bases(model).items())


def test_training_forwards_update_without_a_warning():
    model = patch_model(tiny_mixtral()).train()
    ids = TokenDataset(4).ids
    start = bases(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, ids)
        assert gha_step(model) == 2
    assert not _idle_warnings(caught)
    assert all(not torch.equal(b, start[n]) for n, b in bases(model).items())


def test_a_step_without_forwards_in_training_mode_names_that_cause():
    model = patch_model(tiny_mixtral()).train()
    with pytest.warns(UserWarning, match="no training forward ran since the last step"):
        assert gha_step(model) == 0


def test_forward_mode_routers_never_warn():
    model = patch_model(tiny_mixtral(), StarConfig(update="forward")).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(model, TokenDataset(4).ids)
        gha_step(model)
    assert not _idle_warnings(caught)


class EvalModeTrainer(Trainer):
    """Trains with the model in eval mode (say, to switch dropout off), so the routers collect nothing."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        model.eval()
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_star_callback_warns_once_when_its_routers_collect_nothing(tmp_path):
    model = patch_model(tiny_mixtral())
    start = bases(model)
    trainer = EvalModeTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=TokenDataset(16),
        callbacks=[StarCallback(log_metrics=False)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert len(_idle_warnings(caught)) == 1
    assert all(torch.equal(b, start[n]) for n, b in bases(model).items())
    assert find_star_routers(model)
