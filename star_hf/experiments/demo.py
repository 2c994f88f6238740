"""The whole STAR workflow on a small MoE language model, end to end: what ``star-hf demo`` runs.

:func:`run_demo` chains these stages under one progress bar and writes a report folder:

1. *data* — English text for training and evaluation (the standard library's docstrings by default,
   or ``train_file``/``eval_file``, or a ``datasets`` dataset saved with ``save_to_disk``) and a
   shifted domain for test-time adaptation (the standard library's source code, or ``shift_file``);
2. *base model* — a small Mixtral-style model pretrained briefly on that text, or a local
   checkpoint (``model_dir``);
3. *upgrade* — :func:`star_hf.patch_model` with ``init="preserve"`` and a :func:`star_hf.calibrate`
   warm start; the step-0 outputs are compared with the base model's;
4. *fine-tune* — the baseline and the STAR model trained by the ``Trainer`` on the same data with
   the same seed (STAR with :class:`star_hf.StarCallback`), evaluated along the way;
5. *test-time adaptation* — the STAR model on the shifted domain and on the original one, with
   and without :func:`star_hf.test_time_adaptation`;
6. *save* — the STAR adapter (:func:`star_hf.save_adapter`) and a folded stock-architecture export,
   each reloaded and compared with the STAR model;
7. *report* — ``report.md`` (tables), ``results.json`` (every figure) and PNG plots.

Nothing reaches a hub. The report folder is written atomically: a failed or interrupted run leaves
the previous report untouched.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from star_hf.experiments.demo_config import _MARKER, DemoConfig

__all__ = ["DemoConfig", "DemoData", "run_demo"]

# A float32 model's outputs count as unchanged up to this max |Δ logit|.
UNCHANGED_TOLERANCE = 1e-5
STAGES = (
    "data",
    "base model",
    "upgrade",
    "fine-tune baseline",
    "fine-tune STAR",
    "test-time adaptation",
    "save",
    "report",
)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class DemoData:
    """Token blocks of the training text, held-out batches, shifted-domain batches, calibration batches."""

    tokenizer: Any
    train: torch.utils.data.Dataset
    eval_batches: list[dict[str, torch.Tensor]]
    shift_batches: list[dict[str, torch.Tensor]]
    calibration_batches: list[dict[str, torch.Tensor]]
    description: dict[str, Any] = field(default_factory=dict)


def _documents(config: DemoConfig) -> tuple[list[str], list[str], str]:
    """(train documents, held-out documents, where they came from)."""
    from star_hf.experiments.data import (
        load_dataset_documents,
        load_text_corpus,
        read_text_documents,
        split_documents,
    )

    held_out: list[str] | None = None
    if config.dataset_dir is not None:
        docs, held_out = load_dataset_documents(config.dataset_dir, config.text_column)
        source = f"datasets folder {config.dataset_dir} (column {config.text_column!r})"
    elif config.train_file is not None:
        docs, source = read_text_documents(config.train_file), f"text file {config.train_file}"
    else:
        docs, source = load_text_corpus(config.corpus, config.max_chars), f"star_hf.experiments.data corpus {config.corpus!r}"
    if config.eval_file is not None:
        held_out = read_text_documents(config.eval_file)
        source += f"; held out: text file {config.eval_file}"
    if held_out is None:
        docs, held_out = split_documents(docs, eval_fraction=0.05, seed=0)
        source += " (5 % of the documents held out)"
    return docs, held_out, source


def _batches(dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in dataset.sequences.split(batch_size)]


def load_data(config: DemoConfig, tokenizer: Any) -> DemoData:
    """Tokenise the training, held-out and shifted-domain text into ``seq_len`` blocks."""
    from star_hf.experiments.data import (
        load_text_corpus,
        make_lm_dataset,
        read_text_documents,
    )

    train_docs, held_docs, source = _documents(config)
    if config.shift_file is not None:
        shift_docs, shift_source = read_text_documents(config.shift_file), f"text file {config.shift_file}"
    else:
        shift_docs = load_text_corpus(config.shift_corpus, config.max_chars // 4)
        shift_source = f"star_hf.experiments.data corpus {config.shift_corpus!r}"
    train = make_lm_dataset(train_docs, tokenizer, config.seq_len)
    held = make_lm_dataset(held_docs, tokenizer, config.seq_len, max_sequences=config.eval_sequences)
    shift = make_lm_dataset(shift_docs, tokenizer, config.seq_len, max_sequences=config.eval_sequences)
    calibration = make_lm_dataset(
        train_docs, tokenizer, config.seq_len, max_sequences=config.calibration_batches * config.batch_size
    )
    return DemoData(
        tokenizer=tokenizer,
        train=train,
        eval_batches=_batches(held, config.batch_size),
        shift_batches=_batches(shift, config.batch_size),
        calibration_batches=_batches(calibration, config.batch_size),
        description={
            "train": source,
            "shift": shift_source,
            "tokenizer": type(tokenizer).__name__,
            "train_sequences": len(train),
            "eval_sequences": len(held),
            "shift_sequences": len(shift),
            "seq_len": config.seq_len,
            "train_tokens": len(train) * config.seq_len,
        },
    )


# ---------------------------------------------------------------------------------------------- models
def load_base_model(config: DemoConfig, tokenizer: Any) -> nn.Module:
    """The stock causal LM of ``config.model_dir`` (see :func:`star_hf.experiments.runs.load_checkpoint`)."""
    from transformers import AutoConfig

    from star_hf.experiments.runs import load_checkpoint

    if getattr(AutoConfig.from_pretrained(str(config.model_dir)), "is_encoder_decoder", False):
        raise ValueError(
            f"{config.model_dir} is an encoder-decoder; the demo runs causal LMs (see recipes/switch_seq2seq.py)."
        )
    return load_checkpoint(config.model_dir, dtype=config.dtype, tokenizer=tokenizer)


def build_base_model(config: DemoConfig, vocab_size: int) -> nn.Module:
    """A small Mixtral-style causal LM from the config flags (weights drawn under ``config.seed``)."""
    from star_hf.experiments.runs import tiny_moe

    return tiny_moe(
        "mixtral",
        vocab_size,
        seed=config.seed,
        hidden_size=config.hidden_size,
        num_layers=config.layers,
        num_heads=config.heads,
        num_experts=config.experts,
        top_k=config.top_k,
        max_positions=max(config.seq_len, 64),
    )


def _train(model: nn.Module, data: DemoData, config: DemoConfig, *, steps: int, lr: float, star: bool, label: str):
    from star_hf.experiments.runs import RoutingCurve, train_model

    curve = RoutingCurve(data.eval_batches)
    record = train_model(
        model,
        data.train,
        steps=steps,
        batch_size=config.batch_size,
        lr=lr,
        seed=config.seed,
        star=star,
        curve=curve,
        eval_every=config.eval_every,
        bf16=config.bf16,
        progress=label,
    )
    return {"curve": curve.points, **record}


def upgrade(base: nn.Module, data: DemoData, config: DemoConfig) -> tuple[nn.Module, dict[str, Any]]:
    """A STAR copy of ``base`` (preserving init, calibrated bases) and how far its step-0 outputs moved."""
    from star_hf.config import StarConfig
    from star_hf.experiments.runs import logits_of
    from star_hf.patching.patcher import patch_model
    from star_hf.training.calibration import calibrate

    reference = logits_of(base, data.eval_batches[0])
    star = patch_model(copy.deepcopy(base), StarConfig(init="preserve", gha_lr=config.gha_lr, seed=config.seed))
    patched = (logits_of(star, data.eval_batches[0]) - reference).abs().max().item()
    calibrate(star, data.calibration_batches, preserve=True)
    calibrated = (logits_of(star, data.eval_batches[0]) - reference).abs().max().item()
    tolerance = UNCHANGED_TOLERANCE if config.dtype == "float32" else 5e-2
    return star, {
        "patched_max_abs_logit_diff": patched,
        "calibrated_max_abs_logit_diff": calibrated,
        "tolerance": tolerance,
        "unchanged": max(patched, calibrated) <= tolerance,
        "calibration_tokens": sum(b["input_ids"].numel() for b in data.calibration_batches),
    }


# ---------------------------------------------------------------------------------------------- adaptation
def _evaluate(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]):
    from star_hf.experiments.evaluation import evaluate_causal_lm

    device = next(model.parameters()).device
    return evaluate_causal_lm(model, [{k: v.to(device) for k, v in b.items()} for b in batches])


def _row(domain: str, model: str, adaptation: str, ev, reference=None, basis_shift: float | None = None) -> dict:
    from star_hf.experiments.evaluation import routing_fluctuation
    from star_hf.training.metrics import load_statistics

    row = {
        "domain": domain,
        "model": model,
        "adaptation": adaptation,
        "loss": ev.loss,
        "perplexity": ev.perplexity,
        "load_entropy": statistics.fmean(load_statistics(load)[1] for load in ev.load.values()),
        "top1_changed": None,
        "basis_shift": basis_shift,
    }
    if reference is not None:
        row["top1_changed"] = statistics.fmean(routing_fluctuation(reference.top1[p], ev.top1[p]) for p in ev.top1)
    return row


def _adapted(star: nn.Module, batches, lr: float):
    """Evaluation of ``batches`` as one test-time-adaptation episode, and the mean ‖B − B₀‖_F it caused."""
    from star_hf.adaptation import test_time_adaptation
    from star_hf.patching.patcher import find_star_routers

    routers = find_star_routers(star)
    before = {p: r.star_basis.detach().clone() for p, r in routers.items()}
    star.eval()
    with test_time_adaptation(star, lr=lr, mode="episodic"):
        ev = _evaluate(star, batches)
        shift = statistics.fmean(float((r.star_basis - before[p]).norm()) for p, r in routers.items())
    return ev, shift


def adaptation_results(base: nn.Module, star: nn.Module, data: DemoData, lr: float) -> list[dict[str, Any]]:
    """Loss and routing on the original and the shifted domain, with and without test-time adaptation.

    Each adapted evaluation is one episode over all its batches, in order (every forward first
    updates the bases with its own router inputs, then routes); the bases are restored afterwards.
    """
    rows = []
    for domain, batches in (("original (held out)", data.eval_batches), ("shifted", data.shift_batches)):
        plain = _evaluate(star, batches)
        adapted, shift = _adapted(star, batches, lr)
        rows.append(_row(domain, "baseline", "—", _evaluate(base, batches)))
        rows.append(_row(domain, "STAR", "none", plain))
        rows.append(_row(domain, "STAR", f"episodic, lr {lr:g}", adapted, plain, shift))
    return rows


# ---------------------------------------------------------------------------------------------- saving
def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def file_sizes(folder: Path, names: Sequence[str]) -> dict[str, int]:
    """Bytes on disk of each named file or folder under ``folder`` that exists."""
    return {name: _size(folder / name) for name in names if (folder / name).exists()}


# ---------------------------------------------------------------------------------------------- pipeline
def _environment(config: DemoConfig) -> dict[str, Any]:
    import transformers

    from star_hf._version import __version__

    return {
        "star_hf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def _model_summary(model: nn.Module) -> dict[str, Any]:
    from star_hf.patching.patcher import find_star_routers

    cfg = model.config
    return {
        "class": type(model).__name__,
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "experts": getattr(cfg, "num_local_experts", getattr(cfg, "num_experts", None)),
        "experts_per_token": getattr(cfg, "num_experts_per_tok", None),
        "vocab_size": cfg.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "routers": len(find_star_routers(model)),
    }


class _Stages:
    """The outer progress bar and the wall time of each stage."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(STAGES), desc="star-hf demo", unit="stage", dynamic_ncols=True)
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def start(self, name: str) -> None:
        self.bar.set_postfix_str(name)
        self._t0 = time.perf_counter()

    def done(self, name: str, message: str | None = None) -> None:
        self.seconds[name] = time.perf_counter() - self._t0
        if message:
            self.bar.write(message)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every stage and write the report folder ``config.output_dir``; return the results."""
    from transformers.utils import logging as hf_logging

    from star_hf.experiments.data import load_tokenizer
    from star_hf.experiments.report import write_demo_report
    from star_hf.experiments.runs import export_star_model
    from star_hf.persistence.io import atomic_directory
    from star_hf.training.metrics import routing_report

    config.validate()
    # One thread is the fastest for the small built-in model (and by far on a busy machine, where
    # multi-threaded kernels of tiny matrices wait on each other); a checkpoint gets torch's default.
    threads = config.threads if config.threads is not None else (1 if config.model_dir is None else None)
    if threads is not None:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # checkpoint load/save bars would break the stage bar
    started = time.perf_counter()
    final = Path(os.path.realpath(config.output_dir))
    stages = _Stages()
    try:
        with atomic_directory(final) as folder:
            stages.start("data")
            tokenizer = load_tokenizer(config.model_dir)
            data = load_data(config, tokenizer)
            stages.done(
                "data", f"data: {data.description['train_sequences']} training sequences of {config.seq_len} tokens"
            )

            stages.start("base model")
            pretrain = None
            if config.model_dir is not None:
                base = load_base_model(config, tokenizer)
            else:
                base = build_base_model(config, len(tokenizer))
                if config.pretrain_steps:
                    pretrain = _train(
                        base,
                        data,
                        config,
                        steps=config.pretrain_steps,
                        lr=config.pretrain_lr,
                        star=False,
                        label="pretrain",
                    )
                base.save_pretrained(folder / "base_model")
            message = (
                None
                if pretrain is None
                else (
                    f"pretrained {config.pretrain_steps} steps: held-out loss {pretrain['curve'][0]['val_loss']:.3f} -> "
                    f"{pretrain['curve'][-1]['val_loss']:.3f}"
                )
            )
            stages.done("base model", message)

            stages.start("upgrade")
            star, step0 = upgrade(base, data, config)
            stages.done(
                "upgrade",
                (
                    f"STAR upgrade: step-0 max |Δ logit| {step0['calibrated_max_abs_logit_diff']:.1e} after calibration "
                    f"({'unchanged' if step0['unchanged'] else 'CHANGED'})"
                ),
            )

            runs = {}
            for name, model, is_star in (("baseline", base, False), ("STAR", star, True)):
                stages.start(f"fine-tune {name}")
                runs[name] = _train(
                    model, data, config, steps=config.steps, lr=config.lr, star=is_star, label=f"fine-tune {name}"
                )
                stages.done(
                    f"fine-tune {name}", f"fine-tuned {name}: held-out loss {runs[name]['curve'][-1]['val_loss']:.4f}"
                )

            stages.start("test-time adaptation")
            tta = adaptation_results(base, star, data, config.tta_lr)
            stages.done("test-time adaptation")

            stages.start("save")
            report = routing_report(star)
            star_summary = _model_summary(star)
            checks = export_star_model(star, folder, final, data.eval_batches[0])
            stages.done("save")

            stages.start("report")
            results = {
                _MARKER: 1,
                "command": config.command(),
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
                "environment": _environment(config),
                "data": data.description,
                "model": star_summary,
                "pretrain": pretrain,
                "step0": step0,
                "finetune": runs,
                "routing_report": report.to_dicts(),
                "routing_report_markdown": report.to_markdown(),
                "tta": {"lr": config.tta_lr, "rows": tta},
                "checks": checks,
                "files": file_sizes(folder, ("base_model", "folded_model", "star_adapter")),
                "output_dir": str(final),
            }
            results["stage_seconds"] = dict(stages.seconds)
            results["total_seconds"] = time.perf_counter() - started
            write_demo_report(results, folder)
            stages.done("report")
    finally:
        stages.close()
    return results
