"""Evaluation-only routing measures used by the benchmarks (STAR.md §6).

Specialisation, stability and basis health of a router, computed from what an evaluation pass
already produces (router logits, known labels, the basis). Load metrics (tokens per expert, CV,
normalised entropy) live in :mod:`star_hf.training.metrics`; this module adds the measures that need labels,
two checkpoints or reference data:

- :func:`normalized_mutual_info` — agreement between a known token label (e.g. the cluster a
  synthetic token came from) and the expert it is routed to;
- :func:`routing_fluctuation` — share of fixed probe tokens whose top-1 expert changed between two
  evaluation points;
- :func:`subspace_alignment` — how much of a basis lies in the top principal subspace of the data
  (does GHA actually find the structure?);
- :func:`top1_experts` and :func:`record_router_logits` — the routing decisions of a forward pass;
- :func:`mean_direction` — whether a basis' top row is merely the inputs' mean (uncentred GHA);
- :func:`evaluate_causal_lm` — held-out loss of a causal LM together with every router's decisions
  on the same tokens (one pass for loss, load and fluctuation probes).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LMEvaluation",
    "evaluate_causal_lm",
    "gate_modules",
    "mean_direction",
    "normalized_mutual_info",
    "principal_subspace",
    "record_router_logits",
    "routing_fluctuation",
    "subspace_alignment",
    "top1_experts",
]


def _labels(values: torch.Tensor | list[int], name: str) -> torch.Tensor:
    t = torch.as_tensor(values).reshape(-1)
    if t.numel() == 0:
        return t.to(torch.int64).cpu()
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must hold integer labels, got dtype {t.dtype}.")
    if int(t.min()) < 0:
        raise ValueError(f"{name} must hold labels >= 0, got {int(t.min())}.")
    return t.to(torch.int64).cpu()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p[p > 0]
    return -(p * p.log()).sum()


def normalized_mutual_info(labels_true: torch.Tensor | list[int], labels_pred: torch.Tensor | list[int]) -> float:
    """NMI between two labelings of the same items: I(T; P) / ((H(T) + H(P)) / 2).

    The arithmetic-mean normalisation (scikit-learn's default). 1.0 when one labeling determines
    the other up to renaming, 0.0 when they are independent. When both labelings are constant the
    value is 1.0 (they trivially agree); when exactly one is constant it is 0.0.
    """
    t, p = _labels(labels_true, "labels_true"), _labels(labels_pred, "labels_pred")
    if t.shape != p.shape:
        raise ValueError(f"labels_true and labels_pred must have the same length, got {t.numel()} and {p.numel()}.")
    if t.numel() == 0:
        raise ValueError("normalized_mutual_info needs at least one item.")
    rows, cols = int(t.max()) + 1, int(p.max()) + 1
    joint = torch.zeros(rows * cols, dtype=torch.float64)
    joint.index_add_(0, t * cols + p, torch.ones(t.numel(), dtype=torch.float64))
    joint = (joint / t.numel()).view(rows, cols)
    pt, pp = joint.sum(1), joint.sum(0)
    h_t, h_p = _entropy(pt), _entropy(pp)
    if h_t == 0 and h_p == 0:
        return 1.0
    if h_t == 0 or h_p == 0:
        return 0.0
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (pt[:, None] * pp[None, :])[nz]).log()).sum()
    return float((mi / ((h_t + h_p) / 2)).clamp(0.0, 1.0))


def routing_fluctuation(previous: torch.Tensor, current: torch.Tensor) -> float:
    """Share of probe tokens whose top-1 expert differs between two evaluation points."""
    a, b = _labels(previous, "previous"), _labels(current, "current")
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"routing_fluctuation compares the same non-empty probe set twice, got {a.numel()} and {b.numel()} tokens."
        )
    return float((a != b).to(torch.float64).mean())


def top1_experts(router_logits: torch.Tensor) -> torch.Tensor:
    """Index of the highest-scoring expert per token (logits ``…×E`` → ``N``, int64, CPU)."""
    return router_logits.detach().reshape(-1, router_logits.shape[-1]).argmax(dim=-1).cpu()


def principal_subspace(x: torch.Tensor, num_components: int) -> torch.Tensor:
    """Orthonormal rows (R×D) spanning the top-R eigenvectors of the uncentred second moment of ``x``.

    This is the subspace Sanger's rule converges to (STAR.md §2), the reference for
    :func:`subspace_alignment`.
    """
    from star_hf.training.calibration import principal_basis

    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    if not 1 <= num_components <= x.shape[-1]:
        raise ValueError(f"num_components must be in [1, {x.shape[-1]}], got {num_components}.")
    return principal_basis(x.t() @ x / x.shape[0], num_components)


def subspace_alignment(basis: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between span(basis) and span(reference).

    Both are R×D (rows need not be orthonormal; they are orthonormalised here). 1.0: the same
    subspace; R/D on average for a random basis against a fixed subspace.
    """
    if basis.shape[-1] != reference.shape[-1]:
        raise ValueError(
            f"basis and reference live in different dimensions: {basis.shape[-1]} vs {reference.shape[-1]}."
        )
    q_b, _ = torch.linalg.qr(basis.detach().to(torch.float64).t())
    q_r, _ = torch.linalg.qr(reference.detach().to(torch.float64).t())
    cosines = torch.linalg.svdvals(q_b.t() @ q_r)
    return float((cosines**2).sum() / min(q_b.shape[1], q_r.shape[1]))


def gate_modules(model: nn.Module) -> OrderedDict[str, nn.Module]:
    """Path → the module producing each router's logits, for a stock or a STAR-patched model.

    The same paths in both cases (the gate owner: the router itself, or its gate ``nn.Linear``), so
    a baseline and its STAR upgrade can be compared router by router.
    """
    from star_hf.patching.discovery import scan_routers
    from star_hf.patching.patcher import find_star_routers

    star = find_star_routers(model)
    if star:
        return OrderedDict(star)
    return OrderedDict((site.path, site.gate) for site in scan_routers(model)[0])


@contextlib.contextmanager
def record_router_logits(
    routers: OrderedDict[str, nn.Module] | dict[str, nn.Module], detach: bool = True
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect the router logits of every forward run inside the block, per router path.

    ``routers`` maps a path to a router module whose output is ``logits`` or a tuple starting with
    them (the Transformers convention). Works for stock and STAR routers alike, also where the
    model's forward does not return router logits (e.g. a bare MoE block). ``detach=False`` keeps
    the autograd graph, for an auxiliary loss computed from the recorded logits.
    """
    recorded: dict[str, list[torch.Tensor]] = {path: [] for path in routers}

    def hook_for(path: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
            recorded[path].append(logits.detach() if detach else logits)

        return hook

    handles = [router.register_forward_hook(hook_for(path)) for path, router in routers.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LMEvaluation:
    """Held-out loss of a causal LM and the routing of every router on the same tokens."""

    loss: float  # mean next-token cross-entropy over the predicted (non-padding) tokens
    predicted_tokens: int
    top1: OrderedDict[str, torch.Tensor]  # router path -> top-1 expert of every non-padding token, in order
    load: OrderedDict[str, torch.Tensor]  # router path -> top-k assignments per expert (float64)
    # router path -> uncentred second moment E[x xᵀ] and mean E[x] of the router's inputs (float64), if requested
    input_moment: OrderedDict[str, torch.Tensor] | None = None
    input_mean: OrderedDict[str, torch.Tensor] | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def _batch_dict(batch: dict | torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if "input_ids" not in batch:
        raise ValueError(f"an evaluation batch needs 'input_ids'; got keys {sorted(batch)}.")
    return dict(batch)


def _model_top_k(model: nn.Module, gates: OrderedDict[str, nn.Module]) -> int:
    for gate in gates.values():
        if isinstance(getattr(gate, "top_k", None), int):
            return gate.top_k
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    if isinstance(k, int):
        return k
    raise ValueError("cannot tell how many experts each token goes to; pass top_k= explicitly.")


def evaluate_causal_lm(
    model: nn.Module, batches: Iterable[dict | torch.Tensor], top_k: int | None = None, input_moments: bool = False
) -> LMEvaluation:
    """Loss and routing of ``model`` on ``batches`` (eval mode, no gradients; the mode is restored).

    Each batch is an ``input_ids`` tensor or a dict with ``input_ids`` and optionally
    ``attention_mask`` and ``labels`` (default: the input ids). Labels of -100, padding tokens and
    tokens that follow a padding position are not predicted.
    Routing is read with :func:`record_router_logits` for stock and STAR routers alike; padding
    tokens are left out. ``top_k`` (experts per token, for the load) defaults to the router's or the
    config's ``num_experts_per_tok``. ``input_moments`` also returns each router's uncentred input
    second moment, whose top eigenvectors are what a STAR basis should track
    (``subspace_alignment(router.star_basis, principal_basis(moment, R))``), and the inputs' mean.
    """
    gates = gate_modules(model)
    if not gates:
        raise ValueError(f"{type(model).__name__} has no MoE routers to evaluate.")
    k = top_k if top_k is not None else _model_top_k(model, gates)
    total_loss, total_tokens = 0.0, 0
    top1: dict[str, list[torch.Tensor]] = {p: [] for p in gates}
    load: dict[str, torch.Tensor] = {}
    moments: dict[str, list[torch.Tensor]] = {p: [] for p in gates}
    sums: dict[str, list[torch.Tensor]] = {p: [] for p in gates}
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            record_router_logits(gates) as recorded,
            _record_inputs(gates, input_moments) as inputs_seen,
        ):
            for batch in batches:
                batch = _batch_dict(batch)
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                labels = batch.get("labels", ids).clone()
                if mask is not None:
                    labels[mask == 0] = -100
                for logs in (*recorded.values(), *inputs_seen.values()):
                    logs.clear()
                model_inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
                logits = model(**model_inputs).logits
                target = labels[:, 1:]
                if mask is not None:
                    # A token is predicted only from a real (non-padding) position.
                    target = target.masked_fill(mask[:, :-1] == 0, -100)
                target = target.reshape(-1)
                ce = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target, ignore_index=-100, reduction="sum"
                )
                total_loss += float(ce)
                total_tokens += int((target != -100).sum())
                keep = None if mask is None else mask.reshape(-1).bool().cpu()
                for path, logs in recorded.items():
                    if len(logs) != 1:
                        raise RuntimeError(f"router {path} ran {len(logs)} times in one forward; expected once.")
                    router_logits = logs[0].reshape(-1, logs[0].shape[-1]).float().cpu()
                    if keep is not None:
                        router_logits = router_logits[keep]
                    top1[path].append(router_logits.argmax(dim=-1))
                    chosen = router_logits.topk(k, dim=-1).indices.reshape(-1)
                    counts = torch.bincount(chosen, minlength=router_logits.shape[-1]).to(torch.float64)
                    load[path] = counts if path not in load else load[path] + counts
                for path, seen in inputs_seen.items():
                    x = seen[0].reshape(-1, seen[0].shape[-1]).double().cpu()
                    if keep is not None:
                        x = x[keep]
                    moments[path].append(x.t() @ x)
                    sums[path].append(x.sum(0))
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("the evaluation batches contain no token to predict.")
    top1_all = OrderedDict((p, torch.cat(v)) for p, v in top1.items())
    moment = mean = None
    if input_moments:
        moment = OrderedDict((p, torch.stack(v).sum(0) / top1_all[p].numel()) for p, v in moments.items())
        mean = OrderedDict((p, torch.stack(v).sum(0) / top1_all[p].numel()) for p, v in sums.items())
    return LMEvaluation(
        loss=total_loss / total_tokens,
        predicted_tokens=total_tokens,
        top1=top1_all,
        load=OrderedDict((p, load[p]) for p in gates),
        input_moment=moment,
        input_mean=mean,
    )


def mean_direction(basis: torch.Tensor, moment: torch.Tensor, mean: torch.Tensor) -> dict[str, float]:
    """How much the inputs' mean dominates an uncentred basis (STAR's GHA tracks E[x xᵀ], not the covariance).

    Returns ``mean_share`` = ‖μ‖² / λ₁ (the part of the top eigenvalue of E[x xᵀ] the mean alone
    accounts for: near 1 means the top principal direction is just the mean) and ``first_row_cos`` =
    |cos(B₀, μ)| (whether the basis' first, largest-eigenvalue row has converged onto the mean). A
    mean direction gives every token nearly the same coordinate, so through M it shifts all tokens'
    logits alike — a bias-like term that carries no routing information.
    """
    mean = mean.detach().double().reshape(-1)
    top = float(torch.linalg.eigvalsh(moment.detach().double())[-1])
    first = basis.detach().double()[0]
    cos = float((first @ mean).abs() / (first.norm() * mean.norm()).clamp_min(1e-30))
    return {"mean_share": float(mean @ mean) / top if top > 0 else float("nan"), "first_row_cos": cos}


@contextlib.contextmanager
def _record_inputs(gates: OrderedDict[str, nn.Module], enabled: bool) -> Iterator[dict[str, list[torch.Tensor]]]:
    """The first input of every gate forward (the router input), per path; nothing when disabled."""
    if not enabled:
        yield {}
        return
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in gates}

    def hook_for(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(v for k, v in kwargs.items() if k in ("hidden_states", "input", "x"))
            seen[path].append(x.detach())

        return hook

    handles = [gate.register_forward_pre_hook(hook_for(path), with_kwargs=True) for path, gate in gates.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
