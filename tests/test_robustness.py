"""Robustness: bf16 autocast, non-finite activations, and a long synthetic stream of GHA updates."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from star_hf import StarCallback, StarConfig, find_star_routers, patch_model
from star_hf.gha.sanger import GHAStatistics, guarded_update_, row_normalise

from .conftest import tiny_mixtral
from .trainer_helpers import TokenDataset, bases, training_args


def test_bf16_autocast_training_keeps_the_basis_float32(tmp_path):
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=0.05))
    start = bases(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, bf16=True, max_steps=2),
        train_dataset=TokenDataset(8),
        callbacks=[StarCallback()],
    )
    seen_dtypes = set()

    def hook(module, args):
        seen_dtypes.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    next(iter(find_star_routers(model).values())).register_forward_pre_hook(hook)
    trainer.train()
    assert seen_dtypes == {torch.bfloat16}  # the routers really ran under bf16 autocast
    for name, basis in bases(model).items():
        assert basis.dtype == torch.float32 and torch.isfinite(basis).all()
        assert not torch.equal(basis, start[name])


class NonFiniteOnce(TrainerCallback):
    """Feeds NaN router inputs during optimizer step ``step`` and drops that step's non-finite
    gradients, as a mixed-precision grad scaler skips an overflowing step."""

    def __init__(self, model, step: int) -> None:
        self.model, self.step, self.current = model, step, 0
        router = next(iter(find_star_routers(model).values()))
        router.register_forward_pre_hook(self.poison)
        self.logs: list[dict] = []

    def poison(self, module, args):
        if module.training and self.current == self.step:
            return (torch.full_like(args[0], float("nan")),)
        return None

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = state.global_step + 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_non_finite_activations_skip_the_update_and_are_counted_in_the_logs(tmp_path):
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=0.05))
    probe = NonFiniteOnce(model, step=2)
    history = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            history.append(bases(model))

    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, logging_steps=1),
        train_dataset=TokenDataset(16),
        callbacks=[StarCallback(), probe, Record()],
    )
    trainer.train()
    skipped = [log["star/skipped_updates"] for log in probe.logs if "loss" in log]
    routers = find_star_routers(model)
    total = sum(r.star_skipped_updates for r in routers.values())
    assert total >= 1  # the poisoned router (and those downstream of its NaN output) skipped
    assert skipped == [0.0, total, total, total]
    for name in routers:
        assert torch.equal(history[1][name], history[0][name]) or routers[name].star_skipped_updates == 0
        assert torch.isfinite(history[-1][name]).all()
        assert not torch.equal(history[-1][name], history[1][name])  # later steps update again


def test_ten_thousand_updates_on_an_anisotropic_mixture_stay_orthonormal():
    """10,000 GHA updates (batches of 32 tokens, D=32, R=4, the reference's lr 5e-5) on a Gaussian
    mixture with a decaying spectrum and two massive-activation channels (std 20, like LLM
    hidden states): the basis stays finite, ‖BBᵀ − I‖_F small, and spans the top-4 eigenvectors."""
    dim, rank, batch = 32, 4, 32
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0.6, -1, dim)
    scales[[5, 17]] = 20.0
    means = torch.randn(3, dim, generator=g) * 2
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]

    def tokens(n: int) -> torch.Tensor:
        cluster = torch.randint(0, 3, (n,), generator=g)
        return (means[cluster] + torch.randn(n, dim, generator=g) * scales) @ rotation.T

    basis = row_normalise(torch.randn(rank, dim, generator=g))
    errors = []
    for _ in range(20):
        for x in tokens(500 * batch).reshape(500, batch, dim):
            guarded_update_(basis, GHAStatistics.from_inputs(x, basis), 5e-5)
        assert torch.isfinite(basis).all()
        errors.append(float(torch.linalg.matrix_norm(basis @ basis.T - torch.eye(rank))))
    assert max(errors[4:]) < 0.15, errors  # after 2,000 updates of burn-in from a random basis

    sample = tokens(20_000).double()
    top = torch.linalg.eigh(sample.T @ sample)[1][:, -rank:]
    cosines = torch.linalg.svdvals(torch.linalg.qr(basis.double().T)[0].T @ top)
    assert cosines.min() > 0.99, cosines
