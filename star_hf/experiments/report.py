"""The report folder of ``star-hf demo``: ``report.md``, ``results.json`` and the PNG plots.

Everything here is rendered from the results dictionary of :func:`star_hf.experiments.demo.run_demo`; the
verdicts are computed from the measured numbers, whichever way they go.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from star_hf.experiments.plotting import (
    draw_interpolation_bars,
    draw_load_heatmap,
    layer_label,
    plot_curves,
    pyplot,
    save_figure,
)
from star_hf.persistence.text import format_bytes

__all__ = ["write_demo_report"]

LOSS_PLOT = "loss_curves.png"
ROUTING_PLOT = "routing.png"


def write_demo_report(results: dict[str, Any], folder: Path) -> None:
    """Write ``results.json``, ``loss_curves.png``, ``routing.png`` and ``report.md`` into ``folder``."""
    from star_hf.experiments.demo_config import REPORT_NAME, RESULTS_NAME

    (folder / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_losses(results, folder / LOSS_PLOT)
    plot_routing_comparison(results, folder / ROUTING_PLOT)
    (folder / REPORT_NAME).write_text(render_markdown(results), encoding="utf-8")


# ------------------------------------------------------------------------------------------- plots
def _series(points: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [(p["step"], p[key]) for p in points if p.get(key) is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def plot_losses(results: dict[str, Any], path: Path) -> Path:
    """Pretraining (if any) and fine-tuning loss curves of both runs."""
    runs = results["finetune"]
    panels = []
    if results["pretrain"] is not None:
        pre = results["pretrain"]
        panels.append(
            {
                "title": "pretraining (stock routers)",
                "ylabel": "loss (nats/token)",
                "series": {
                    "train loss": _series(pre["train_log"], "loss"),
                    "held-out loss": _series(pre["curve"], "val_loss"),
                },
            }
        )
    panels.append(
        {
            "title": "fine-tuning: training loss (incl. aux loss)",
            "ylabel": "loss (nats/token)",
            "series": {name: _series(run["train_log"], "loss") for name, run in runs.items()},
        }
    )
    panels.append(
        {
            "title": "fine-tuning: held-out loss",
            "ylabel": "cross-entropy (nats/token)",
            "series": {name: _series(run["curve"], "val_loss") for name, run in runs.items()},
        }
    )
    return plot_curves(path, panels, "star-hf demo: baseline (linear routers) vs STAR, same data and seed")


def plot_routing_comparison(results: dict[str, Any], path: Path) -> Path:
    """Held-out expert-load heat maps of both runs after fine-tuning, and STAR's interpolation s per layer."""
    plt = pyplot()
    layers = results["routing_report"]
    labels = [layer_label(r["path"]) for r in layers]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.45 * len(layers) + 2.8))
    for ax, name in zip(axes[:2], ("baseline", "STAR")):
        shares = results["finetune"][name]["curve"][-1]["load_share_per_layer"]
        draw_load_heatmap(ax, list(shares.values()), labels, f"{name}: expert load on held-out text")
    draw_interpolation_bars(axes[2], [r["interpolation"] for r in layers], labels)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------- markdown
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _f(value: float | None, spec: str = "{:.4f}") -> str:
    return "–" if value is None else spec.format(value)


def _fluctuation(points: Sequence[dict[str, Any]]) -> float | None:
    values = [p["fluctuation"] for p in points if p.get("fluctuation") is not None]
    return sum(values) / len(values) if values else None


def _change(delta: float, lower: str, higher: str) -> str:
    """``"lower by 0.0123"`` / ``"higher by ..."``, or ``"equal to 4 decimals"`` below 5e-5."""
    if abs(delta) < 5e-5:
        return "equal to 4 decimals"
    return f"{lower if delta < 0 else higher} by {abs(delta):.4f}"


def finetune_verdict(results: dict[str, Any]) -> str:
    """One honest sentence on the fine-tuning comparison."""
    runs = results["finetune"]
    base, star = runs["baseline"]["curve"][-1]["val_loss"], runs["STAR"]["curve"][-1]["val_loss"]
    return (
        f"After {results['config']['steps']} fine-tuning steps, STAR's held-out loss is {star:.4f} against "
        f"{base:.4f} for the baseline: {_change(star - base, 'lower (better)', 'higher (worse)')} "
        f"({abs(star - base) / base:.2%}). "
        "This is one seed of a small model trained briefly; differences of this size are within what "
        "seeds alone change, so this run shows that the workflow works, not which router is better. "
        "Multi-seed comparisons are in benchmarks/README.md."
    )


def adaptation_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence per domain: what test-time adaptation did to STAR's held-out loss."""
    sentences = []
    for domain in dict.fromkeys(r["domain"] for r in rows):
        plain = next(r for r in rows if r["domain"] == domain and r["model"] == "STAR" and r["adaptation"] == "none")
        adapted = next(r for r in rows if r["domain"] == domain and r["model"] == "STAR" and r["adaptation"] != "none")
        change = _change(adapted["loss"] - plain["loss"], "lower", "higher")
        sentences.append(
            f"on the {domain} domain the adapted loss is {change} ({plain['loss']:.4f} → {adapted['loss']:.4f}) "
            f"and {adapted['top1_changed']:.1%} of the tokens changed their top-1 expert"
        )
    return "Measured: " + "; ".join(sentences) + "."


