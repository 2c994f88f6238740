"""``gha_step``: apply the accumulated GHA statistics of every STAR router once.

This is the primitive behind :class:`star_hf.StarCallback` and custom training loops: call it once
per optimizer step. Under ``torch.distributed`` the statistics of all ranks are summed first (one
collective per device for the whole model), so every rank applies the identical update — the update
one process would compute on the global batch.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn as nn

from star_hf.gha.distributed import all_reduce_statistics, by_device
from star_hf.gha.sanger import GHAStatistics

__all__ = ["gha_step"]


# Routers already warned about by ``gha_step`` for having collected nothing: the warning is said once.
_warned_idle: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _warn_if_idle(routers: list[nn.Module]) -> None:
    """One warning when every per-step router reached ``gha_step`` without statistics.

    The usual cause is a model left in eval mode (``from_pretrained`` returns one): its forwards
    collect nothing, so every ``gha_step`` returns 0 and the bases never move.
    """
    per_step = [r for r in routers if r.star_config.update == "step"]
    if not per_step or any(r.star_pending_statistics is not None for r in per_step):
        return
    if all(r in _warned_idle for r in per_step):
        return
    _warned_idle.update(per_step)
    in_eval = not any(r.training for r in per_step)
    cause = (
        "the model is in eval mode (from_pretrained returns models in eval mode): call model.train() before training"
        if in_eval
        else "no training forward ran since the last step: call gha_step once per optimizer step, after the forwards"
    )
    warnings.warn(
        f"star_hf.gha_step: none of the {len(per_step)} STAR routers collected GHA statistics since the last step, "
        f"so no basis moves; {cause}. Routers collect statistics in training-mode forwards only.",
        UserWarning,
        stacklevel=3,
    )


def _host_summary(stats: list[GHAStatistics]) -> list[tuple[bool, float]]:
    """(finite, token count) of every entry, with one host-device sync per device."""
    out: list[tuple[bool, float]] = [(True, 0.0)] * len(stats)
    for indices in by_device(stats).values():
        table = torch.stack(
            [torch.stack([stats[i].is_finite().to(torch.float32), stats[i].count]) for i in indices]
        ).tolist()
        for i, (finite, count) in zip(indices, table):
            out[i] = (finite > 0.5, count)
    return out


def gha_step(model: nn.Module, lr: float | None = None) -> int:
    """Apply and clear the pending GHA statistics of every STAR router in ``model``.

    Args:
        model: a patched model (plain, PEFT-wrapped, DDP-wrapped, ...).
        lr: GHA learning rate for this step; ``None`` uses each router's ``star_config.gha_lr``.

    Returns:
        The number of routers whose basis was updated.
    """
    from star_hf.patching.patcher import find_star_routers

    routers = list(find_star_routers(model).values())
    _warn_if_idle(routers)
    stats = []
    for router in routers:
        pending = router.star_pending_statistics
        if pending is None:
            # Every rank must contribute the same tensors in the same order to the collective.
            basis = router.star_basis
            pending = GHAStatistics.zeros(basis.shape[0], basis.shape[1], device=basis.device)
        stats.append(pending)
    all_reduce_statistics(stats)
    updated = 0
    for router, s, (finite, count) in zip(routers, stats, _host_summary(stats)):
        router.star_reset_statistics()
        step_lr = router.star_config.gha_lr if lr is None else lr
        if not finite:
            router.star_record_skipped_update()
        elif count > 0 and step_lr > 0:
            router._star_apply_checked_update(s, step_lr)
            updated += 1
    return updated
