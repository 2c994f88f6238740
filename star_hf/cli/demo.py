"""``star-hf demo``: upgrade a tiny Mixtral-style model to STAR routing and show what changed."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="patch a tiny Mixtral-style MoE model and report what was done")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import star_hf

    torch.manual_seed(args.seed)
    config = MixtralConfig(
        vocab_size=256,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    star_hf.patch_model(model, star_hf.StarConfig(seed=args.seed))
    with torch.no_grad():
        after = model(ids).logits
    routers = star_hf.find_star_routers(model)
    print(f"Patched {len(routers)} router(s) of a tiny MixtralForCausalLM with STAR:")
    for path, router in routers.items():
        print(f"  {path}: {router.extra_repr()}")
    print(f"max |Δ logits| after the preserving upgrade: {(after - before).abs().max().item():.2e}")
    model.train()
    model(ids, labels=ids).loss.backward()
    updated = star_hf.gha_step(model)
    print(f"one training forward + star_hf.gha_step(model): {updated} basis update(s) applied")
    return 0