def render_markdown(results: dict[str, Any]) -> str:
    """``report.md``: the tables and plots of one demo run."""
    return "\n".join(
        [
            "# star-hf demo report\n",
            finetune_verdict(results) + "\n",
            _section_run(results),
            _section_config(results),
            _section_step0(results),
            _section_finetune(results),
            _section_routing(results),
            _section_adaptation(results),
            _section_files(results),
        ]
    )


def _section_run(results: dict[str, Any]) -> str:
    stages = [[name, f"{seconds:.1f}"] for name, seconds in results["stage_seconds"].items()]
    env = results["environment"]
    return (
        "## The run\n\n"
        f"Command: `{results['command']}`  \n"
        f"Total: {results['total_seconds']:.0f} s on {env['device']} ({env['torch_threads']} torch threads, "
        f"{env['cpu_count']} CPUs); star_hf {env['star_hf']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, Python {env['python']}.\n\n" + _table(["stage", "seconds"], stages)
    )


def _section_config(results: dict[str, Any]) -> str:
    cfg, model, data = results["config"], results["model"], results["data"]
    origin = f"pretrained here for {cfg['pretrain_steps']} steps (lr {cfg['pretrain_lr']:g})"
    if cfg["model_dir"] is not None:
        origin = f"loaded from {cfg['model_dir']}"
    rows = [
        [
            "model",
            (
                f"{model['class']}: hidden {model['hidden_size']}, {model['layers']} layers, {model['experts']} experts "
                f"(top-{model['experts_per_token']}), vocabulary {model['vocab_size']}, {model['parameters']:,} parameters"
            ),
        ],
        ["base model", origin],
        [
            "training text",
            f"{data['train']}: {data['train_sequences']} sequences × {data['seq_len']} tokens ({data['tokenizer']})",
        ],
        ["held-out text", f"{data['eval_sequences']} sequences"],
        ["shifted domain", f"{data['shift']}: {data['shift_sequences']} sequences"],
        [
            "fine-tuning",
            (
                f"{cfg['steps']} steps × {cfg['batch_size']} sequences, AdamW lr {cfg['lr']:g} (cosine), "
                f"seed {cfg['seed']}, evaluated every {cfg['eval_every']} steps"
            ),
        ],
        [
            "STAR",
            (
                f'init="preserve", GHA lr {cfg["gha_lr"]:g} (one update per optimizer step, StarCallback), '
                f"{model['routers']} routers, calibrated on {cfg['calibration_batches']} batches"
            ),
        ],
        ["test-time adaptation", f"GHA lr {cfg['tta_lr']:g}, one episode per evaluation"],
    ]
    return "## Configuration\n\n" + _table(["", ""], rows)


def _section_step0(results: dict[str, Any]) -> str:
    step0 = results["step0"]
    runs = results["finetune"]
    base0, star0 = runs["baseline"]["curve"][0]["val_loss"], runs["STAR"]["curve"][0]["val_loss"]
    verdict = "unchanged" if step0["unchanged"] else "CHANGED (beyond the tolerance)"
    rows = [
        ['after patch_model(init="preserve")', _f(step0["patched_max_abs_logit_diff"], "{:.2e}")],
        [
            f"after calibrate(preserve=True) ({step0['calibration_tokens']} tokens)",
            _f(step0["calibrated_max_abs_logit_diff"], "{:.2e}"),
        ],
        ["held-out loss at step 0: baseline / STAR", f"{base0:.6f} / {star0:.6f} (|Δ| {abs(base0 - star0):.1e})"],
    ]
    return (
        "## Step 0: the upgrade keeps the outputs\n\n"
        f"Max |Δ logit| against the base model on a held-out batch (tolerance {step0['tolerance']:g}): "
        f"**{verdict}**.\n\n" + _table(["", "max |Δ logit|"], rows)
    )


def _section_finetune(results: dict[str, Any]) -> str:
    rows = []
    for name, run in results["finetune"].items():
        first, last = run["curve"][0], run["curve"][-1]
        train_loss = run["train_log"][-1]["loss"] if run["train_log"] else None
        rows.append(
            [
                name,
                _f(first["val_loss"]),
                _f(last["val_loss"]),
                _f(last["val_ppl"], "{:.3f}"),
                _f(train_loss),
                _f(last["load_cv"], "{:.3f}"),
                _f(last["load_entropy"], "{:.3f}"),
                _f(_fluctuation(run["curve"]), "{:.4f}"),
                f"{run['seconds']:.1f}",
            ]
        )
    header = [
        "run",
        "held-out loss, step 0",
        "held-out loss, end",
        "perplexity, end",
        "last train loss",
        "load CV",
        "load entropy",
        "routing fluctuation",
        "seconds",
    ]
    return (
        "## Fine-tuning: baseline vs STAR\n\n"
        "Same data, same order, same optimizer and seed; STAR adds `star_hf.StarCallback()`. Load CV / entropy: "
        "top-k assignments on the held-out text at the end (mean over layers; entropy 1 = balanced). Routing "
        "fluctuation: share of held-out tokens whose top-1 expert changed between consecutive evaluations (mean).\n\n"
        + _table(header, rows)
        + f"\n![loss curves]({LOSS_PLOT})\n"
    )


