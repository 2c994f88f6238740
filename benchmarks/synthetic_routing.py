"""Synthetic controlled setup (STAR paper): does a STAR router find cluster structure a linear router misses?

Tokens come from a mixture of K clusters that live in a low-dimensional (latent) subspace of a
higher ambient dimension, plus weak isotropic noise, scaled to unit RMS per coordinate like a
router input after RMSNorm — so the principal subspace of the inputs carries the cluster identity.
Each cluster has its own target function y = T_c(x) + noise, T_c a random SwiGLU MLP of the same
shape as one Mixtral expert, so a token is served best by an expert dedicated to its cluster.

The model is one Transformers ``MixtralSparseMoeBlock`` (top-2 of E experts) built from a
``MixtralConfig`` and initialised like Mixtral (normal, std = initializer_range). Variants start
from the same weights and see the same batches in the same order, with the same optimizer (AdamW),
MSE loss plus Mixtral's ``load_balancing_loss_func`` aux loss:

- ``linear``: the stock router;
- ``star η=<lr>``: ``star_hf.patch_model(block, StarConfig(init="paper", gha_lr=lr))``, one GHA step
  per optimizer step (``star_hf.gha_step``);
- controls that separate where a difference comes from: ``linear, STAR init`` is the stock router
  starting from the STAR router's initial effective gate (``star_hf.fold`` right after patching: the
  same routing function at step 0, trained as a plain linear gate), and ``star η=0`` is the STAR
  parametrisation with a frozen random basis (no GHA).

Measured on held-out tokens at regular evaluation points: task MSE (also relative to Var(y)),
specialisation (NMI between true cluster and top-1 expert), routing fluctuation (share of the fixed
held-out tokens whose top-1 expert changed since the previous evaluation point), load balance of the
top-k assignments (CV, normalised entropy), and for STAR the basis diagnostics (alignment with the
top-R principal subspace of the inputs, drift from its initial value, mean interpolation s).

Usage:
    python benchmarks/synthetic_routing.py                 # D=128, 3 seeds, η ∈ {0, 5e-5, 1e-2}, 1–5 min on 1 core
    python benchmarks/synthetic_routing.py --hidden 32 --tag d32      # structure in a quarter of the space
    python benchmarks/synthetic_routing.py --smoke         # seconds
    python benchmarks/synthetic_routing.py --aux-coef 0 --tag noaux   # no load-balancing loss
    python benchmarks/synthetic_routing.py --gha-lrs 5e-5 1e-3 1e-2 --steps 1500
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

NAME = "synthetic_routing"


@dataclass
class Task:
    """A mixture of K clusters in a latent subspace, each with its own SwiGLU target function."""

    projection: torch.Tensor  # D×k, orthonormal columns: the latent subspace in the ambient space
    means: torch.Tensor  # K×k cluster centres in latent coordinates
    teachers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per cluster (gate I×D, up I×D, down D×I)
    within: float
    ambient_noise: float
    target_noise: float
    scale: float  # makes E|x|² = D (unit RMS per coordinate)

    @classmethod
    def create(cls, args: argparse.Namespace, seed: int) -> Task:
        g = torch.Generator().manual_seed(10_000 + seed)
        d, k, i = args.hidden, args.latent, args.intermediate
        projection, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
        means = torch.randn(args.clusters, k, generator=g)
        means = args.separation * means / means.norm(dim=1, keepdim=True)
        teachers = [
            (
                torch.randn(i, d, generator=g) / math.sqrt(d),
                torch.randn(i, d, generator=g) / math.sqrt(d),
                torch.randn(d, i, generator=g) / math.sqrt(i),
            )
            for _ in range(args.clusters)
        ]
        energy = args.separation**2 + k * args.within**2 + d * args.ambient_noise**2
        return cls(
            projection, means, teachers, args.within, args.ambient_noise, args.target_noise, math.sqrt(d / energy)
        )

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` tokens: inputs x (n×D), targets y (n×D), cluster labels c (n)."""
        clusters = torch.randint(0, self.means.shape[0], (n,), generator=generator)
        latent = self.means[clusters] + self.within * torch.randn(n, self.means.shape[1], generator=generator)
        x = latent @ self.projection.t() + self.ambient_noise * torch.randn(
            n, self.projection.shape[0], generator=generator
        )
        x = self.scale * x
        y = torch.empty_like(x)
        for c, (gate, up, down) in enumerate(self.teachers):
            rows = clusters == c
            xc = x[rows]
            y[rows] = (F.silu(xc @ gate.t()) * (xc @ up.t())) @ down.t()
        y = y + self.target_noise * torch.randn(y.shape, generator=generator)
        return x, y, clusters


