"""The effective gate of a STAR router — the one implementation of the W_eff formula.

    z(x) = s ⊙ (W x + b) + (1 − s) ⊙ (M B x),   s = sigmoid(α)

is, for a fixed basis B, the plain linear gate ``W_eff x + b_eff`` with

    W_eff = s ⊙ W + (1 − s) ⊙ (M B),   b_eff = s ⊙ b          (s broadcast over rows)

and, for GHA-only routing (z = M B x), ``W_eff = M B`` and ``b_eff = b`` (frozen). The factors
(s ⊙ W, (1 − s) ⊙ M, b_eff) do not depend on B, so a caller that updates B often (test-time
adaptation) keeps them and pays one matmul per new W_eff.
"""

from __future__ import annotations

import torch

__all__ = ["EffectiveFactors", "effective_factors", "effective_gate", "effective_weight", "interpolation"]

# (s ⊙ W or None for GHA-only routing, (1 − s) ⊙ M, b_eff or None)
EffectiveFactors = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def interpolation(alpha: torch.Tensor, gha_only: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s = sigmoid(α) (zeros for GHA-only routing, which has no linear path), detached."""
    if gha_only:
        return torch.zeros_like(alpha, dtype=dtype)
    return torch.sigmoid(alpha.detach().to(dtype))


def effective_factors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mixing: torch.Tensor,
    alpha: torch.Tensor,
    gha_only: bool,
    dtype: torch.dtype = torch.float32,
) -> EffectiveFactors:
    """(s ⊙ W, (1 − s) ⊙ M, b_eff) in ``dtype``, differentiable in W, b, M and α."""
    if gha_only:
        return None, mixing.to(dtype), None if bias is None else bias.to(dtype)
    s = torch.sigmoid(alpha.to(dtype))
    b_eff = None if bias is None else s * bias.to(dtype)
    return s[:, None] * weight.to(dtype), (1.0 - s)[:, None] * mixing.to(dtype), b_eff


def effective_weight(factors: EffectiveFactors, basis: torch.Tensor) -> torch.Tensor:
    """W_eff from the factors and the basis (one addmm)."""
    scaled_w, scaled_m, _ = factors
    basis = basis.to(scaled_m.dtype) if basis.dtype != scaled_m.dtype else basis
    return scaled_m @ basis if scaled_w is None else torch.addmm(scaled_w, scaled_m, basis)


def effective_gate(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mixing: torch.Tensor,
    alpha: torch.Tensor,
    basis: torch.Tensor,
    gha_only: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_eff, b_eff) in ``dtype``."""
    factors = effective_factors(weight, bias, mixing, alpha, gha_only, dtype)
    return effective_weight(factors, basis), factors[2]
