"""Routing metrics of a patched model (STAR.md §6), from what the routers already compute.

* Expert load: a forward hook on each architecture router reads the experts it actually chose —
  the top-k indices (Mixtral, Qwen-MoE, ...) or the one-hot dispatch mask after capacity (Switch) —
  and adds them to a per-layer count on the router's device. No extra forward pass and no
  host-device sync in forward; padding tokens (known from the attention mask) are not counted.
  When a router returns neither, the top-k of its logits is counted, with the router's ``top_k``.
* From the counts: coefficient of variation (std / mean over experts) and normalised entropy
  (H / log E; 1 = perfectly balanced).
* Basis health: ‖B Bᵀ − I‖_F, and the drift ‖B_t − B_{t−1}‖_F of each GHA update applied through
  :meth:`RoutingMonitor.gha_step` (or between ``before_update``/``after_update``).
* The interpolation s = sigmoid(α) per expert, and the count of skipped (non-finite) updates.

:class:`RoutingMonitor` holds the hooks and counts; :func:`routing_report` returns the per-layer
table of any patched model (load and drift columns are empty unless a monitor is attached).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from star_hf.gha.effective import interpolation
from star_hf.patching.patcher import find_star_routers
from star_hf.router.masking import current_token_weight
from star_hf.router.star_router import StarRouterMixin, _first_input
from star_hf.training.step import gha_step

__all__ = ["LayerReport", "RoutingMonitor", "RoutingReport", "routing_report"]

_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "k")

# STAR router -> the tracker of the RoutingMonitor watching it (at most one at a time).
_TRACKERS: "weakref.WeakKeyDictionary[nn.Module, _LayerTracker]" = weakref.WeakKeyDictionary()


@dataclass
class LayerReport:
    """Routing metrics of one STAR router. ``None`` marks what was not tracked."""

    path: str
    num_experts: int
    num_components: int
    tokens: float | None  # tokens counted since the last reset (padding excluded)
    load: list[float] | None  # tokens per expert (a token counts once for each expert it was sent to)
    load_cv: float | None  # std / mean of ``load``
    load_entropy: float | None  # entropy of load / total, divided by log(num_experts)
    load_source: str | None  # "indices", "dispatch_mask" or "logits_topk"
    interpolation: list[float]  # s = sigmoid(α) per expert (0 in GHA-only routers)
    interpolation_mean: float
    orthonormality_error: float  # ‖B Bᵀ − I‖_F
    drift: float | None  # ‖B_t − B_{t−1}‖_F of the last monitored update
    drift_mean: float | None  # mean drift over the monitored updates since the last reset
    skipped_updates: int  # GHA updates skipped because of non-finite inputs

    @classmethod
    def of_tensors(
        cls,
        path: str,
        alpha: torch.Tensor,
        basis: torch.Tensor,
        gha_only: bool,
        skipped_updates: int = 0,
        **tracked: Any,
    ) -> "LayerReport":
        """The report of a router with these α and B; the ``tracked`` load and drift fields default to ``None``."""
        s = interpolation(alpha, gha_only).cpu()
        fields = dict.fromkeys(("tokens", "load", "load_cv", "load_entropy", "load_source", "drift", "drift_mean"))
        return cls(
            path=path,
            num_experts=alpha.numel(),
            num_components=basis.shape[0],
            interpolation=s.tolist(),
            interpolation_mean=float(s.mean()),
            orthonormality_error=orthonormality_error(basis),
            skipped_updates=skipped_updates,
            **{**fields, **tracked},
        )


@dataclass
class RoutingReport:
    """The per-layer routing table of a patched model."""

    layers: list[LayerReport]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(layer) for layer in self.layers]

    def summary(self) -> dict[str, float]:
        """A compact set for training logs (keys prefixed ``star/``)."""
        out: dict[str, float] = {}
        loaded = [r for r in self.layers if r.load_cv is not None]
        if loaded:
            out["star/load_cv_mean"] = _mean(r.load_cv for r in loaded)
            out["star/load_cv_max"] = max(r.load_cv for r in loaded)
            out["star/load_entropy_mean"] = _mean(r.load_entropy for r in loaded)
        if self.layers:
            out["star/s_mean"] = _mean(r.interpolation_mean for r in self.layers)
            out["star/orthonormality_error_max"] = max(r.orthonormality_error for r in self.layers)
            out["star/skipped_updates"] = float(sum(r.skipped_updates for r in self.layers))
        drifted = [r for r in self.layers if r.drift_mean is not None]
        if drifted:
            out["star/drift_mean"] = _mean(r.drift_mean for r in drifted)
        return out

    def to_markdown(self) -> str:
        """The table as GitHub Markdown (one row per router)."""
        head = "| router | E | R | tokens | load CV | load entropy | mean s | ‖BBᵀ−I‖_F | drift | skipped |"
        rows = [head, "|" + "---|" * 10]
        for r in self.layers:
            cells = [
                f"`{r.path}`",
                str(r.num_experts),
                str(r.num_components),
                _fmt(r.tokens, "{:.0f}"),
                _fmt(r.load_cv),
                _fmt(r.load_entropy),
                _fmt(r.interpolation_mean),
                _fmt(r.orthonormality_error, "{:.2e}"),
                _fmt(r.drift, "{:.2e}"),
                str(r.skipped_updates),
            ]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows) + "\n"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _fmt(value: float | None, spec: str = "{:.3f}") -> str:
    return "–" if value is None else spec.format(value)


def load_statistics(load: torch.Tensor) -> tuple[float, float]:
    """(coefficient of variation, normalised entropy) of a per-expert token count."""
    load = load.double().cpu()
    total = float(load.sum())
    if total <= 0:
        return float("nan"), float("nan")
    cv = float(load.std(unbiased=False) / load.mean())
    p = load / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return cv, entropy / math.log(len(load)) if len(load) > 1 else 1.0


def orthonormality_error(basis: torch.Tensor) -> float:
    """‖B Bᵀ − I‖_F, in float64 on the CPU (an R×R product: negligible, and every backend has float64)."""
    b = basis.detach().cpu().double()
    return float(torch.linalg.matrix_norm(b @ b.t() - torch.eye(b.shape[0], dtype=b.dtype)))


def _top_k(module: nn.Module) -> int | None:
    for name in _TOP_K_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _architecture_router(model: nn.Module, path: str, router: StarRouterMixin) -> nn.Module:
    """The module whose outputs hold the routing decision of ``router``.

    A gate that is a plain ``nn.Linear`` child (Switch ``classifier``) only returns logits; the
    decision comes from its parent. A PEFT ``modules_to_save`` copy sits below a wrapper.
    """
    if type(router)._star_base_class is not nn.Linear:
        return router
    site = path.split(".modules_to_save.")[0]
    parent = site.rpartition(".")[0]
    return model.get_submodule(parent) if parent else router


class _LayerTracker:
    """Expert-load counts (on device) and basis drift of one STAR router."""

    def __init__(self, monitor: RoutingMonitor, router: StarRouterMixin, arch_router: nn.Module, training_only: bool) -> None:
        self.monitor = monitor
        self.router = router
        self.num_experts, self.dim = router.star_linear_weight.shape
        self.top_k = _top_k(arch_router)
        self.training_only = training_only
        device = router.star_basis.device
        self.counts = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
        self.source: str | None = None
        self.slot: int | None = None  # index of the output element the decision is read from
        self.previous = torch.empty_like(router.star_basis)
        self.drift: torch.Tensor | None = None
        self.drift_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.drift_steps = 0

    # ---------------------------------------------------------------- expert load
    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.training_only and not module.training:
            return
        if torch._C._current_graph_task_id() != -1:  # gradient-checkpointing recomputation
            return
        x = _first_input(args, kwargs)
        if not isinstance(x, torch.Tensor):
            return
        num_tokens = x.numel() // self.dim
        items = output if isinstance(output, (tuple, list)) else (output,)
        if self.source is None:
            self.source, self.slot = self._locate(items, num_tokens)
            if self.source is None:
                return
        with torch.no_grad():
            self._count(items[self.slot], num_tokens)

    def _locate(self, items: tuple, num_tokens: int) -> tuple[str | None, int | None]:
        """Which output holds the decision: top-k indices, a dispatch mask, else the logits."""
        tensors = [(i, t) for i, t in enumerate(items) if isinstance(t, torch.Tensor) and t.dim() > 0]
        e, k = self.num_experts, self.top_k
        for i, t in tensors:
            if not t.is_floating_point() and k and t.shape[-1] == k and t.numel() == num_tokens * k:
                return "indices", i
        for i, t in tensors:
            if not t.is_floating_point() and t.shape[-1] == e and t.numel() == num_tokens * e:
                return "dispatch_mask", i
        for i, t in tensors:
            if t.is_floating_point() and t.shape[-1] == e and t.numel() == num_tokens * e:
                return "logits_topk", i
        return None, None

    def _count(self, decision: torch.Tensor, num_tokens: int) -> None:
        if decision.device != self.counts.device:  # the model moved after the monitor started
            self._move_to(decision.device)
        weight = current_token_weight(num_tokens)
        if weight is not None:
            weight = weight.reshape(-1).to(device=self.counts.device, dtype=torch.float32)
        e = self.num_experts
        if self.source == "dispatch_mask":
            mask = decision.reshape(num_tokens, e).to(torch.float32)
            self.counts.add_(mask.sum(0) if weight is None else weight @ mask)
            return
        if self.source == "logits_topk":
            decision = decision.reshape(num_tokens, e).topk(self.top_k or 1, dim=-1).indices
        indices = decision.reshape(num_tokens, -1)
        if weight is None:
            values = torch.ones(indices.numel(), dtype=torch.float32, device=self.counts.device)
        else:
            values = weight[:, None].expand(indices.shape).reshape(-1)
        self.counts.index_add_(0, indices.reshape(-1).to(self.counts.device), values)

    # ---------------------------------------------------------------- drift
    def _move_to(self, device: torch.device) -> None:
        self.counts = self.counts.to(device)
        self.drift_sum = self.drift_sum.to(device)
        self.previous = self.previous.to(device)
        self.drift = None if self.drift is None else self.drift.to(device)

    def before_update(self) -> None:
        if self.previous.device != self.router.star_basis.device:
            self._move_to(self.router.star_basis.device)
        self.previous.copy_(self.router.star_basis)

    def after_update(self) -> None:
        self.drift = torch.linalg.vector_norm(self.router.star_basis - self.previous)
        self.drift_sum.add_(self.drift)
        self.drift_steps += 1

    # ---------------------------------------------------------------- windows
    def mark(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The totals so far, as the start of a new window."""
        return self.counts.clone(), self.drift_sum.clone(), self.drift_steps

    def reset(self) -> None:
        self.counts.zero_()
        self.drift_sum.zero_()
        self.drift_steps = 0
        self.drift = None


