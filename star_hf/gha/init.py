"""Initial values of a STAR router's tensors (STAR.md §4).

All algebra runs in float64 on the CPU (the tensors are E×D, E×R and R×D: tiny) and the results
are cast to the gate's dtype; the basis stays float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from star_hf.gha.sanger import row_normalise

__all__ = [
    "StarTensors",
    "gaussian_basis",
    "initial_tensors",
    "orthonormal_mixing",
    "preserving_linear",
    "row_space_basis",
]

_ALPHA0 = 0.0  # s = sigmoid(0) = 0.5, the paper's starting interpolation


@dataclass
class StarTensors:
    linear_weight: torch.Tensor
    linear_bias: torch.Tensor | None
    mixing: torch.Tensor
    alpha: torch.Tensor
    basis: torch.Tensor


def orthonormal_mixing(num_experts: int, num_components: int, generator: torch.Generator) -> torch.Tensor:
    """M (E×R) with orthonormal columns (R ≤ E) or orthonormal rows (R > E)."""
    tall = num_experts >= num_components
    shape = (num_experts, num_components) if tall else (num_components, num_experts)
    q, r = torch.linalg.qr(torch.randn(shape, generator=generator, dtype=torch.float64))
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q if tall else q.t()


def gaussian_basis(num_components: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """B (R×D): Gaussian rows scaled to unit norm."""
    return row_normalise(torch.randn(num_components, dim, generator=generator, dtype=torch.float64))


def row_space_basis(w0: torch.Tensor, num_components: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal B (R×D) whose span contains every row of ``w0`` (needs R ≥ rank(w0))."""
    extra = torch.randn(w0.shape[1], num_components - w0.shape[0], generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([w0.t(), extra], dim=1))
    return q[:, :num_components].t().contiguous()


def preserving_linear(
    w_eff: torch.Tensor, b_eff: torch.Tensor | None, mixing: torch.Tensor, alpha: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W, b such that s ⊙ (W x + b) + (1 − s) ⊙ M B x = W_eff x + b_eff for every x."""
    s = torch.sigmoid(alpha.double())[:, None]
    w = (w_eff.double() - (1 - s) * (mixing.double() @ basis.double())) / s
    b = None if b_eff is None else b_eff.double() / s[:, 0]
    return w, b


def initial_tensors(
    w0: torch.Tensor,
    b0: torch.Tensor | None,
    num_components: int,
    init: str,
    gha_only: bool,
    generator: torch.Generator,
) -> StarTensors:
    """Initial W, b, M, α, B for a gate with weight ``w0`` (E×D) and bias ``b0`` (E or None)."""
    num_experts, dim = w0.shape
    dtype, device = w0.dtype, w0.device
    if w0.is_meta:
        return StarTensors(
            linear_weight=torch.empty_like(w0),
            linear_bias=None if b0 is None else torch.empty_like(b0),
            mixing=torch.empty(num_experts, num_components, dtype=dtype, device=device),
            alpha=torch.empty(num_experts, dtype=dtype, device=device),
            basis=torch.empty(num_components, dim, dtype=torch.float32, device=device),
        )
    w0_64 = w0.detach().to("cpu", torch.float64)
    b0_64 = None if b0 is None else b0.detach().to("cpu", torch.float64)
    alpha = torch.full((num_experts,), _ALPHA0, dtype=torch.float64)
    if gha_only and init == "preserve":
        basis = row_space_basis(w0_64, num_components, generator)
        mixing = w0_64 @ basis.t()
        w, b = w0_64, b0_64
    else:
        mixing = orthonormal_mixing(num_experts, num_components, generator)
        basis = gaussian_basis(num_components, dim, generator)
        if init == "preserve" and not gha_only:
            w, b = preserving_linear(w0_64, b0_64, mixing, alpha, basis)
        else:
            w, b = w0_64, b0_64
    return StarTensors(
        linear_weight=w.to(device, dtype),
        linear_bias=None if b is None else b.to(device, dtype),
        # QR returns column-major factors; FSDP2 refuses non-contiguous parameters.
        mixing=mixing.to(device, dtype).contiguous(),
        alpha=alpha.to(device, dtype),
        basis=basis.to(device, torch.float32),
    )
