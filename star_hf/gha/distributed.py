"""Summing GHA statistics over the ranks of ``torch.distributed``.

Yᵀ X, Yᵀ Y and N add up over ranks, so all-reducing them before the update gives every rank the
update one process would compute on the global batch — and so the identical basis.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from star_hf.gha.sanger import GHAStatistics

__all__ = ["all_reduce_statistics", "by_device", "is_distributed"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def by_device(stats: list[GHAStatistics]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = defaultdict(list)
    for i, s in enumerate(stats):
        groups[s.yx.device].append(i)
    return groups


def all_reduce_statistics(stats: list[GHAStatistics]) -> None:
    """Sum ``stats`` over all ranks in place (no-op outside ``torch.distributed``)."""
    if not stats or not is_distributed():
        return
    for indices in by_device(stats).values():
        group = [stats[i] for i in indices]
        flat = torch.cat([s.flat() for s in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for s in group:
            n = s.yx.numel() + s.yy.numel() + 1
            s.copy_from_flat_(flat[offset : offset + n])
            offset += n