class RoutingMonitor:
    """Expert-load and basis-drift tracking for a patched model.

    Usage in a custom loop (the :class:`star_hf.StarCallback` does this for the Trainer)::

        monitor = RoutingMonitor(model)
        for step, batch in enumerate(loader):
            model(**batch).loss.backward(); opt.step(); opt.zero_grad()
            monitor.gha_step()                              # star_hf.gha_step + drift bookkeeping
            if step % 100 == 0:
                print(monitor.window_report().summary())    # the last 100 steps
        print(star_hf.routing_report(model).to_markdown())  # everything since the monitor started

    Args:
        model: a patched model (plain, PEFT- or DDP-wrapped).
        training_only: count the load of training-mode forwards only (evaluation runs in between
            do not mix into the training load).
    """

    def __init__(self, model: nn.Module, *, training_only: bool = False) -> None:
        routers = find_star_routers(model)
        if not routers:
            raise ValueError(f"{type(model).__name__} has no STAR routers to monitor; call star_hf.patch_model first.")
        taken = [p for p, r in routers.items() if r in _TRACKERS]
        if taken:
            raise ValueError(
                f"routers {taken} are already tracked by another RoutingMonitor; close() it first "
                "(star_hf.training.metrics.monitor_of(model) returns it)."
            )
        self.model = model
        self.trackers: dict[str, _LayerTracker] = {}
        self._handles = []
        for path, router in routers.items():
            arch_router = _architecture_router(model, path, router)
            tracker = _LayerTracker(self, router, arch_router, training_only)
            self._handles.append(arch_router.register_forward_hook(tracker.hook, with_kwargs=True))
            self.trackers[path] = tracker
            _TRACKERS[router] = tracker
        self._marks = {p: t.mark() for p, t in self.trackers.items()}

    def before_update(self) -> None:
        """Remember the bases (call right before a GHA update)."""
        with torch.no_grad():
            for t in self.trackers.values():
                t.before_update()

    def after_update(self) -> None:
        """Record the drift of the update since :meth:`before_update`."""
        with torch.no_grad():
            for t in self.trackers.values():
                t.after_update()

    def gha_step(self, lr: float | None = None) -> int:
        """:func:`star_hf.gha_step` with drift bookkeeping; returns the number of updated routers."""
        self.before_update()
        updated = gha_step(self.model, lr)
        self.after_update()
        return updated

    def report(self) -> RoutingReport:
        """Every forward and update since the monitor started (or was :meth:`reset`); this rank only."""
        return routing_report(self.model)

    def window_report(self, *, all_reduce: bool = False) -> RoutingReport:
        """The forwards and updates since the previous ``window_report``; starts the next window.

        With ``all_reduce`` the window's load is summed over all ranks (one collective: every rank
        must call it at the same point, as the Trainer's logging steps do).
        """
        rows, loads = [], []
        for path, t in self.trackers.items():
            counts0, drift0, steps0 = self._marks[path]
            loads.append(t.counts - counts0.to(t.counts.device))
            rows.append((path, t, t.drift_sum - drift0.to(t.drift_sum.device), t.drift_steps - steps0))
            self._marks[path] = t.mark()
        if all_reduce and loads and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat(loads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            loads = list(flat.split([c.numel() for c in loads]))
        return RoutingReport(
            [_layer_report(p, t.router, t, load, ds, n) for (p, t, ds, n), load in zip(rows, loads)]
        )

    def reset(self) -> None:
        """Zero the load counts and drift totals."""
        for t in self.trackers.values():
            t.reset()
        self._marks = {p: t.mark() for p, t in self.trackers.items()}

    def close(self) -> None:
        """Remove the hooks; the model no longer pays for load tracking."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for t in self.trackers.values():
            if _TRACKERS.get(t.router) is t:
                del _TRACKERS[t.router]


def monitor_of(model: nn.Module) -> RoutingMonitor | None:
    """The :class:`RoutingMonitor` attached to ``model``'s routers, if any."""
    for router in find_star_routers(model).values():
        tracker = _TRACKERS.get(router)
        if tracker is not None:
            return tracker.monitor
    return None


def _layer_report(
    path: str,
    router: StarRouterMixin,
    tracker: _LayerTracker | None,
    counts: torch.Tensor | None = None,
    drift_sum: torch.Tensor | None = None,
    drift_steps: int = 0,
) -> LayerReport:
    load = cv = entropy = tokens = source = drift = drift_mean = None
    if tracker is not None:
        counts = counts.double().cpu()
        per_token = 1 if tracker.source == "dispatch_mask" else (tracker.top_k or 1)
        tokens = float(counts.sum()) / per_token
        load = counts.tolist()
        source = tracker.source
        if tokens > 0:
            cv, entropy = load_statistics(counts)
        if tracker.drift is not None:
            drift = float(tracker.drift)
        if drift_steps:
            drift_mean = float(drift_sum) / drift_steps
    return LayerReport.of_tensors(
        path,
        router.star_alpha,
        router.star_basis,
        router.star_config.gha_only,
        router.star_skipped_updates,
        tokens=tokens,
        load=load,
        load_cv=cv,
        load_entropy=entropy,
        load_source=source,
        drift=drift,
        drift_mean=drift_mean,
    )


def routing_report(model: nn.Module) -> RoutingReport:
    """The full per-layer routing table of a patched model.

    Load and drift columns come from the :class:`RoutingMonitor` attached to the model (the
    :class:`star_hf.StarCallback` attaches one when training starts and leaves it in place) and
    cover every forward and update since it started; without a monitor they are ``None``.
    """
    routers = find_star_routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no STAR routers; call star_hf.patch_model first.")
    rows = []
    for path, router in routers.items():
        tracker = _TRACKERS.get(router)
        if tracker is None:
            rows.append(_layer_report(path, router, None))
        else:
            rows.append(_layer_report(path, router, tracker, tracker.counts, tracker.drift_sum, tracker.drift_steps))
    return RoutingReport(rows)
