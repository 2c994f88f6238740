"""``gha_step``: apply the accumulated GHA statistics of every STAR router once.

This is the primitive behind :class:`star_hf.StarCallback` and custom training loops: call it once
per optimizer step. Under ``torch.distributed`` the statistics of all ranks are summed first (one
collective per device for the whole model), so every rank applies the identical update — the update
one process would compute on the global batch.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import defaultdict
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .gha import GHAStatistics

__all__ = [
    "all_reduce_statistics",
    "gha_step",
    "pending_statistics_limit",
    "register_pending_statistics_listener",
]


# Asked when a router's statistics outlive one optimizer step's worth of training forwards, a sign
# that nothing calls gha_step. Integrations that know what a step is (the Trainer callback) register
# here; each returns after how many pending forwards to ask again (math.inf: stop asking). The
# routers themselves know nothing of training frameworks.
_pending_listeners: list[Callable[[nn.Module], float]] = []


def register_pending_statistics_listener(listener: Callable[[nn.Module], float]) -> None:
    if listener not in _pending_listeners:
        _pending_listeners.append(listener)


def pending_statistics_limit(router: nn.Module) -> float:
    """The next pending-forward count at which ``router`` should ask the listeners again."""
    return min((listener(router) for listener in list(_pending_listeners)), default=math.inf)


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _by_device(stats: list[GHAStatistics]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = defaultdict(list)
    for i, s in enumerate(stats):
        groups[s.yx.device].append(i)
    return groups


def all_reduce_statistics(stats: list[GHAStatistics]) -> None:
    """Sum ``stats`` over all ranks in place (no-op outside ``torch.distributed``)."""
    if not stats or not _distributed():
        return
    for indices in _by_device(stats).values():
        group = [stats[i] for i in indices]
        flat = torch.cat([s.flat() for s in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for s in group:
            n = s.yx.numel() + s.yy.numel() + 1
            s.copy_from_flat_(flat[offset : offset + n])
            offset += n


def _host_summary(stats: list[GHAStatistics]) -> list[tuple[bool, float]]:
    """(finite, token count) of every entry, with one host-device sync per device."""
    out: list[tuple[bool, float]] = [(True, 0.0)] * len(stats)
    for indices in _by_device(stats).values():
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
    from .patcher import find_star_routers

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
