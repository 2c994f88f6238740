"""StarCallback in the Trainer, and the same behaviour from plain PyTorch and accelerate loops."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback, get_scheduler

import star_hf
from star_hf import StarCallback, StarConfig, find_star_routers, gha_step, patch_model

from .conftest import tiny_mixtral
from .test_router import naive_sanger
from .trainer_helpers import TokenDataset, bases, record_router_inputs, training_args

LR = 0.05


def naive_chain(start: dict, inputs: dict, per_step: int, lrs: list[float]) -> list[dict]:
    """The bases after each optimizer step: one Sanger update on all micro-batches of the step."""
    chain, current = [], {n: b.double() for n, b in start.items()}
    for step, lr in enumerate(lrs):
        current = {
            n: naive_sanger(current[n], torch.cat(inputs[n][step * per_step : (step + 1) * per_step]), lr)
            for n in current
        }
        chain.append(current)
    return chain


class BasisProbe(TrainerCallback):
    """Records the bases at every micro-step and optimizer-step end (runs after StarCallback)."""

    def __init__(self, model):
        self.model, self.events = model, []

    def on_substep_end(self, args, state, control, **kwargs):
        self.events.append(("substep", bases(self.model)))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step", bases(self.model)))


def test_one_update_per_optimizer_step_after_accumulation_and_none_in_evaluation(tmp_path):
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=LR))
    inputs = record_router_inputs(model)
    start = bases(model)
    probe = BasisProbe(model)
    args = training_args(tmp_path, gradient_accumulation_steps=3, max_steps=2, eval_strategy="steps", eval_steps=1)
    data = TokenDataset(12)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[StarCallback(), probe])
    trainer.train()

    assert all(len(v) == 6 for v in inputs.values())  # 2 steps × 3 micro-batches, evaluation not counted
    assert [e for e, _ in probe.events] == ["substep", "substep", "step"] * 2
    want = naive_chain(start, inputs, per_step=3, lrs=[LR, LR])
    previous = start
    for (event, got), step in zip(probe.events, [0, 0, 0, 1, 1, 1]):
        if event == "substep":  # nothing moves on accumulation micro-steps
            assert all(torch.equal(got[n], previous[n]) for n in got)
        else:
            for n in got:
                torch.testing.assert_close(got[n].double(), want[step][n], rtol=0, atol=1e-5)
            previous = got

    after = bases(model)
    trainer.evaluate()
    trainer.predict(data)
    assert all(torch.equal(after[n], b) for n, b in bases(model).items())
    assert all(r.star_pending_statistics is None for r in find_star_routers(model).values())


def test_schedules_match_transformers_lr_schedules():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for name, warmup in [("constant", 0), ("constant", 3), ("linear", 0), ("linear", 4), ("cosine", 2)]:
        callback = StarCallback(schedule=name, warmup_steps=warmup)
        hf_name = "constant_with_warmup" if name == "constant" else name
        scheduler = get_scheduler(hf_name, optimizer, num_warmup_steps=warmup, num_training_steps=20)
        for step in range(20):
            assert callback.lr_factor(step, 20) == pytest.approx(scheduler.get_last_lr()[0], abs=1e-12), (name, step)
            optimizer.step()
            scheduler.step()


def test_scheduled_gha_lr_in_the_trainer(tmp_path):
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=1.0))
    inputs = record_router_inputs(model)
    start = bases(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, logging_steps=1),
        train_dataset=TokenDataset(8),
        callbacks=[StarCallback(gha_lr=0.08, schedule="linear", warmup_steps=1)],
    )
    trainer.train()
    lrs = [0.08 * f for f in (0.0, 1.0, 2 / 3, 1 / 3)]
    logged = [h["star/gha_lr"] for h in trainer.state.log_history if "star/gha_lr" in h]
    assert logged == pytest.approx(lrs)
    want = naive_chain(start, inputs, per_step=1, lrs=lrs)[-1]
    for n, b in bases(model).items():
        torch.testing.assert_close(b.double(), want[n], rtol=0, atol=1e-5)


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_metrics_reach_callbacks_registered_before_it(tmp_path):
    recorder = LogRecorder()  # stands for TensorBoard / W&B, which the Trainer registers first
    model = patch_model(tiny_mixtral())
    data = TokenDataset(8)
    args = training_args(tmp_path, max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[recorder, StarCallback()])
    trainer.train()
    keys = {"star/load_cv_mean", "star/load_cv_max", "star/load_entropy_mean", "star/s_mean"}
    keys |= {"star/orthonormality_error_max", "star/drift_mean", "star/skipped_updates"}
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 2 and all(keys <= log.keys() for log in train_logs)
    assert all(not any(k.startswith("star/") for k in log) for log in recorder.logs if "loss" not in log)
    assert all(keys <= h.keys() for h in trainer.state.log_history if "loss" in h)


def _train(model, tmp_path, callbacks, **overrides):
    args = training_args(tmp_path, **{"max_steps": 3, **overrides})
    Trainer(model=model, args=args, train_dataset=TokenDataset(16), callbacks=callbacks).train()


class ManualGHA(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        gha_step(model)


@pytest.mark.parametrize(
    "setup",
    ["no_callback", "star_callback", "star_callback_accumulating", "own_callback", "forward_mode"],
)
def test_missing_callback_warns_once_and_only_then(tmp_path, setup):
    config = StarConfig(update="forward") if setup == "forward_mode" else StarConfig()
    model = patch_model(tiny_mixtral(), config)
    callbacks = {"star_callback": [StarCallback()], "star_callback_accumulating": [StarCallback()]}.get(setup, [])
    callbacks = [ManualGHA()] if setup == "own_callback" else callbacks
    overrides = {"gradient_accumulation_steps": 3} if setup == "star_callback_accumulating" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, tmp_path, callbacks, **overrides)
    messages = [str(w.message) for w in caught if "StarCallback()" in str(w.message)]
    assert len(messages) == (1 if setup == "no_callback" else 0)


def test_custom_loop_never_warns():
    model = patch_model(tiny_mixtral()).train()
    ids = TokenDataset(8).ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(0, 8, 2):  # without gha_step: a custom loop is the user's business
            model(ids[i : i + 2], labels=ids[i : i + 2]).loss.backward()
    assert not [w for w in caught if "StarCallback()" in str(w.message)]


def test_callback_refuses_an_unpatched_model(tmp_path):
    with pytest.raises(ValueError, match="patch_model"):
        _train(tiny_mixtral(), tmp_path, [StarCallback()])


@pytest.mark.parametrize(
    "kwargs", [{"gha_lr": -1.0}, {"gha_lr": "big"}, {"schedule": "exponential"}, {"warmup_steps": -2}]
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="StarCallback"):
        StarCallback(**kwargs)


# ---------------------------------------------------------------------------- custom loops


def test_plain_pytorch_loop_with_accumulation():
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=LR)).train()
    inputs = record_router_inputs(model)
    start = bases(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = TokenDataset(8).ids
    for step in range(2):
        for micro in range(2):
            batch = ids[4 * step + 2 * micro : 4 * step + 2 * micro + 2]
            (model(batch, labels=batch).loss / 2).backward()
        opt.step()
        opt.zero_grad()
        assert gha_step(model) == 2
    want = naive_chain(start, inputs, per_step=2, lrs=[LR, LR])[-1]
    for n, b in bases(model).items():
        torch.testing.assert_close(b.double(), want[n], rtol=0, atol=1e-5)


def test_accelerate_loop_with_accumulation():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=LR)).train()
    inputs = record_router_inputs(model)
    start = bases(model)
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(TokenDataset(8), batch_size=2)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        updates = 0
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                updates += gha_step(model)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert updates == 2 * 2  # 2 optimizer steps × 2 routers
    want = naive_chain(start, inputs, per_step=2, lrs=[LR, LR])[-1]
    for n, b in bases(model).items():
        torch.testing.assert_close(b.double(), want[n], rtol=0, atol=1e-5)


def test_exported_from_the_package():
    assert star_hf.StarCallback is StarCallback
    assert callable(star_hf.routing_report)
