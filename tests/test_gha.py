"""The GHA engine against an independent, naive per-token implementation of Sanger's rule."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from star_hf.gha.sanger import (
    GHAStatistics,
    guarded_update_,
    row_normalise,
    sanger_update,
)


def naive_sanger_step(basis: torch.Tensor, x: torch.Tensor, lr: float) -> torch.Tensor:
    """float64, token by token: Δb_k = mean_n y_nk (x_n − Σ_{j≤k} y_nj b_j); then row-normalise."""
    b = basis.double()
    x = x.double()
    delta = torch.zeros_like(b)
    for n in range(x.shape[0]):
        y = [float(b[k] @ x[n]) for k in range(b.shape[0])]
        for k in range(b.shape[0]):
            recon = sum(y[j] * b[j] for j in range(k + 1))
            delta[k] += y[k] * (x[n] - recon)
    new = b + lr * delta / x.shape[0]
    return torch.stack([row / math.sqrt(float(row @ row)) for row in new])


def random_problem(n=40, d=12, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(3.0, 0.2, d)
    basis = row_normalise(torch.randn(r, d, generator=g))
    return x, basis


@pytest.mark.parametrize("lr", [5e-5, 1e-2, 0.3])
def test_statistics_form_matches_naive_per_token_update(lr):
    x, basis = random_problem()
    got = sanger_update(basis, GHAStatistics.from_inputs(x, basis), lr)
    want = naive_sanger_step(basis, x, lr)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


def test_micro_batch_accumulation_equals_one_update_on_concatenated_batch():
    x, basis = random_problem(n=60)
    stats = GHAStatistics.from_inputs(x[:7], basis)
    for chunk in (x[7:30], x[30:31], x[31:]):
        stats.add_(GHAStatistics.from_inputs(chunk, basis))
    assert float(stats.count) == 60
    got = sanger_update(basis, stats, 0.05)
    want = naive_sanger_step(basis, x, 0.05)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


def test_token_weights_drop_tokens():
    x, basis = random_problem(n=30)
    keep = torch.zeros(30)
    keep[::3] = 1
    got = sanger_update(basis, GHAStatistics.from_inputs(x, basis, keep), 0.1)
    want = naive_sanger_step(basis, x[::3], 0.1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


def test_statistics_are_float32_for_low_precision_inputs():
    x, basis = random_problem()
    stats = GHAStatistics.from_inputs(x.to(torch.bfloat16).reshape(4, 10, -1), basis)
    assert stats.yx.dtype == stats.yy.dtype == stats.count.dtype == torch.float32
    want = GHAStatistics.from_inputs(x.to(torch.bfloat16).float(), basis)
    torch.testing.assert_close(stats.yx, want.yx)


def test_flat_round_trip():
    x, basis = random_problem()
    stats = GHAStatistics.from_inputs(x, basis)
    other = GHAStatistics.zeros(*basis.shape).copy_from_flat_(stats.flat())
    for a, b in ((stats.yx, other.yx), (stats.yy, other.yy), (stats.count, other.count)):
        torch.testing.assert_close(a, b)


def test_guarded_update_skips_non_finite_and_empty_statistics():
    x, basis = random_problem()
    x[3, 2] = float("nan")
    before = basis.clone()
    ok = guarded_update_(basis, GHAStatistics.from_inputs(x, basis), 0.1)
    assert not bool(ok)
    assert torch.equal(basis, before)
    ok = guarded_update_(basis, GHAStatistics.zeros(*basis.shape), 0.1)
    assert not bool(ok) and torch.equal(basis, before)
    x, _ = random_problem()
    ok = guarded_update_(basis, GHAStatistics.from_inputs(x, basis), 0.1)
    assert bool(ok) and not torch.equal(basis, before)


def test_gha_converges_to_the_principal_subspace():
    """Many small updates drive B to the top-R eigenvectors of the uncentred second moment."""
    g = torch.Generator().manual_seed(3)
    d, r = 10, 3
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    scales = torch.tensor([5.0, 4.0, 3.0] + [0.3] * (d - 3))
    basis = row_normalise(torch.randn(r, d, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(600):
            x = (torch.randn(256, d, generator=g) * scales) @ q.t()
            basis = sanger_update(basis, GHAStatistics.from_inputs(x, basis), 0.02)
    top = q[:, :r]  # true principal directions, in eigenvalue order
    cosines = (basis @ top).abs().diagonal()
    assert cosines.min() > 0.99, cosines
    assert torch.linalg.norm(basis @ basis.t() - torch.eye(r)) < 0.1
