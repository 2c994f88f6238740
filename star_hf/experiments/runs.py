"""Small controlled training runs of MoE language models, shared by the demo, the recipes and the benchmarks.

Comparing a linear router with STAR means holding everything else equal: the same initial weights,
the same batches in the same order, the same optimizer and schedule. This module gives one way of
doing that with the Transformers ``Trainer`` (the product path; STAR adds :class:`star_hf.StarCallback`):

- :func:`tiny_moe` builds a small Mixtral, Qwen2-MoE, Qwen3-MoE or Switch Transformers model from a
  config (no hub), initialised by its own ``_init_weights`` under a seed, with the load-balancing aux
  loss on (the paper's setting); :func:`load_checkpoint` loads a local stock checkpoint instead;
- :class:`RoutingCurve` evaluates a model on fixed held-out batches at chosen steps: loss,
  perplexity, load balance, routing fluctuation since the previous point and, for STAR models, the
  interpolation s (and optionally how well each basis matches its inputs' principal subspace);
- :func:`train_model` trains with the ``Trainer`` and a :class:`RoutingCurve`, optionally with a
  tqdm bar (:class:`StepProgress`), and returns the training-loss log and the wall time;
- :func:`lm_data`, :func:`evaluate_seq2seq` (encoder-decoders) and :func:`export_star_model`
  (adapter + folded export, reloaded and checked).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

__all__ = [
    "TINY_MODEL_TYPES",
    "CurveCallback",
    "RoutingCurve",
    "Seq2SeqEvaluation",
    "StepProgress",
    "evaluate_seq2seq",
    "export_star_model",
    "lm_data",
    "load_checkpoint",
    "logits_of",
    "pretrain_tiny_moe",
    "tiny_moe",
    "tiny_moe_config",
    "train_model",
]


TINY_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "switch_transformers")


# A model and a run small enough for every stage in seconds: the demo's and the recipes' --smoke.
SMOKE_SIZES: dict[str, int] = {
    "hidden_size": 16,
    "layers": 2,
    "experts": 4,
    "pretrain_steps": 4,
    "steps": 4,
    "seq_len": 32,
    "batch_size": 4,
    "max_chars": 20_000,
    "eval_sequences": 4,
    "eval_every": 2,
}

def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise ValueError(
            f"hidden_size ({sizes['hidden_size']}) must be divisible by the number of heads ({sizes['num_heads']})."
        )
    if sizes["top_k"] > sizes["num_experts"]:
        raise ValueError(f"top_k ({sizes['top_k']}) cannot exceed the number of experts ({sizes['num_experts']}).")


def tiny_moe_config(
    model_type: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    max_positions: int = 128,
    aux_loss_coef: float = 1e-2,
):
    """The config of a small MoE model of ``model_type`` (one of :data:`TINY_MODEL_TYPES`).

    Feed-forward sizes are 2 × ``hidden_size``; the load-balancing aux loss is on
    (``output_router_logits=True``); causal LMs have untied embeddings. Switch Transformers (top-1
    routing, ``top_k`` ignored) gets ``num_layers`` encoder and decoder layers, every second one
    sparse, no dropout, and an expert capacity of twice the even share of ``max_positions`` tokens
    per sequence; pad / eos / decoder start follow :class:`star_hf.experiments.data.ByteTokenizer` (0 / 2 / 0).
    Raises ``ValueError`` for sizes the architecture cannot build.
    """
    import transformers

    if model_type not in TINY_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {TINY_MODEL_TYPES}, got {model_type!r}.")
    _check_sizes(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_experts=num_experts,
        top_k=top_k,
        max_positions=max_positions,
    )
    if model_type == "switch_transformers":
        return transformers.SwitchTransformersConfig(
            vocab_size=vocab_size,
            d_model=hidden_size,
            d_kv=hidden_size // num_heads,
            d_ff=2 * hidden_size,
            num_layers=num_layers,
            num_decoder_layers=num_layers,
            num_heads=num_heads,
            num_experts=num_experts,
            num_sparse_encoder_layers=max(1, num_layers // 2),
            num_sparse_decoder_layers=max(1, num_layers // 2),
            expert_capacity=max(1, -(-2 * max_positions // num_experts)),
            dropout_rate=0.0,
            router_aux_loss_coef=aux_loss_coef,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2),
        "num_experts_per_tok": top_k,
        "max_position_embeddings": max_positions,
        "output_router_logits": True,
        "router_aux_loss_coef": aux_loss_coef,
        "tie_word_embeddings": False,
    }
    if model_type == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=num_experts)
    else:
        qwen = dict(
            common,
            num_experts=num_experts,
            moe_intermediate_size=hidden_size,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if model_type == "qwen2_moe":
            config = transformers.Qwen2MoeConfig(**qwen, shared_expert_intermediate_size=hidden_size)
        else:
            config = transformers.Qwen3MoeConfig(**qwen, head_dim=hidden_size // num_heads)
    # grouped_mm is Transformers' fastest experts kernel on CPU at these sizes (about 2x the eager loop).
    config._experts_implementation = "grouped_mm"
    return config


def tiny_moe(model_type: str, vocab_size: int, *, seed: int = 0, **sizes: Any):
    """A small MoE model from :func:`tiny_moe_config` (causal LM, or Switch's conditional generation),
    its weights drawn by the model's own initialiser under ``seed``. No hub access."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = tiny_moe_config(model_type, vocab_size, **sizes)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(seed)
    return auto.from_config(config)


def load_checkpoint(model_dir: str | os.PathLike, *, dtype: str = "float32", tokenizer: Any = None) -> nn.Module:
    """A stock (not yet STAR-patched) MoE checkpoint from a local folder, with the right Auto class.

    Refuses STAR checkpoints (load those with :func:`star_hf.from_pretrained`) and a ``tokenizer``
    with more tokens than the model embeds, before loading any weight.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "star_config", None):
        raise ValueError(
            f"{model_dir} is already a STAR checkpoint; pass its stock base checkpoint, or load it with "
            "star_hf.from_pretrained."
        )
    vocab = config.get_text_config().vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but {model_dir} embeds {vocab}; put the checkpoint's "
            "tokenizer files in its folder."
        )
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))


def pretrain_tiny_moe(
    model_type: str,
    tokenizer: Any,
    *,
    steps: int,
    seq_len: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    corpus: str = "docstrings",
    max_chars: int = 400_000,
    progress: str | None = "pretrain",
    **sizes: Any,
) -> nn.Module:
    """A small MoE causal LM (:func:`tiny_moe`) pretrained briefly on a :mod:`star_hf.experiments.data` corpus with
    its stock routers: the stand-in for a pretrained checkpoint when the recipes run offline."""
    from star_hf.experiments.data import load_text_corpus, make_lm_dataset

    model = tiny_moe(model_type, len(tokenizer), seed=seed, max_positions=max(seq_len, 64), **sizes)
    if steps:
        dataset = make_lm_dataset(load_text_corpus(corpus, max_chars), tokenizer, seq_len)
        train_model(model, dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, star=False, progress=progress)
    return model


def lm_data(
    tokenizer: Any,
    *,
    seq_len: int,
    eval_sequences: int,
    batch_size: int,
    corpus: str = "docstrings",
    max_chars: int | None = None,
    train_file: str | os.PathLike | None = None,
) -> tuple[torch.utils.data.Dataset, list[dict[str, torch.Tensor]]]:
    """(training blocks, held-out batches) of a text file's paragraphs or a :mod:`star_hf.experiments.data` corpus:
    5 % of the documents (a fixed seeded choice) are held out, of which ``eval_sequences`` blocks are
    batched by ``batch_size``."""
    from star_hf.experiments.data import (
        load_text_corpus,
        make_lm_dataset,
        read_text_documents,
        split_documents,
    )

    docs = read_text_documents(train_file) if train_file is not None else load_text_corpus(corpus, max_chars)
    train_docs, eval_docs = split_documents(docs, eval_fraction=0.05, seed=0)
    train = make_lm_dataset(train_docs, tokenizer, seq_len)
    held = make_lm_dataset(eval_docs, tokenizer, seq_len, max_sequences=eval_sequences).sequences
    return train, [{"input_ids": ids} for ids in held.split(batch_size)]


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
        from star_hf.experiments.evaluation import (
            evaluate_causal_lm,
            routing_fluctuation,
            subspace_alignment,
        )
        from star_hf.patching.patcher import find_star_routers
        from star_hf.training.calibration import principal_basis
        from star_hf.training.metrics import load_statistics

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


def train_model(
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
    gradient_checkpointing: bool = False,
    data_collator: Any = None,
    star_callback: Any = None,
    progress: str | None = None,
    report_to: str = "none",
) -> dict[str, Any]:
    """Train ``model`` (any MoE the ``Trainer`` trains) with AdamW, a cosine schedule after a linear
    warm-up over 5 % of the steps, and the data order fixed by ``seed`` (so every variant of one seed
    sees the same batches).

    Args:
        star: add :class:`star_hf.StarCallback` (``star_callback`` if given) so the STAR bases learn.
        curve: evaluated before training and every ``eval_every`` optimizer steps (see
            :class:`CurveCallback`).
        progress: show a tqdm bar over the steps with this description (``None``: silent).

    Returns:
        ``{"train_log": [{"step", "loss", "star/..."}...], "seconds": wall time of trainer.train()}``.
        Nothing is written to disk (checkpoints go to a temporary folder that is removed).
    """
    from transformers import (
        PrinterCallback,
        ProgressCallback,
        Trainer,
        TrainingArguments,
    )

    from star_hf.training.callback import StarCallback

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
            activation_checkpointing=gradient_checkpointing,
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


@dataclass
class Seq2SeqEvaluation:
    """Held-out loss of an encoder-decoder and the top-1 expert load of every router on the same tokens."""

    loss: float  # mean cross-entropy over the label tokens (-100 ignored), without router losses
    predicted_tokens: int
    load: OrderedDict[str, torch.Tensor]  # router path -> tokens per expert (top-1 of the logits, float64)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def evaluate_seq2seq(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> Seq2SeqEvaluation:
    """Loss and routing of an encoder-decoder on ``batches`` (``input_ids``, ``attention_mask``,
    ``labels``), in eval mode without gradients (the mode is restored).

    Encoder routers count the tokens of ``attention_mask``, decoder routers the positions that have a
    label; the load is the top-1 expert of the router logits (before any capacity drop).
    """
    from star_hf.experiments.evaluation import gate_modules, record_router_logits

    gates = gate_modules(model)
    if not gates:
        raise ValueError(f"{type(model).__name__} has no MoE routers to evaluate.")
    device = _model_device(model)
    total, tokens = 0.0, 0
    load: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_router_logits(gates) as recorded:
            for batch in batches:
                batch = _to_device(batch, device)
                for logs in recorded.values():
                    logs.clear()
                logits = model(**batch).logits
                labels = batch["labels"]
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]).float(),
                        labels.reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
                tokens += int((labels != -100).sum())
                for path, logs in recorded.items():
                    router_logits = torch.cat([x.reshape(-1, x.shape[-1]) for x in logs]).float()
                    real = batch["attention_mask"] if "encoder" in path.split(".") else labels != -100
                    top1 = router_logits[real.reshape(-1).bool()].argmax(-1)
                    counts = torch.bincount(top1, minlength=router_logits.shape[-1]).double().cpu()
                    load[path] = counts if path not in load else load[path] + counts
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the evaluation batches contain no label token.")
    return Seq2SeqEvaluation(
        loss=total / tokens, predicted_tokens=tokens, load=OrderedDict((p, load[p]) for p in gates)
    )


@torch.no_grad()
def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eval-mode logits of ``model`` on ``batch`` (moved to the model's device), float32 on the CPU."""
    model.eval()
    return model(**_to_device(batch, _model_device(model))).logits.float().cpu()


def export_star_model(
    model: nn.Module, folder: str | os.PathLike, final: str | os.PathLike | None = None, probe: dict | None = None
) -> dict[str, float]:
    """Save a trained STAR model as a folded stock export plus its STAR adapter, and check both.

    ``folder/folded_model`` is the stock architecture with W_eff, b_eff in the gates (what serving
    stacks load); ``folder/star_adapter`` holds the STAR routers (W, b, M, α, B). Training changed the
    other weights too, so the adapter's recorded base is the folded export (under ``final``, where
    ``folder`` will end up; default ``folder``): ``load_adapter(folded, adapter)`` gives back the STAR
    model, to continue training or to adapt at test time. ``model`` is folded in place.

    With a ``probe`` batch, both are reloaded from disk and compared with the model: returns the max
    |Δ logit| of the folded export and of the adapter loaded onto it (eval mode).
    """
    from star_hf.patching.patcher import fold
    from star_hf.persistence.adapter import load_adapter, save_adapter
    from star_hf.persistence.loading import save_pretrained
    from star_hf.training.metrics import monitor_of

    folder = Path(folder)
    final = Path(os.path.realpath(final if final is not None else folder))
    reference = None if probe is None else logits_of(model, probe)
    adapter_dir, folded_dir = folder / "star_adapter", folder / "folded_model"
    save_adapter(model, adapter_dir, base_model_name_or_path=str(final / "folded_model"))
    monitor = monitor_of(model)
    if monitor is not None:
        monitor.close()
    stock_class = type(fold(model))
    save_pretrained(model, folded_dir)
    if probe is None:
        return {}
    dtype = next(model.parameters()).dtype
    folded = stock_class.from_pretrained(str(folded_dir), dtype=dtype)
    folded_diff = (logits_of(folded, probe) - reference).abs().max().item()
    restored = load_adapter(folded, adapter_dir)
    return {
        "folded_reload_max_abs_logit_diff": folded_diff,
        "adapter_reload_max_abs_logit_diff": (logits_of(restored, probe) - reference).abs().max().item(),
    }
