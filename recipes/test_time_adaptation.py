"""Test-time subspace adaptation under a domain shift: English prose → Python source code.

For each seed a tiny Mixtral-style LM (byte vocabulary, built from a config) is patched with STAR
routers and trained on English prose — the docstrings of Python's standard library — with one GHA
update per optimizer step (or a patched checkpoint is loaded with ``--model-dir``). Held-out batches
of the training domain and of a clearly different one — the standard library's source code — are
then evaluated three ways:

* ``frozen``: plain inference, the bases as trained;
* ``TTA per batch``: ``star_hf.test_time_adaptation`` with a reset before every batch, so each
  batch's forward updates the bases from its own real tokens (before its logits) and the next batch
  starts from the trained bases again (one episode per request);
* ``TTA stream``: one adaptation block over the whole evaluation stream: the bases keep tracking the
  inputs from batch to batch (restored when the block ends).

Reported per (domain, condition), mean ± std over seeds: next-token loss and perplexity; load
entropy (normalised entropy of the top-k expert load, mean over layers; 1 = balanced); routing
fluctuation (share of evaluated tokens whose top-1 expert differs from the frozen model's on the same
tokens, mean over layers); basis alignment (mean squared cosine of the principal angles between the
final bases and the top-R principal subspace of the domain's router inputs, mean over layers); basis
drift ‖B_end − B_trained‖_F (mean over layers). A markdown table is printed and everything is written
to JSON.

    python recipes/test_time_adaptation.py                # 3 seeds, a few minutes on 2 CPU cores
    python recipes/test_time_adaptation.py --smoke        # seconds (CI)
    python recipes/test_time_adaptation.py --tta-lrs 1e-3 1e-2 --eval-sequences 256
    python recipes/test_time_adaptation.py --model-dir runs/finetune_trainer/final  # evaluate a checkpoint
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

TRAIN_DOMAIN, SHIFTED_DOMAIN = "docstrings", "source"
DOMAIN_NAMES = {TRAIN_DOMAIN: "prose (train domain)", SHIFTED_DOMAIN: "code (shifted)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="a patched checkpoint to evaluate instead of training (one run)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300, help="training steps on the prose domain")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine, 5%% warm-up)")
    p.add_argument(
        "--gha-lr", type=float, default=1e-2, help="GHA learning rate in training (high enough for the bases to settle)"
    )
    p.add_argument("--tta-lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="test-time GHA learning rates")
    p.add_argument("--max-chars", type=int, default=600_000, help="characters read from each corpus")
    p.add_argument("--eval-sequences", type=int, default=128, help="held-out sequences per domain")
    p.add_argument("--eval-batch-size", type=int, default=8, help="sequences per evaluation forward")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--output-dir", type=Path, default=Path("runs/test_time_adaptation"), help="results.json, table.md")
    p.add_argument("--smoke", action="store_true", help="a minute model and a few steps: finishes in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.hidden_size, args.layers, args.experts, args.steps = 1, 32, 2, 4, 4
        args.seq_len, args.batch_size, args.max_chars, args.eval_sequences, args.eval_batch_size = 32, 4, 30_000, 8, 4
    if args.model_dir is not None and not args.model_dir.is_dir():
        p.error(f"--model-dir {args.model_dir} is not a directory")
    for name in ("seeds", "steps", "seq_len", "batch_size", "eval_sequences", "eval_batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(not math.isfinite(lr) or lr < 0 for lr in [args.gha_lr, *args.tta_lrs]):
        p.error("GHA learning rates must be finite and >= 0")
    return args


# ----------------------------------------------------------------------------- data and model
def load_domains(args: argparse.Namespace) -> dict:
    """Training sequences of the prose domain and held-out batches of both domains."""
    from star_hf.data import ByteTokenizer, load_text_corpus, make_lm_dataset, split_documents

    tokenizer = ByteTokenizer()
    data = {"vocab_size": tokenizer.vocab_size, "eval": {}}
    for corpus in (TRAIN_DOMAIN, SHIFTED_DOMAIN):
        train_docs, eval_docs = split_documents(load_text_corpus(corpus, args.max_chars), 0.05, seed=0)
        if corpus == TRAIN_DOMAIN:
            data["train"] = make_lm_dataset(train_docs, tokenizer, args.seq_len).sequences
        held_out = make_lm_dataset(eval_docs, tokenizer, args.seq_len, max_sequences=args.eval_sequences).sequences
        data["eval"][corpus] = [held_out[i : i + args.eval_batch_size] for i in range(0, len(held_out), args.eval_batch_size)]
    return data


def build_model(args: argparse.Namespace, vocab_size: int, seed: int):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import star_hf

    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.seq_len,
        output_router_logits=True,  # Mixtral's load-balancing aux loss, as in the paper's setting
        router_aux_loss_coef=1e-2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    return star_hf.patch_model(model, star_hf.StarConfig(init="paper", gha_lr=args.gha_lr, seed=seed))


def train(model, sequences, args: argparse.Namespace, seed: int) -> dict:
    """AdamW on next-token loss (+ aux loss), one GHA update per optimizer step."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    import star_hf

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 20), args.steps)
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(args.steps):
        ids = sequences[torch.randint(0, len(sequences), (args.batch_size,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        star_hf.gha_step(model)
        losses.append(float(loss.detach()))
    model.eval()
    return {"final_train_loss": statistics.fmean(losses[-10:]), "train_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- evaluation
def _per_batch_episodes(batches, handle):
    """The batches, with the bases reset to their trained values before each one is evaluated."""
    for batch in batches:
        handle.reset()
        yield batch


def _bases(model) -> dict:
    import star_hf

    return {p: r.star_basis.detach().clone() for p, r in star_hf.find_star_routers(model).items()}


def evaluate_condition(model, batches, condition: str, lr: float | None, frozen, moments) -> dict:
    """Loss and routing of ``model`` on ``batches`` under one condition (the bases are restored)."""
    import torch

    import star_hf
    from star_hf.calibration import principal_basis
    from star_hf.evaluation import evaluate_causal_lm, routing_fluctuation, subspace_alignment
    from star_hf.metrics import load_statistics

    trained = _bases(model)
    if condition == "frozen":
        result, final = evaluate_causal_lm(model, batches), trained
    else:
        with star_hf.test_time_adaptation(model, lr=lr) as handle:  # episodic: restored on exit
            stream = batches if condition == "TTA stream" else _per_batch_episodes(batches, handle)
            result = evaluate_causal_lm(model, stream)
            final = _bases(model)
    paths = list(result.top1)
    alignments = [subspace_alignment(final[p], principal_basis(moments[p], final[p].shape[0])) for p in paths]
    return {
        "loss": result.loss,
        "perplexity": result.perplexity,
        "load_entropy": statistics.fmean(load_statistics(result.load[p])[1] for p in paths),
        "fluctuation": 0.0
        if frozen is None
        else statistics.fmean(routing_fluctuation(frozen.top1[p], result.top1[p]) for p in paths),
        "alignment": statistics.fmean(alignments),
        "drift": statistics.fmean(float(torch.linalg.matrix_norm(final[p] - trained[p])) for p in paths),
        "skipped_updates": sum(r.star_skipped_updates for r in star_hf.find_star_routers(model).values()),
        "_result": result,
    }


def evaluate_model(model, data: dict, tta_lrs: list[float]) -> dict:
    """Every (domain, condition) of one trained model."""
    from star_hf.evaluation import evaluate_causal_lm

    out = {}
    for corpus, batches in data["eval"].items():
        moments = evaluate_causal_lm(model, batches, input_moments=True).input_moment
        frozen = evaluate_condition(model, batches, "frozen", None, None, moments)
        rows = {"frozen": frozen}
        for lr in tta_lrs:
            for condition in ("TTA per batch", "TTA stream"):
                rows[f"{condition} (η={lr:g})"] = evaluate_condition(model, batches, condition, lr, frozen["_result"], moments)
        out[corpus] = {name: {k: v for k, v in row.items() if not k.startswith("_")} for name, row in rows.items()}
    return out


# ----------------------------------------------------------------------------- report
METRICS = ("loss", "perplexity", "load_entropy", "fluctuation", "alignment", "drift")


def summarise(runs: list[dict]) -> dict:
    """(domain → condition → metric → {mean, std, values}) over the runs."""
    summary: dict = {}
    for corpus, conditions in runs[0]["eval"].items():
        summary[corpus] = {}
        for condition in conditions:
            summary[corpus][condition] = {}
            for metric in METRICS:
                values = [run["eval"][corpus][condition][metric] for run in runs]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[corpus][condition][metric] = {"mean": statistics.fmean(values), "std": std, "values": values}
    return summary


def markdown_table(summary: dict, seeds: int) -> str:
    head = (
        f"| domain | condition | loss | perplexity | load entropy | fluctuation vs frozen | alignment | drift |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for corpus, conditions in summary.items():
        for condition, m in conditions.items():
            cells = [f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" if seeds > 1 else f"{m[k]['mean']:.4f}" for k in METRICS]
            lines.append(f"| {DOMAIN_NAMES[corpus]} | {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    import star_hf
    from star_hf.io import atomic_directory, write_json

    torch.set_num_threads(args.threads)
    data = load_domains(args)
    print(
        f"train: {len(data['train'])} prose sequences of {args.seq_len} bytes; eval: "
        + ", ".join(f"{sum(len(b) for b in batches)} {DOMAIN_NAMES[c]}" for c, batches in data["eval"].items())
    )
    runs = []
    seeds = [0] if args.model_dir is not None else range(args.seeds)
    for seed in seeds:
        if args.model_dir is not None:
            model, record = star_hf.from_pretrained(args.model_dir).eval(), {"checkpoint": str(args.model_dir)}
        else:
            model = build_model(args, data["vocab_size"], seed)
            record = train(model, data["train"], args, seed)
        record["eval"] = evaluate_model(model, data, args.tta_lrs)
        runs.append(record)
        shifted = record["eval"][SHIFTED_DOMAIN]
        print(
            f"seed {seed}: code loss frozen {shifted['frozen']['loss']:.4f}, "
            + ", ".join(f"{k} {v['loss']:.4f}" for k, v in shifted.items() if k != "frozen"),
            flush=True,
        )
    summary = summarise(runs)
    table = markdown_table(summary, len(runs))
    print(table)
    payload = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs,
               "summary": summary, "table": table}
    with atomic_directory(args.output_dir, keep_existing=True) as tmp:
        write_json(tmp / "results.json", payload)
        (tmp / "table.md").write_text(table + "\n")
    print(f"wrote {args.output_dir / 'results.json'} and table.md")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
