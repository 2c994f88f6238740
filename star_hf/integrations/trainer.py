"""A watch on the ``transformers.Trainer``: it warns when a patched model trains and nothing applies GHA.

Routers count the training forwards whose statistics are still pending and, past one optimizer
step's worth, ask the listeners registered with
:func:`star_hf.router.star_router.register_pending_statistics_listener`. This one finds the running
``Trainer`` on the call stack; if none of its callbacks applies GHA updates (``StarCallback`` says so
with ``star_applies_gha_updates = True``), it warns once per Trainer. Installed by ``patch_model``.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from typing import Any

import torch.nn as nn

from star_hf.router.star_router import register_pending_statistics_listener

__all__ = ["check_statistics_pile_up", "install"]

_warned_trainers: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _running_trainer() -> Any:
    """The ``transformers.Trainer`` whose code is on the call stack, if any."""
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, trainer_module.Trainer):
            return owner
        frame = frame.f_back
    return None


def check_statistics_pile_up(router: nn.Module) -> float:
    """Called by a router whose statistics outlived one optimizer step's worth of forwards.

    Inside a ``Trainer``, one optimizer step runs ``gradient_accumulation_steps`` training forwards;
    if a router has accumulated more than that, nothing called :func:`star_hf.gha_step` at the end of
    the step (no :class:`StarCallback`, nor another callback doing it): warn once per Trainer. Outside
    a Trainer (custom loops), or with the callback in place, the router stops asking. Returns the
    pending-forward count at which the router asks again.
    """
    trainer = _running_trainer()
    if trainer is None or any(getattr(c, "star_applies_gha_updates", False) for c in trainer.callback_handler.callbacks):
        return math.inf
    per_step = max(1, int(trainer.args.gradient_accumulation_steps))
    if router._star_pending_forwards <= per_step:
        return per_step
    if trainer in _warned_trainers:
        return math.inf
    _warned_trainers.add(trainer)
    warnings.warn(
        "star_hf: this Trainer trains a model with STAR routers, but nothing applies their GHA updates: "
        f"statistics piled up over {router._star_pending_forwards} training forwards without a star_hf.gha_step "
        f"(one optimizer step has {per_step}), so the routers' bases would never move. Add the callback: "
        "Trainer(..., callbacks=[star_hf.StarCallback()]).",
        UserWarning,
        stacklevel=2,
    )
    return math.inf


def install() -> None:
    """Register the watch with the routers (idempotent)."""
    register_pending_statistics_listener(check_statistics_pile_up)