def build_block(args: argparse.Namespace, seed: int) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    # A bare block gets no experts-kernel dispatch from a parent model: name the eager loop explicitly.
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config)
    # A standalone block is not initialised by a PreTrainedModel; use Mixtral's own rule.
    for p in block.parameters():
        torch.nn.init.normal_(p, std=config.initializer_range)
    return block


def _evaluate(block, gates, x, y, clusters, args) -> dict:
    from star_hf.experiments.evaluation import (
        normalized_mutual_info,
        record_router_logits,
        top1_experts,
    )

    block.eval()
    with torch.no_grad(), record_router_logits(gates) as recorded:
        out = block(x[None])[0]
    block.train()
    logits = next(iter(recorded.values()))[0]
    top1 = top1_experts(logits)
    topk = logits.topk(args.top_k, dim=-1).indices.reshape(-1).cpu()
    mse = F.mse_loss(out, y).item()
    return {
        "mse": mse,
        "nmi": normalized_mutual_info(clusters, top1),
        "top1": top1,
        "load": torch.bincount(topk, minlength=args.experts).to(torch.float64),
    }


def _load_balance(counts: torch.Tensor) -> dict[str, float]:
    from star_hf.training.metrics import load_statistics

    cv, entropy = load_statistics(counts)
    return {"load_cv": cv, "load_entropy": entropy}


