"""Small controlled training runs of MoE language models, shared by the demo, the recipes and the benchmarks.

Comparing a linear router with STAR means holding everything else equal: the same initial weights,
the same batches in the same order, the same optimizer and schedule. This module gives one way of
doing that with the Transformers ``Trainer`` (the product path; STAR adds :class:`star_hf.StarCallback`):

- :func:`tiny_mixtral` builds a small Mixtral-style causal LM from a config (no hub), initialised by
  its own ``_init_weights`` under a seed, with the load-balancing aux loss on (the paper's setting);
- :class:`RoutingCurve` evaluates a model on fixed held-out batches at chosen steps: loss,
  perplexity, load balance, routing fluctuation since the previous point and, for STAR models, the
  interpolation s (and optionally how well each basis matches its inputs' principal subspace);
- :func:`train_causal_lm` trains with the ``Trainer`` and a :class:`RoutingCurve`, optionally with a
  tqdm bar (:class:`StepProgress`), and returns the training-loss log and the wall time.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

__all__ = ["CurveCallback", "RoutingCurve", "StepProgress", "tiny_mixtral", "tiny_mixtral_config", "train_causal_lm"]


def tiny_mixtral_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    max_positions: int = 128,
    aux_loss_coef: float = 1e-2,
):
    """A ``MixtralConfig`` for a small model (``intermediate_size`` defaults to 2 × hidden size).

    The aux loss is on (``output_router_logits=True``); embeddings are untied. Raises ``ValueError``
    for shapes Mixtral cannot build (e.g. a hidden size not divisible by the number of heads).
    """
    from transformers import MixtralConfig

    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_experts", num_experts),
        ("top_k", top_k),
        ("max_positions", max_positions),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by the number of heads ({num_heads}).")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) cannot exceed the number of experts ({num_experts}).")
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_positions,
        output_router_logits=True,
        router_aux_loss_coef=aux_loss_coef,
        tie_word_embeddings=False,
    )
    # grouped_mm is Transformers' fastest experts kernel on CPU at these sizes (about 2x the eager loop).
    config._experts_implementation = "grouped_mm"
    return config


def tiny_mixtral(vocab_size: int, *, seed: int = 0, **config_kwargs: Any):
    """A ``MixtralForCausalLM`` from :func:`tiny_mixtral_config`, its weights drawn under ``seed``."""
    from transformers import MixtralForCausalLM

    config = tiny_mixtral_config(vocab_size, **config_kwargs)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class RoutingCurve:
    """Evaluates a causal LM at chosen steps on fixed held-out batches.

    Each point holds the held-out loss and perplexity, the load balance of the top-k assignments
    (CV and normalised entropy, per layer and averaged; the share of tokens per expert per layer),
    the routing fluctuation (share of held-out tokens whose top-1 expert changed since the previous
    point, mean over layers) and, for STAR models, the interpolation s. The held-out tokens double as
    the fluctuation probes.
    """

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        self.batches = list(batches)
        self.points: list[dict[str, Any]] = []
        self._previous_top1: dict[str, torch.Tensor] | None = None

    def evaluate(self, model: nn.Module, step: int, input_moments: bool = False) -> dict[str, Any]:
        """Add and return the point of ``step``; ``input_moments`` adds each basis' alignment with
        the top-R principal subspace of its router's inputs on these batches (STAR models)."""
        from .calibration import principal_basis
        from .evaluation import evaluate_causal_lm, routing_fluctuation, subspace_alignment
        from .metrics import load_statistics
        from .patcher import find_star_routers

        device = _model_device(model)
        ev = evaluate_causal_lm(model, [_to_device(b, device) for b in self.batches], input_moments=input_moments)
        per_layer = {path: load_statistics(load) for path, load in ev.load.items()}
        point: dict[str, Any] = {
            "step": step,
            "val_loss": ev.loss,
            "val_ppl": math.exp(ev.loss),
            "load_cv": statistics.fmean(cv for cv, _ in per_layer.values()),
            "load_entropy": statistics.fmean(h for _, h in per_layer.values()),
            "load_cv_per_layer": [cv for cv, _ in per_layer.values()],
            "load_entropy_per_layer": [h for _, h in per_layer.values()],
            "load_share_per_layer": {path: (load / load.sum()).tolist() for path, load in ev.load.items()},
            "fluctuation": None,
        }
        if self._previous_top1 is not None:
            point["fluctuation"] = statistics.fmean(
                routing_fluctuation(self._previous_top1[p], ev.top1[p]) for p in ev.top1
            )
        routers = find_star_routers(model)
        if routers:
            point["s_per_layer"] = [r.star_interpolation.mean().item() for r in routers.values()]
            point["s"] = statistics.fmean(point["s_per_layer"])
        if input_moments and routers:
            point["alignment_per_layer"] = [
                subspace_alignment(r.star_basis, principal_basis(ev.input_moment[p], r.star_basis.shape[0]))
                for p, r in routers.items()
            ]
            point["alignment"] = statistics.fmean(point["alignment_per_layer"])
        self._previous_top1 = ev.top1
        self.points.append(point)
        return point

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the points that have it."""
        rows = [(p["step"], p[key]) for p in self.points if p.get(key) is not None]
        return [s for s, _ in rows], [v for _, v in rows]


class CurveCallback(TrainerCallback):
    """Evaluates a :class:`RoutingCurve` before training and after every ``every``-th optimizer step
    (and the last, with the basis alignment). It runs after :class:`star_hf.StarCallback` (which
    moves itself to the front), so a point includes that step's GHA update."""

    def __init__(self, curve: RoutingCurve, every: int) -> None:
        self.curve = curve
        self.every = every

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.curve.points:
            self.curve.evaluate(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every == 0 or step == state.max_steps:
            self.curve.evaluate(model, step, input_moments=step == state.max_steps)


class StepProgress(TrainerCallback):
    """A tqdm bar over the optimizer steps of a ``Trainer`` run, showing the last logged training loss
    (used instead of the Trainer's own bar, which prints every log line)."""

    def __init__(self, description: str, leave: bool = False) -> None:
        self.description = description
        self.leave = leave
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, desc=self.description, unit="step", leave=self.leave, dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_causal_lm(
    model: nn.Module,
    train_dataset: torch.utils.data.Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    star: bool,
    curve: RoutingCurve | None = None,
    eval_every: int = 25,
    grad_accum: int = 1,
    weight_decay: float = 0.0,
    bf16: bool = False,
    data_collator: Any = None,
    star_callback: Any = None,
    progress: str | None = None,
    report_to: str = "none",
) -> dict[str, Any]:
    """Train ``model`` with the Transformers ``Trainer``: AdamW, cosine schedule after a linear warm-up
    over 5 % of the steps,
    data order fixed by ``seed`` (so every variant of one seed sees the same batches).

    Args:
        star: add :class:`star_hf.StarCallback` (``star_callback`` if given) so the STAR bases learn.
        curve: evaluated before training and every ``eval_every`` optimizer steps (see
            :class:`CurveCallback`).
        progress: show a tqdm bar over the steps with this description (``None``: silent).

    Returns:
        ``{"train_log": [{"step", "loss", "star/..."}...], "seconds": wall time of trainer.train()}``.
        Nothing is written to disk (checkpoints go to a temporary folder that is removed).
    """
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    from .callback import StarCallback

    if steps < 1 or batch_size < 1 or eval_every < 1 or grad_accum < 1:
        raise ValueError("steps, batch_size, eval_every and grad_accum must all be >= 1.")
    callbacks = []
    if star:
        callbacks.append(star_callback if star_callback is not None else StarCallback())
    if curve is not None:
        callbacks.append(CurveCallback(curve, eval_every))
    if progress is not None:
        callbacks.append(StepProgress(progress))
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            weight_decay=weight_decay,
            logging_steps=eval_every,
            save_strategy="no",
            report_to=report_to,
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=bf16,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            callbacks=callbacks,
        )
        # The callers print their own summaries; per-log printing would drown them.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    train_log = [
        {k: v for k, v in row.items() if k in ("step", "loss") or k.startswith("star/")}
        for row in trainer.state.log_history
        if "loss" in row
    ]
    return {"train_log": train_log, "seconds": seconds}
