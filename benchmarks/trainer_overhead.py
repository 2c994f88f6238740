"""Trainer step time of the STAR-patched model + StarCallback against the unpatched model.

The model and data are those of recipes/finetune_trainer.py (its defaults: a tiny Mixtral on the
standard library's docstrings, byte tokens, batch 8 × 128). Both variants start from the same
weights and see the same batches. A step is timed from one ``on_step_begin`` to the next, so it
includes the forward/backward, the optimizer, the GHA update (StarCallback's ``on_step_end``) and
the routing metrics added to the logs every ``--logging-steps``. Rounds alternate
(linear, STAR, linear, STAR, ...) and each round trains a fresh Trainer for ``--warmup`` untimed and
``--steps`` timed steps; the reported overhead is the median over rounds of t_STAR / t_linear, for
wall time and for the process's CPU time (steadier when other jobs share the CPU).

Usage:
    python benchmarks/trainer_overhead.py                 # writes benchmarks/results/trainer_overhead.json
    python benchmarks/trainer_overhead.py --smoke
    python benchmarks/trainer_overhead.py --hidden-size 256 --layers 4 --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "finetune_trainer.py"
NAME = "trainer_overhead"


def load_recipe():
    spec = importlib.util.spec_from_file_location("finetune_trainer", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per variant")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadiest on a shared CPU)")
    p.add_argument("--out-dir", type=Path, default=_common.RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="seconds: 1 round of 2 steps on the recipe's smoke model")
    args, recipe_argv = p.parse_known_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.warmup = 1, 2, 1
        recipe_argv = [*recipe_argv, "--smoke"]
    recipe_args = load_recipe().parse_args(recipe_argv)  # --hidden-size, --layers, ... go to the recipe
    return args, recipe_args


def timed_round(model, dataset, recipe_args, args: argparse.Namespace, star: bool, out: Path) -> tuple[float, float]:
    """(wall, process CPU) seconds for ``args.steps`` Trainer steps after ``args.warmup`` untimed ones."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import star_hf

    stamps: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, a, state, control, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))

    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=recipe_args.batch_size,
        learning_rate=recipe_args.lr,
        logging_steps=recipe_args.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=recipe_args.seed,
    )
    callbacks = [StepClock()] + ([star_hf.StarCallback()] if star else [])
    Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks).train()
    (wall0, cpu0), (wall1, cpu1) = stamps[args.warmup], stamps[-1]
    return wall1 - wall0, cpu1 - cpu0


def main(argv: list[str] | None = None) -> dict:
    args, recipe_args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    import star_hf
    from star_hf.experiments.data import (
        ByteTokenizer,
        load_text_corpus,
        make_lm_dataset,
    )

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    recipe = load_recipe()
    tokenizer = ByteTokenizer()
    needed = (args.warmup + args.steps) * recipe_args.batch_size
    dataset = make_lm_dataset(
        load_text_corpus(recipe_args.corpus, recipe_args.max_chars), tokenizer, recipe_args.seq_len, needed
    )
    base = recipe.build_model(recipe_args, tokenizer.vocab_size)
    models = {
        "linear": copy.deepcopy(base),
        "star": star_hf.patch_model(copy.deepcopy(base), star_hf.StarConfig(gha_lr=recipe_args.gha_lr)),
    }
    wall: dict[str, list[float]] = {"linear": [], "star": []}
    cpu: dict[str, list[float]] = {"linear": [], "star": []}
    for r in range(args.rounds):
        for name, model in models.items():
            with tempfile.TemporaryDirectory() as scratch:
                seconds, cpu_seconds = timed_round(model, dataset, recipe_args, args, name == "star", Path(scratch))
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            print(f"round {r}: {name:6s} {1000 * seconds / args.steps:8.2f} ms/step wall, "
                  f"{1000 * cpu_seconds / args.steps:8.2f} ms/step CPU")
    ratios = [s / lin for s, lin in zip(wall["star"], wall["linear"])]
    cpu_ratios = [s / lin for s, lin in zip(cpu["star"], cpu["linear"])]
    result = {
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratios": cpu_ratios,
        "ms_per_step": {k: [1000 * t / args.steps for t in v] for k, v in wall.items()},
        "cpu_ms_per_step": {k: [1000 * t / args.steps for t in v] for k, v in cpu.items()},
        "model": {
            "hidden_size": recipe_args.hidden_size,
            "layers": recipe_args.layers,
            "experts": recipe_args.experts,
            "top_k": recipe_args.top_k,
            "batch": [recipe_args.batch_size, recipe_args.seq_len],
        },
        "config": {**_common.config_dict(args), "out_dir": str(args.out_dir)},
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    path = _common.write_json(args.out_dir / f"{NAME}{'_smoke' if args.smoke else ''}.json", result)
    print(f"STAR + StarCallback / linear Trainer step time: median {result['ratio_median']:.3f}x wall "
          f"({', '.join(f'{x:.3f}' for x in ratios)}), {result['cpu_ratio_median']:.3f}x CPU time "
          f"({', '.join(f'{x:.3f}' for x in cpu_ratios)}) over {args.rounds} rounds; wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