def train_variant(base_block, task: Task, args: argparse.Namespace, seed: int, variant: _common.Variant) -> dict:
    """Train one copy of ``base_block`` as ``variant`` describes; return its final metrics and curves."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    import star_hf
    from star_hf.experiments.evaluation import (
        gate_modules,
        principal_subspace,
        record_router_logits,
        routing_fluctuation,
        subspace_alignment,
    )

    block = variant.build(base_block, seed)
    star = variant.star
    gates = gate_modules(block)
    router = next(iter(gates.values()))
    block.train()
    optimizer = torch.optim.AdamW(block.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(20_000 + seed)  # the same batches for every variant
    x_test, y_test, c_test = task.sample(args.test_tokens, torch.Generator().manual_seed(30_000 + seed))
    target_var = y_test.var(dim=0).mean().item()
    reference = principal_subspace(x_test, args.experts)
    basis0 = router.star_basis.clone() if star else None

    curve: dict[str, list] = {k: [] for k in ("step", "mse", "nmi", "fluctuation", "alignment", "drift", "s")}
    previous_top1 = None

    def record(step: int) -> dict:
        nonlocal previous_top1
        ev = _evaluate(block, gates, x_test, y_test, c_test, args)
        curve["step"].append(step)
        curve["mse"].append(ev["mse"])
        curve["nmi"].append(ev["nmi"])
        curve["fluctuation"].append(None if previous_top1 is None else routing_fluctuation(previous_top1, ev["top1"]))
        if star:
            curve["alignment"].append(subspace_alignment(router.star_basis, reference))
            curve["drift"].append((router.star_basis - basis0).norm().item())
            curve["s"].append(router.star_interpolation.mean().item())
        previous_top1 = ev["top1"]
        return ev

    t0 = time.perf_counter()
    record(0)
    for step in range(1, args.steps + 1):
        x, y, _ = task.sample(args.batch_size, data)
        with record_router_logits(gates, detach=False) as recorded:
            out = block(x[None])[0]
        aux = load_balancing_loss_func(tuple(recorded[p][0] for p in gates), args.experts, args.top_k)
        loss = F.mse_loss(out, y) + args.aux_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if star:
            star_hf.gha_step(block)
        if step % args.eval_every == 0 or step == args.steps:
            last = record(step)
    seconds = time.perf_counter() - t0

    fluct = curve["fluctuation"][1:]
    late = fluct[len(fluct) // 2 :]
    final = {
        "mse": last["mse"],
        "relative_mse": last["mse"] / target_var,
        "nmi": last["nmi"],
        "fluctuation_mean": sum(fluct) / len(fluct),
        "fluctuation_late": sum(late) / len(late),
        **_load_balance(last["load"]),
    }
    if star:
        final.update(alignment=curve["alignment"][-1], alignment_initial=curve["alignment"][0], s=curve["s"][-1])
    return {"final": final, "curve": curve, "seconds": seconds}


def run(args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {v.name: [] for v in _common.variants(args.gha_lrs)}
    for seed in range(args.seeds):
        task = Task.create(args, seed)
        base = build_block(args, seed)
        for variant in _common.variants(args.gha_lrs):
            rec = train_variant(base, task, args, seed, variant)
            runs[variant.name].append(rec)
            f = rec["final"]
            print(
                f"seed {seed} {variant.name:>17}: mse {f['mse']:.4f} (rel {f['relative_mse']:.3f}) nmi {f['nmi']:.3f} "
                f"fluct {f['fluctuation_mean']:.4f}/{f['fluctuation_late']:.4f} load cv {f['load_cv']:.3f}"
                + (f" align {f['alignment_initial']:.2f}->{f['alignment']:.2f} s {f['s']:.3f}" if "s" in f else "")
                + f" [{rec['seconds']:.1f} s]",
                flush=True,
            )
    return {"runs": runs, "summary": _common.summarise(runs, paired=("relative_mse", "nmi"))}


COLUMNS = [
    ("relative_mse", "test MSE / Var(y)"),
    ("relative_mse_delta", "Δ vs linear (paired)"),
    ("nmi", "NMI(cluster, top-1)"),
    ("nmi_delta", "Δ vs linear (paired)"),
    ("fluctuation_mean", "fluctuation (all)"),
    ("fluctuation_late", "fluctuation (2nd half)"),
    ("load_cv", "load CV"),
    ("load_entropy", "load entropy"),
    ("alignment", "B alignment"),
]


def table(summary: dict) -> str:
    rows = []
    for name, s in summary.items():
        rows.append([name] + [_common.fmt(s[key], 3) if key in s else "—" for key, _ in COLUMNS])
    return _common.markdown_table(["router"] + [title for _, title in COLUMNS], rows)


def plot(result: dict, path: Path) -> Path:
    panels = []
    for key, title, ylabel, logy in (
        ("mse", "held-out MSE", "MSE", True),
        ("nmi", "specialisation", "NMI(cluster, top-1 expert)", False),
        ("fluctuation", "routing fluctuation", "share of top-1 changes", False),
        ("alignment", "STAR basis vs PCA subspace", "mean cos² of principal angles", False),
    ):
        curves = {}
        for name, recs in result["runs"].items():
            if not recs[0]["curve"][key]:
                continue
            steps = recs[0]["curve"]["step"]
            values = [r["curve"][key] for r in recs]
            if key == "fluctuation":  # undefined at the first evaluation point
                steps, values = steps[1:], [v[1:] for v in values]
            curves[name] = (steps, values)
        panels.append({"title": title, "ylabel": ylabel, "curves": curves, "logy": logy})
    return _common.plot_panels(path, panels, "Synthetic clusters: linear router vs STAR (mean ± std over seeds)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(p)
    p.add_argument("--hidden", type=int, default=128, help="ambient dimension D")
    p.add_argument("--latent", type=int, default=8, help="dimension k of the subspace holding the clusters")
    p.add_argument("--clusters", type=int, default=8, help="number of clusters K")
    p.add_argument("--experts", type=int, default=8, help="number of experts E (also the STAR rank R)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (Mixtral: 2)")
    p.add_argument("--intermediate", type=int, default=32, help="expert (and teacher) intermediate size")
    p.add_argument("--separation", type=float, default=3.0, help="norm of the cluster centres (latent units)")
    p.add_argument("--within", type=float, default=0.5, help="within-cluster std (latent units)")
    p.add_argument("--ambient-noise", type=float, default=0.3, help="isotropic noise std in the ambient space")
    p.add_argument("--target-noise", type=float, default=0.05, help="std of the noise added to the targets")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=256, help="tokens per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (all parameters, all variants)")
    p.add_argument("--aux-coef", type=float, default=1e-2, help="weight of the load-balancing aux loss")
    p.add_argument("--gha-lrs", type=float, nargs="+", default=[0.0, 5e-5, 1e-2], help="STAR variants to run")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--test-tokens", type=int, default=4096, help="held-out tokens (also the fluctuation probes)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.test_tokens, args.batch_size = 1, 6, 3, 256, 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.setup(args)
    result = run(args)
    print(table(result["summary"]))
    payload = {"config": _common.config_dict(args), **result}
    json_path = _common.write_json(_common.result_path(args, NAME, "json"), payload)
    png_path = plot(result, _common.result_path(args, NAME, "png"))
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
