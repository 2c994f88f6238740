"""star_hf.gha.effective, the one W_eff formula, against the spec written out here in float64."""

from __future__ import annotations

import pytest
import torch

from star_hf.gha.effective import effective_factors, effective_gate, effective_weight, interpolation


def _naive(w, b, m, alpha, basis, gha_only):
    """z(x) = s ⊙ (W x + b) + (1 − s) ⊙ (M B x) evaluated on the identity: the columns of W_eff."""
    d = w.shape[1]
    x = torch.eye(d, dtype=torch.float64)
    if gha_only:
        z = x @ (m @ basis).t()
        return z.t(), b
    s = torch.sigmoid(alpha)
    zero = torch.zeros(1, d, dtype=torch.float64)
    linear = lambda v: v @ w.t() + (0 if b is None else b)  # noqa: E731
    z = s * linear(x) + (1 - s) * (x @ (m @ basis).t())
    z0 = s * linear(zero) + (1 - s) * (zero @ (m @ basis).t())
    return (z - z0).t(), None if b is None else z0[0]


@pytest.mark.parametrize("gha_only", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_effective_gate_matches_the_logit_formula(gha_only, with_bias):
    g = torch.Generator().manual_seed(0)
    e, r, d = 5, 3, 7
    w, m = torch.randn(e, d, generator=g), torch.randn(e, r, generator=g)
    alpha, basis = torch.randn(e, generator=g), torch.randn(r, d, generator=g)
    b = torch.randn(e, generator=g) if with_bias else None
    w_eff, b_eff = effective_gate(w, b, m, alpha, basis, gha_only)
    want_w, want_b = _naive(
        w.double(), None if b is None else b.double(), m.double(), alpha.double(), basis.double(), gha_only
    )
    torch.testing.assert_close(w_eff.double(), want_w, rtol=1e-5, atol=1e-5)
    if b is None:
        assert b_eff is None
    else:
        torch.testing.assert_close(b_eff.double(), want_b.double(), rtol=1e-5, atol=1e-5)
    assert w_eff.dtype == torch.float32


def test_factors_are_reused_for_a_new_basis():
    g = torch.Generator().manual_seed(1)
    w, m, alpha = torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g), torch.randn(4, generator=g)
    factors = effective_factors(w, None, m, alpha, gha_only=False)
    for _ in range(2):
        basis = torch.randn(2, 6, generator=g)
        torch.testing.assert_close(effective_weight(factors, basis), effective_gate(w, None, m, alpha, basis, False)[0])


def test_gradients_reach_w_m_alpha_and_not_the_basis():
    w, m, alpha = (
        torch.randn(3, 4, requires_grad=True),
        torch.randn(3, 2, requires_grad=True),
        torch.zeros(3, requires_grad=True),
    )
    basis = torch.randn(2, 4)
    effective_gate(w, None, m, alpha, basis, False)[0].sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (w, m, alpha)) and basis.grad is None


def test_interpolation():
    alpha = torch.tensor([0.0, 2.0], dtype=torch.bfloat16)
    assert torch.equal(interpolation(alpha, gha_only=True), torch.zeros(2))
    torch.testing.assert_close(interpolation(alpha, gha_only=False), torch.sigmoid(alpha.float()))
    assert interpolation(alpha, False, torch.float64).dtype == torch.float64
