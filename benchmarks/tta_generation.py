"""Cost of test-time adaptation during generation: tokens/s with and without adaptation.

A patched Mixtral-shaped causal LM (random weights, built from a config) generates greedily with a
KV cache — one prefill forward, then one forward per new token — once as is and once inside
``star_hf.test_time_adaptation(model)``, where every forward also applies the GHA update in every
router. Runs are interleaved (plain, adapted, plain, ...) so that machine noise hits both alike; the
overhead is the median of the per-pair time ratios. Two configs: ``tiny`` (the test models' size,
where per-forward fixed costs weigh most) and ``mid`` (hidden 512, 8 layers, 8 experts).

Usage:
    python benchmarks/tta_generation.py                    # both configs, CPU float32, 1 thread, writes JSON
    python benchmarks/tta_generation.py --configs mid --batch 8 --new-tokens 128
    python benchmarks/tta_generation.py --smoke            # seconds; checks that everything runs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

CONFIGS = {
    "tiny": dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    ),
    "mid": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
    ),
}


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import MixtralConfig, MixtralForCausalLM

    import star_hf

    torch.manual_seed(0)
    cfg = MixtralConfig(**CONFIGS[name], max_position_embeddings=1024)
    model = MixtralForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return star_hf.patch_model(model, star_hf.StarConfig(gha_lr=1e-3))


def _generate_seconds(model, ids, mask, new_tokens: int, adapt: bool) -> tuple[float, float]:
    import star_hf

    def run():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            use_cache=True, pad_token_id=0,
        )

    if ids.is_cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    if adapt:
        with star_hf.test_time_adaptation(model):  # episodic: every run starts from the same bases
            out = run()
    else:
        out = run()
    if ids.is_cuda:
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0, time.process_time() - c0


def bench_config(name: str, args) -> dict:
    import star_hf

    model = build_model(name, args.device, getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.prompt), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    mask[0, : args.prompt // 4] = 0  # one left-padded row, as in a real batch of prompts
    for adapt in (False, True):  # warm-up
        _generate_seconds(model, ids, mask, min(4, args.new_tokens), adapt)
    runs = {False: [], True: []}
    for _ in range(args.repeats):
        for adapt in (False, True):
            runs[adapt].append(_generate_seconds(model, ids, mask, args.new_tokens, adapt))
    tokens = args.batch * args.new_tokens
    plain, adapted = [w for w, _ in runs[False]], [w for w, _ in runs[True]]
    ratios = [a / p for p, a in zip(plain, adapted)]
    # CPU time of the process: less sensitive than wall time to other load on a shared machine.
    cpu_ratios = [a[1] / p[1] for p, a in zip(runs[False], runs[True])]
    result = {
        "config": {**CONFIGS[name], "routers": len(star_hf.find_star_routers(model))},
        "plain_tokens_per_s": tokens / statistics.median(plain),
        "adapted_tokens_per_s": tokens / statistics.median(adapted),
        "overhead_pct": 100 * (statistics.median(ratios) - 1),
        "cpu_time_overhead_pct": 100 * (statistics.median(cpu_ratios) - 1),
        "plain_s": plain,
        "adapted_s": adapted,
    }
    print(
        f"{name:5s} plain {result['plain_tokens_per_s']:9.1f} tok/s | adapted {result['adapted_tokens_per_s']:9.1f} "
        f"tok/s | overhead {result['overhead_pct']:+.1f}% wall, {result['cpu_time_overhead_pct']:+.1f}% CPU time "
        f"(medians of {args.repeats} interleaved pairs)",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["tiny", "mid"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length (tokens per row)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved plain/adapted pairs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads on CPU (1: stable on a shared machine)"
    )
    parser.add_argument("--output", type=Path, default=_common.RESULTS_DIR / "tta_generation.json")
    parser.add_argument("--smoke", action="store_true", help="tiny config, few tokens: a seconds-long check")
    args = parser.parse_args(argv)
    if args.smoke:
        args.configs, args.new_tokens, args.repeats, args.prompt = ["tiny"], 8, 2, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    results = {name: bench_config(name, args) for name in args.configs}
    payload = {
        "benchmark": "tta_generation",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "results": results,
    }
    _common.write_json(args.output, payload)
    print(f"wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
