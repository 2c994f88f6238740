"""The STAR router: a linear gate whose weight gains a structure-aware path.

    z(x) = s ⊙ (W x + b) + (1 − s) ⊙ (M B x),   s = sigmoid(α)

For a fixed basis B this is the linear gate ``W_eff x + b_eff`` with
``W_eff = s ⊙ W + (1 − s) ⊙ M B`` and ``b_eff = s ⊙ b``. A STAR router therefore keeps the
architecture's own forward untouched and only changes how its gate weight is produced: the
``weight`` (and ``bias``) attribute becomes a property returning W_eff (b_eff). Everything after the
logits — score function, top-k, capacity, score-correction bias, aux losses — is the
architecture's own code.

Gradients reach W, b, M and α through W_eff; B is a float32 buffer learned by GHA only.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from star_hf.gha.distributed import all_reduce_statistics
from star_hf.gha.effective import effective_factors, effective_weight, interpolation
from star_hf.gha.sanger import (
    GHAStatistics,
    guarded_sanger_step_,
    guarded_update_,
    sanger_update,
)
from star_hf.router.masking import current_token_weight, current_token_weights

__all__ = ["StarRouterMixin", "is_star_router", "pending_statistics_limit", "register_pending_statistics_listener"]

STAR_PARAMETER_NAMES = ("star_linear_weight", "star_linear_bias", "star_mixing", "star_alpha")
STAR_BUFFER_NAMES = ("star_basis",)

_nonfinite_warned = False

# Per-forward skip flags of test-time adaptation are summed on device in groups of this many.
_SKIP_FLAGS_PER_SUM = 64

# Fused optimizers (torch's AdamW(fused=True), the Trainer's default "adamw_torch_fused") update
# parameters in place without bumping their version counters, so the eval cache of W_eff also keys
# on a process-wide count of optimizer steps.
_optimizer_steps = 0


_optimizer_hook = None


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def count_optimizer_steps() -> None:
    """Register the process-wide optimizer post-step hook behind the eval cache (once).

    Called when the first STAR router class is created, not at import: importing star_hf leaves
    torch's optimizers as they were.
    """
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def warn_nonfinite_once(where: str) -> None:
    """One warning per process: a GHA update was skipped because its statistics were not finite."""
    global _nonfinite_warned
    if not _nonfinite_warned:
        _nonfinite_warned = True
        warnings.warn(
            f"star_hf: non-finite router inputs reached the GHA statistics of {where}; that update was "
            "skipped and the basis kept its previous (finite) value. Further skips are counted in "
            "`router.star_skipped_updates` and in the routing metrics, without more warnings.",
            RuntimeWarning,
            stacklevel=3,
        )


# Asked when a router's statistics outlive one optimizer step's worth of training forwards, a sign
# that nothing calls gha_step. Integrations that know what a step is (the Trainer callback) register
# here; each returns after how many pending forwards to ask again (math.inf: stop asking). The
# routers themselves know nothing of training frameworks.
_pending_listeners: list[Callable[[nn.Module], float]] = []


def register_pending_statistics_listener(listener: Callable[[nn.Module], float]) -> None:
    if listener not in _pending_listeners:
        _pending_listeners.append(listener)


def pending_statistics_limit(router: nn.Module) -> float:
    """The next pending-forward count at which ``router`` should ask the listeners again."""
    return min((listener(router) for listener in list(_pending_listeners)), default=math.inf)


@torch.compiler.disable
def _observe_outside_graph(router: "StarRouterMixin", x: torch.Tensor) -> None:
    router._star_observe_eager(x)


def is_star_router(module: nn.Module) -> bool:
    return isinstance(module, StarRouterMixin)


def _no_autocast(device: torch.device):
    # Basis algebra and statistics stay float32 even inside an autocast region. Entering an
    # autocast context costs ~10 µs on CPU, a lot for a per-forward update, so only when needed.
    if torch._C._is_any_autocast_enabled():
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    return None


def _with_first_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value,) + tuple(args[1:]), kwargs
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return args, {**kwargs, key: value}
    return args, kwargs


def _float32_to(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (a router's output: a tensor or nested tuples) with its float32 tensors cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype == torch.float32 else value
    if isinstance(value, tuple):
        return tuple(_float32_to(v, dtype) for v in value)
    return value


def _replicated_like(basis: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The basis as a replicated DTensor when the parameters are DTensors (FSDP2 shards them outside
    forward, e.g. in ``state_dict``), so that W_eff comes out in the parameters' own sharding."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None or getattr(basis, "device_mesh", None) is not None:
        return basis
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(basis, mesh, [Replicate()] * mesh.ndim, run_check=False)


class StarRouterMixin:
    """Mixed in front of an architecture's router (or gate ``nn.Linear``) class by the patcher.

    Introspection: ``star_linear_weight`` (W, E×D), ``star_linear_bias`` (b or None),
    ``star_mixing`` (M, E×R), ``star_alpha`` (α, E), ``star_basis`` (B, R×D, float32 buffer),
    ``star_config`` (:class:`StarConfig`).
    """

    _star_base_class: type
    # True when the router subclasses nn.Linear and its own forward may change its input before
    # nn.Linear.forward multiplies it (PhiMoE's input jitter): StarLinearInput observes it there.
    _star_observes_linear_input: bool = False
    # How logits_fp32 reaches this router (see star_hf.router.generated.LOGITS_FP32_MODES): "input" runs
    # it on a float32 copy of its input; "native" leaves the input alone (the router upcasts it
    # itself); "outputs" also returns its outputs in the input's dtype, for MoE code that needs that.
    _star_logits_fp32_mode: str = "input"

    # ------------------------------------------------------------------ effective gate
    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.star_effective_weight()

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.star_effective_bias()

    @property
    def star_interpolation(self) -> torch.Tensor:
        """s = sigmoid(α), the per-expert weight of the original linear path (0 in GHA-only mode)."""
        return interpolation(self.star_alpha, self.star_config.gha_only)

    def _star_weight_dtype(self) -> torch.dtype:
        return torch.float32 if self.star_config.logits_fp32 else self.star_linear_weight.dtype

    def _star_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.star_linear_weight, self.star_linear_bias, self.star_mixing, self.star_alpha, self.star_basis)

    def _star_cacheable(self) -> bool:
        if torch.compiler.is_compiling():
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(p is not None and p.requires_grad for p in self._star_tensors()[:4])

    def _star_cache_key(self) -> tuple[tuple, tuple]:
        """(basis state, state of everything else): a tensor's version counter and storage change
        with every in-place update, load or move. Read straight from the module's dicts: this runs
        on every eval forward, where nn.Module.__getattr__ would cost more than the gate itself."""
        params, basis = self._parameters, self._buffers["star_basis"]
        w, b = params["star_linear_weight"], params["star_linear_bias"]
        m, a = params["star_mixing"], params["star_alpha"]
        cfg = self.star_config
        rest = (
            w._version,
            w.data_ptr(),
            m._version,
            m.data_ptr(),
            a._version,
            a.data_ptr(),
            None if b is None else (b._version, b.data_ptr()),
            cfg.logits_fp32,
            cfg.gha_only,
            _optimizer_steps,
        )
        return (basis._version, basis.data_ptr()), rest

    def _star_static_factors(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(s ⊙ W, (1 − s) ⊙ M, b_eff): with them W_eff = s ⊙ W + ((1 − s) ⊙ M) B is one addmm.

        They do not depend on B, so the eval cache keeps them: when only the basis changes (the
        per-forward update of test-time adaptation), W_eff costs one kernel instead of several.
        """
        w, b = self.star_linear_weight, self.star_linear_bias
        with _no_autocast(w.device):
            return effective_factors(w, b, self.star_mixing, self.star_alpha, self.star_config.gha_only)

    def _star_compute_effective(self, static: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        basis = _replicated_like(self.star_basis, self.star_mixing)
        if torch.is_grad_enabled() and self.star_config.update == "forward":
            # Autograd keeps B for the gradient of M; the per-forward update changes B in place,
            # possibly before this graph's backward (several forwards per step), so it gets a snapshot.
            # With per-step updates B only changes in gha_step, after the step's backward passes.
            basis = basis.clone()
        factors = self._star_static_factors() if static is None else static
        b_eff = factors[2]
        with _no_autocast(basis.device):
            w_eff = effective_weight(factors, basis)
            dtype = self._star_weight_dtype()
            if w_eff.dtype != dtype:  # a no-op .to() still costs a dispatch on the per-forward TTA path
                w_eff = w_eff.to(dtype)
            if b_eff is not None and b_eff.dtype != dtype:
                b_eff = b_eff.to(dtype)
        return w_eff, b_eff

    def _star_effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._star_cacheable():
            return self._star_compute_effective()
        key = self._star_cache_key()
        cached = self.__dict__.get("_star_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                same_factors = cached is not None and cached[0][1] == key[1]
                static = cached[2] if same_factors else self._star_static_factors()
                cached = (key, self._star_compute_effective(static), static)
            self.__dict__["_star_cache"] = cached
        return cached[1]

    def star_effective_weight(self) -> torch.Tensor:
        """W_eff = s ⊙ W + (1 − s) ⊙ M B, the weight of the equivalent plain linear gate."""
        return self._star_effective()[0]

    def star_effective_bias(self) -> torch.Tensor | None:
        """b_eff = s ⊙ b (``None`` where the architecture's gate has no bias)."""
        return self._star_effective()[1]

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = _first_input(args, kwargs)
        if x is not None:
            observing = self.training or self.__dict__.get("_star_adaptation") is not None
            if observing and not self._star_observes_linear_input:
                self._star_observe(x)
            if self.star_config.logits_fp32 and x.dtype != torch.float32 and self._star_logits_fp32_mode != "native":
                args, kwargs = _with_first_input(args, kwargs, x.float())
                if self._star_logits_fp32_mode == "outputs":
                    return _float32_to(super().forward(*args, **kwargs), x.dtype)
        return super().forward(*args, **kwargs)

    def _star_observe(self, x: torch.Tensor) -> None:
        """Feed this forward's router input to GHA: statistics in training, the update in eval (TTA)."""
        if torch.compiler.is_compiling():
            _observe_outside_graph(self, x)  # a graph break: in-place state updates stay eager
        else:
            self._star_observe_eager(x)  # no torch.compiler.disable wrapper: it costs µs per call

    def _star_observe_eager(self, x: torch.Tensor) -> None:
        # A forward re-run inside backward is gradient-checkpointing recomputation: counting it
        # again would double the tokens of this layer, and "forward" mode would update twice.
        if torch._C._current_graph_task_id() != -1:
            return
        if not self.training:  # test-time adaptation (star_hf.adaptation)
            self._star_adapt(x)
            return
        basis = self.star_basis
        with torch.no_grad(), _no_autocast(basis.device):
            stats = GHAStatistics.from_inputs(x, basis, self._star_token_weight(x))
            if self.star_config.update == "forward":
                all_reduce_statistics([stats])
                self._star_guarded_update(stats, self.star_config.gha_lr)
            elif self.__dict__.get("_star_stats") is None:
                self._star_stats = stats
                self._star_pending_forwards = 1
            else:
                self._star_stats.add_(stats)
                self._star_pending_forwards += 1
                if self._star_pending_forwards > self.__dict__.get("_star_pending_limit", 1):
                    # More forwards than one optimizer step has: maybe nothing calls gha_step.
                    self._star_pending_limit = pending_statistics_limit(self)

    def _star_adapt(self, x: torch.Tensor) -> None:
        """One guarded GHA update from the real tokens of this eval forward, before its logits.

        Runs once per router per decode step, so it is kept to a few kernels: mask-derived weights
        are shared by the forward's routers, and every operand is detached (no autograd context).
        """
        basis = self.star_basis
        weights = None
        if self.star_config.mask_padding:
            weights = current_token_weights(x.numel() // x.shape[-1], basis.device)
        with _no_autocast(basis.device):
            skipped = guarded_sanger_step_(basis, x, self._star_adaptation.lr, weights)
        # The skip flags are summed in batches: adding each to a counter would cost a kernel per forward.
        # Through __dict__: nn.Module.__setattr__ costs as much as a kernel launch here.
        flags = self.__dict__.setdefault("_star_skip_flags", [])
        flags.append(skipped)
        if len(flags) >= _SKIP_FLAGS_PER_SUM:
            self._star_sum_skip_flags()

    def _star_sum_skip_flags(self) -> None:
        flags = self.__dict__.pop("_star_skip_flags", None)
        if flags:
            missed = torch.stack(flags).sum()
            pending = self.__dict__.get("_star_skipped_pending")
            self.__dict__["_star_skipped_pending"] = missed if pending is None else pending + missed

    def _star_token_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.star_config.mask_padding:
            return None
        return current_token_weight(x.numel() // x.shape[-1])

    def _star_guarded_update(self, stats: GHAStatistics, lr: float) -> None:
        ok = guarded_update_(self.star_basis, stats, lr)
        # A forward whose tokens are all padding has nothing to learn from; only non-finite skips count.
        missed = ((~ok) & (stats.count > 0)).to(torch.int64)
        skipped = self.__dict__.get("_star_skipped_pending")
        self._star_skipped_pending = missed if skipped is None else skipped + missed

    # ------------------------------------------------------------------ statistics and updates
    @property
    def star_pending_statistics(self) -> GHAStatistics | None:
        """Statistics accumulated since the last update (``None`` if no training forward ran)."""
        return self.__dict__.get("_star_stats")

    def star_reset_statistics(self) -> None:
        self._star_stats = None

    def _star_apply_checked_update(self, stats: GHAStatistics, lr: float) -> None:
        """One in-place Sanger update from statistics the caller found finite and non-empty
        (:func:`star_hf.gha_step` checks them for all routers with one host sync)."""
        with torch.no_grad():
            self.star_basis.copy_(sanger_update(self.star_basis, stats, lr))

    def star_record_skipped_update(self) -> None:
        self._star_skipped_host = self.__dict__.get("_star_skipped_host", 0) + 1
        warn_nonfinite_once(self._star_name())

    @property
    def star_skipped_updates(self) -> int:
        """How many GHA updates were skipped because of non-finite inputs (host-synchronising)."""
        self._star_sum_skip_flags()
        pending = self.__dict__.get("_star_skipped_pending")
        total = self.__dict__.get("_star_skipped_host", 0) + (0 if pending is None else int(pending))
        if total and pending is not None and int(pending):
            warn_nonfinite_once(self._star_name())
        return total

    def _star_name(self) -> str:
        return self.__dict__.get("_star_path", type(self).__name__)

    # ------------------------------------------------------------------ torch.nn.Module plumbing
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        basis = self._buffers.pop("star_basis")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["star_basis"] = basis
        # The basis follows the module's device but always stays float32.
        moved = fn(basis)
        if moved.dtype != torch.float32:
            moved = basis.to(moved.device) if not basis.is_meta else moved.float()
        self._buffers["star_basis"] = moved
        stats = self.__dict__.get("_star_stats")
        if stats is not None and stats.yx.device != moved.device:
            self._star_stats = stats.to(moved.device)
        self.__dict__.pop("_star_cache", None)
        self._star_sum_skip_flags()
        pending = self.__dict__.pop("_star_skipped_pending", None)
        if pending is not None:  # keep the count across the move
            self._star_skipped_host = self.__dict__.get("_star_skipped_host", 0) + int(pending)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Also write the folded gate under the original names, so that a checkpoint of a patched
        # model loads in plain Transformers as the equivalent stock router (eval-mode outputs equal).
        # Sharding frameworks (ZeRO-3) may leave local parameters empty outside their gather scope.
        if self.star_linear_weight.dim() != 2 or self.star_mixing.dim() != 2:
            return
        with torch.no_grad():
            w_eff, b_eff = self._star_compute_effective()
        dtype = self.star_linear_weight.dtype
        destination[prefix + "weight"] = w_eff.to(dtype)
        if b_eff is not None:
            destination[prefix + "bias"] = b_eff.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[override]
        # The folded gate written by _save_to_state_dict is derived data, never loaded back.
        for name in ("weight", "bias"):
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        e, d = self.star_linear_weight.shape
        r = self.star_mixing.shape[1]
        cfg = self.star_config
        mode = "gha_only" if cfg.gha_only else "interpolated"
        return f"experts={e}, hidden={d}, components={r}, {mode}, gha_lr={cfg.gha_lr}, update={cfg.update}"


class StarLinearInput(nn.Linear):
    """Placed right after a router class that subclasses ``nn.Linear`` (PhiMoE, Llama4) in the MRO of
    its STAR class, so that the router's ``super().forward(x)`` passes through here: the router is
    observed on exactly the input its weight multiplies, after anything its own forward did to it."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training or self.__dict__.get("_star_adaptation") is not None:
            self._star_observe(input)
        return super().forward(input)


class StarGateHostMixin:
    """Mixed in front of a router that reads its gate child's weight directly
    (``F.linear(x, self.classifier.weight)``) instead of calling it: the gate's input is then
    captured here, at the router's own forward."""

    _star_base_class: type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        gate = getattr(self, self._star_gate_name)
        x = _first_input(args, kwargs)
        if x is not None and (gate.training or gate.__dict__.get("_star_adaptation") is not None):
            gate._star_observe(x)
        return super().forward(*args, **kwargs)
