"""``StarCallback``: STAR's GHA updates, routing metrics and resume checks inside the Trainer.

One line: ``Trainer(..., callbacks=[star_hf.StarCallback()])``.

* ``on_step_end`` fires once per optimizer step, after the last micro-batch of the gradient
  accumulation and after ``optimizer.step()`` (``on_substep_end`` fires for the other micro-batches),
  and before the Trainer logs, evaluates or saves. The callback applies :func:`star_hf.gha_step`
  there, so checkpoints hold the basis of the step they are named after. Evaluation and prediction
  run the model in eval mode, where routers collect no statistics.
* The GHA learning rate is constant by default (as in the reference); ``schedule`` can decay it
  with the training progress ``state.global_step / state.max_steps``, which the Trainer saves in its
  checkpoints, so a resumed run continues the same schedule.
* Every ``logging_steps`` the compact routing metrics of :mod:`star_hf.training.metrics` are added to the
  Trainer's logs. The callback moves itself to the front of the callback list so that the
  reporting integrations (TensorBoard, W&B, ...) registered before it see them too.
* On resume it checks that the checkpoint's bases were restored (a digest saved with the Trainer
  state), and raises instead of silently training on with freshly initialised routers.

A Trainer that trains a patched model without this callback (and without anything else calling
``gha_step``) gets one warning in its second optimizer step: see :mod:`star_hf.integrations.trainer`.
"""

from __future__ import annotations

import hashlib
import math
import sys

import torch.nn as nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, ExportableState
from transformers.training_args import ParallelMode

from star_hf.patching.patcher import find_star_routers
from star_hf.training.metrics import RoutingMonitor, monitor_of
from star_hf.training.step import gha_step

__all__ = ["SCHEDULES", "StarCallback"]

SCHEDULES = ("constant", "linear", "cosine")

class StarCallback(TrainerCallback, ExportableState):
    """Applies the GHA update of every STAR router once per optimizer step of a ``Trainer``.

    Args:
        gha_lr: base GHA learning rate; ``None`` uses each router's ``star_config.gha_lr``.
        schedule: ``"constant"`` (default, as in the reference), ``"linear"`` or ``"cosine"`` decay
            to 0 at ``max_steps``, with the same formulas as Transformers' LR schedules.
        warmup_steps: optimizer steps of linear warm-up from 0 before the schedule.
        log_metrics: add routing metrics (``star/...``) to the Trainer's logs every ``logging_steps``.

    With ``StarConfig(update="forward")`` the routers update themselves in every training forward
    (at ``star_config.gha_lr``, as the reference does); the callback then only logs and checks.
    """

    # Read by star_hf.integrations.trainer: this callback applies the GHA updates.
    star_applies_gha_updates = True

    def __init__(
        self, gha_lr: float | None = None, schedule: str = "constant", warmup_steps: int = 0, log_metrics: bool = True
    ) -> None:
        if gha_lr is not None and (isinstance(gha_lr, bool) or not isinstance(gha_lr, (int, float)) or gha_lr < 0):
            raise ValueError(f"StarCallback: gha_lr must be a number >= 0 or None, got {gha_lr!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"StarCallback: schedule must be one of {SCHEDULES}, got {schedule!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"StarCallback: warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
        self.gha_lr = gha_lr
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.log_metrics = log_metrics
        self._model: nn.Module | None = None
        self._monitor: RoutingMonitor | None = None
        self._last_lr: float | None = None

    # ------------------------------------------------------------------ schedule
    def lr_factor(self, step: int, max_steps: int) -> float:
        """Multiplier of the base GHA learning rate for the update of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, max_steps - self.warmup_steps)
        if self.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def _step_lr(self, model: nn.Module, step: int, max_steps: int) -> float | None:
        if self.schedule == "constant" and self.warmup_steps == 0:
            return self.gha_lr  # None: every router uses its own star_config.gha_lr
        base = self.gha_lr
        if base is None:
            base = next(iter(find_star_routers(model).values())).star_config.gha_lr
        return base * self.lr_factor(step, max_steps)

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, **kwargs):
        self._move_to_front()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._move_to_front()
        if model is None or not find_star_routers(model):
            raise ValueError(
                "StarCallback: the Trainer's model has no STAR routers. Patch it first: "
                "star_hf.patch_model(model, star_hf.StarConfig(...)), then build the Trainer."
            )
        if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
            raise ValueError(
                "StarCallback: the Trainer would wrap the model in torch.nn.DataParallel (several GPUs, one "
                "process), whose per-GPU replicas drop the routers' GHA statistics. Launch one process per GPU "
                "(torchrun / accelerate launch), which star_hf supports."
            )
        self._model = model
        self._check_resumed_bases(state, model)
        if self.log_metrics:
            # Left attached after training, so that star_hf.routing_report(model) shows the load.
            self._monitor = monitor_of(model) or RoutingMonitor(model, training_only=True)
            self._monitor.window_report()  # the first logged window starts here

    def on_step_end(self, args, state, control, model=None, **kwargs):
        lr = self._step_lr(model, state.global_step - 1, state.max_steps)
        self._last_lr = lr
        if self._monitor is not None:
            self._monitor.before_update()
            gha_step(model, lr)
            self._monitor.after_update()
        else:
            gha_step(model, lr)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training logs carry "loss"; evaluation and the final summary are left alone.
        if self._monitor is None or logs is None or "loss" not in logs:
            return
        metrics = self._monitor.window_report(all_reduce=True).summary()  # every rank logs at the same steps
        if self._last_lr is not None:
            metrics["star/gha_lr"] = self._last_lr
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> dict:
        return {
            "args": {
                "gha_lr": self.gha_lr,
                "schedule": self.schedule,
                "warmup_steps": self.warmup_steps,
                "log_metrics": self.log_metrics,
            },
            "attributes": {"basis_digest": None if self._model is None else bases_digest(self._model)},
        }

    def _check_resumed_bases(self, state, model: nn.Module) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        digest = (saved or {}).get("attributes", {}).get("basis_digest")
        if digest is not None and digest != bases_digest(model):
            raise RuntimeError(
                f"StarCallback: resuming at step {state.global_step}, but the STAR bases of the model differ from "
                "the ones saved in the checkpoint: the checkpoint's router tensors were not loaded into this model. "
                "Resume the same patched model (star_hf.patch_model with the same StarConfig before building the "
                "Trainer) from a checkpoint that the Trainer wrote for it."
            )

    def _move_to_front(self) -> None:
        """Become the first callback of the handler dispatching this event (see the module docstring).

        Moving the element being visited to the front keeps the handler's iteration intact: the
        callbacks after it keep their positions.
        """
        frame = sys._getframe(1)
        for _ in range(4):
            frame = frame.f_back
            if frame is None:
                return
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler):
                callbacks = handler.callbacks
                if callbacks and callbacks[0] is not self and any(c is self for c in callbacks):
                    callbacks.remove(self)
                    callbacks.insert(0, self)
                return


def bases_digest(model: nn.Module) -> str:
    """SHA-256 of every STAR basis of ``model`` (in router order): identical bytes, identical digest."""
    digest = hashlib.sha256()
    for router in find_star_routers(model).values():
        digest.update(router.star_basis.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