def _section_routing(results: dict[str, Any]) -> str:
    runs = results["finetune"]
    base_last, star_last = runs["baseline"]["curve"][-1], runs["STAR"]["curve"][-1]
    rows = []
    for i, layer in enumerate(results["routing_report"]):
        rows.append(
            [
                f"`{layer['path']}`",
                _f(base_last["load_cv_per_layer"][i], "{:.3f}"),
                _f(star_last["load_cv_per_layer"][i], "{:.3f}"),
                _f(base_last["load_entropy_per_layer"][i], "{:.3f}"),
                _f(star_last["load_entropy_per_layer"][i], "{:.3f}"),
                _f(layer["interpolation_mean"], "{:.3f}"),
                _f(layer["orthonormality_error"], "{:.1e}"),
                _f(layer["drift_mean"], "{:.1e}"),
                str(layer["skipped_updates"]),
            ]
        )
    header = [
        "router",
        "load CV baseline",
        "load CV STAR",
        "entropy baseline",
        "entropy STAR",
        "mean s",
        "‖BBᵀ−I‖_F",
        "mean drift per step",
        "skipped updates",
    ]
    alignment = star_last.get("alignment")
    note = (
        ""
        if alignment is None
        else (
            f" At the end the bases span {alignment:.0%} of the top principal subspace of their routers' held-out inputs "
            "(mean squared cosine of the principal angles)."
        )
    )
    return (
        "## Routing after fine-tuning\n\n"
        "Per layer, on the held-out text; s = sigmoid(α) is the weight of the linear path (1 − s goes to the "
        "structure-aware path M B x)." + note + "\n\n" + _table(header, rows) + f"\n![routing]({ROUTING_PLOT})\n"
    )


def _section_adaptation(results: dict[str, Any]) -> str:
    tta = results["tta"]
    rows = [
        [
            r["domain"],
            r["model"],
            r["adaptation"],
            _f(r["loss"]),
            _f(r["perplexity"], "{:.3f}"),
            _f(r["load_entropy"], "{:.3f}"),
            _f(r["top1_changed"], "{:.2%}"),
            _f(r["basis_shift"], "{:.2e}"),
        ]
        for r in tta["rows"]
    ]
    header = [
        "domain",
        "model",
        "adaptation",
        "loss",
        "perplexity",
        "load entropy",
        "top-1 changed vs no adaptation",
        "mean ‖B − B₀‖_F",
    ]
    return (
        "## Test-time adaptation on a shifted domain\n\n"
        f"`star_hf.test_time_adaptation(model, lr={tta['lr']:g})`: every forward first moves the routing bases "
        "towards its own router inputs (GHA), then routes; one episode per row, bases restored afterwards. "
        + adaptation_verdict(tta["rows"])
        + "\n\n"
        + _table(header, rows)
    )


def _section_files(results: dict[str, Any]) -> str:
    checks, sizes = results["checks"], results["files"]
    what = {
        "base_model": (
            "the pretrained stock checkpoint both runs started from",
            '`AutoModelForCausalLM.from_pretrained("base_model")`',
        ),
        "folded_model": (
            "the fine-tuned STAR model, routers folded into stock gates (W_eff, b_eff)",
            '`AutoModelForCausalLM.from_pretrained("folded_model")` (any serving stack)',
        ),
        "star_adapter": (
            (
                "its STAR routers (W, b, M, α, B + star_config.json): put back onto folded_model to keep "
                "training with STAR or adapt at test time"
            ),
            '`star_hf.load_adapter(folded, "star_adapter")`',
        ),
    }
    rows = [[f"`{name}/`", format_bytes(size), *what[name]] for name, size in sizes.items()]
    rows += [
        [f"`{results_name}`", "", desc, ""]
        for results_name, desc in (
            ("results.json", "every figure of this report"),
            (LOSS_PLOT, "loss curves"),
            (ROUTING_PLOT, "expert load heat maps and interpolation s"),
        )
    ]
    return (
        "## Files\n\n"
        + f"In `{results['output_dir']}`:\n\n"
        + _table(["path", "size", "what", "load with"], rows)
        + "\nReload checks (max |Δ logit| against the fine-tuned STAR model, eval mode): folded export "
        f"{checks['folded_reload_max_abs_logit_diff']:.1e}; adapter loaded onto it "
        f"{checks['adapter_reload_max_abs_logit_diff']:.1e}.\n"
    )
