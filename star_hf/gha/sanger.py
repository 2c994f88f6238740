"""The Generalized Hebbian Algorithm (Sanger's rule) in sufficient-statistics form.

This module knows nothing of Transformers. For router inputs X (N×D) and a basis B (R×D) it
accumulates

    Yᵀ X (R×D),  Yᵀ Y (R×R)  and  N,   with Y = X Bᵀ,

which add up over micro-batches and data-parallel ranks, and applies

    B ← row_normalise(B + η · (Yᵀ X − tril(Yᵀ Y) B) / N).

Memory is O(R·D) instead of the O(N·R·D) of the reference's materialised form; the two are equal
up to float32 round-off (see STAR.md §2). Statistics are always float32, whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "GHAStatistics",
    "TokenWeights",
    "guarded_sanger_step_",
    "guarded_update_",
    "row_normalise",
    "sanger_delta",
    "sanger_update",
]

# Rows are normalised by max(‖row‖, _NORM_FLOOR) so a zero row cannot produce NaN.
_NORM_FLOOR = 1e-12


@dataclass
class GHAStatistics:
    """Running sums for one basis: Yᵀ X, Yᵀ Y and the (weighted) token count, all float32."""

    yx: torch.Tensor
    yy: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, num_components: int, dim: int, device: torch.device | str | None = None) -> "GHAStatistics":
        return cls(
            yx=torch.zeros(num_components, dim, dtype=torch.float32, device=device),
            yy=torch.zeros(num_components, num_components, dtype=torch.float32, device=device),
            count=torch.zeros((), dtype=torch.float32, device=device),
        )

    @classmethod
    def from_inputs(
        cls, x: torch.Tensor, basis: torch.Tensor, token_weight: torch.Tensor | None = None
    ) -> "GHAStatistics":
        """Statistics of one batch of inputs ``x`` (…×D) against ``basis`` (R×D).

        ``token_weight`` (one value per row of ``x``, 0 or 1) removes tokens such as padding.
        """
        x = x.detach().reshape(-1, basis.shape[-1]).to(torch.float32)
        y = x @ basis.detach().t()
        if token_weight is None:
            count = x.new_full((), float(x.shape[0]))  # a fill on the device, not a host-to-device copy
        else:
            w = token_weight.detach().reshape(-1).to(device=x.device, dtype=torch.float32)
            y = y * w[:, None]
            count = w.sum()
        return cls(yx=y.t() @ x, yy=y.t() @ y, count=count)

    def add_(self, other: "GHAStatistics") -> "GHAStatistics":
        self.yx.add_(other.yx)
        self.yy.add_(other.yy)
        self.count.add_(other.count)
        return self

    def flat(self) -> torch.Tensor:
        """All sums in one float32 vector (for a single collective)."""
        return torch.cat([self.yx.reshape(-1), self.yy.reshape(-1), self.count.reshape(1)])

    def copy_from_flat_(self, flat: torch.Tensor) -> "GHAStatistics":
        n_yx, n_yy = self.yx.numel(), self.yy.numel()
        self.yx.copy_(flat[:n_yx].view_as(self.yx))
        self.yy.copy_(flat[n_yx : n_yx + n_yy].view_as(self.yy))
        self.count.copy_(flat[n_yx + n_yy])
        return self

    def is_finite(self) -> torch.Tensor:
        """A 0-dim bool tensor (no host sync): are all sums finite?"""
        return torch.isfinite(self.yx).all() & torch.isfinite(self.yy).all() & torch.isfinite(self.count)

    def to(self, device: torch.device | str) -> "GHAStatistics":
        return GHAStatistics(self.yx.to(device), self.yy.to(device), self.count.to(device))


def row_normalise(basis: torch.Tensor) -> torch.Tensor:
    """Scale every row of ``basis`` to unit Euclidean norm."""
    return basis / basis.norm(dim=-1, keepdim=True).clamp_min(_NORM_FLOOR)


def sanger_delta(basis: torch.Tensor, stats: GHAStatistics) -> torch.Tensor:
    """ΔB = (Yᵀ X − tril(Yᵀ Y) B) / N, the mean Sanger update over the accumulated tokens."""
    b = basis.to(torch.float32)
    return (stats.yx - torch.tril(stats.yy) @ b) / stats.count.clamp_min(1.0)


def sanger_update(basis: torch.Tensor, stats: GHAStatistics, lr: float) -> torch.Tensor:
    """The updated basis ``row_normalise(B + lr · ΔB)`` (float32, out of place)."""
    return row_normalise(basis.to(torch.float32) + lr * sanger_delta(basis, stats))


def guarded_update_(basis: torch.Tensor, stats: GHAStatistics, lr: float) -> torch.Tensor:
    """Update ``basis`` in place unless the statistics are non-finite or empty.

    Works without a host-device sync (``torch.where``), so it can run inside a forward pass.
    Returns a 0-dim bool tensor: whether the update was applied.
    """
    new = sanger_update(basis, stats, lr)
    ok = stats.is_finite() & (stats.count > 0) & torch.isfinite(new).all()
    basis.copy_(torch.where(ok, new, basis))
    return ok


@dataclass(frozen=True)
class TokenWeights:
    """0/1 token weights in the form the per-forward update uses, built once per forward and shared
    by all the bases that see the same tokens (every router of a model sees the same mask)."""

    scaled: torch.Tensor  # N×1 float32: w / max(Σ w, 1), so that sums over tokens come out as means
    empty: torch.Tensor  # 0-dim bool: Σ w == 0

    @classmethod
    def from_weights(cls, weight: torch.Tensor, device: torch.device | str | None = None) -> "TokenWeights":
        column = weight.detach().reshape(-1, 1).to(device=device, dtype=torch.float32)
        total = column.sum()
        return cls(column / total.clamp_min(1.0), total == 0)


def guarded_sanger_step_(
    basis: torch.Tensor, x: torch.Tensor, lr: float, weights: TokenWeights | None = None
) -> torch.Tensor:
    """One in-place Sanger update of ``basis`` from the inputs ``x`` (…×D) of a single forward.

    The update of ``guarded_update_(basis, GHAStatistics.from_inputs(x, basis, w), lr)`` in about
    half its kernel launches: the per-forward path of test-time adaptation, where a decode step
    brings a handful of tokens and launch overhead, not arithmetic, is the cost. Skipped on device,
    without a host sync, when an updated row is not finite (any non-finite statistic makes it so)
    or vanishes, or when no token has weight. Returns a 0-dim bool tensor: skipped for the former.
    """
    # Each call below is a dispatcher round trip, so the no-op ones are skipped in Python.
    if x.requires_grad:
        x = x.detach()
    if x.dim() != 2:
        x = x.reshape(-1, basis.shape[-1])
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    if x.shape[0] == 0:
        return torch.zeros((), dtype=torch.bool, device=basis.device)
    y = torch.nn.functional.linear(x, basis)  # X Bᵀ
    if weights is None:
        yw, scale = y, lr / x.shape[0]
    else:
        yw, scale = y * weights.scaled, lr
    # B + η (Yᵀ X − tril(Yᵀ Y) B) / N; with 0/1 weights, weighting one factor of each product is enough.
    ywt = yw.t()
    new = torch.addmm(torch.addmm(basis, ywt, x, alpha=scale), torch.tril(torch.mm(ywt, y)), basis, alpha=-scale)
    normalised = new / torch.linalg.vector_norm(new, dim=-1, keepdim=True)
    # A normalised row holds a NaN exactly when the row was not finite or had zero norm.
    non_finite = normalised.isnan().any()
    keep = non_finite if weights is None else non_finite | weights.empty
    torch.where(keep, basis, normalised, out=basis)
    return non_finite
