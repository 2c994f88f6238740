"""Calibration warm start (STAR.md §4): start the bases at the principal subspace of real router inputs.

GHA converges to the top-R eigenvectors of the uncentred second moment C = E[x xᵀ] of a router's
inputs. :func:`calibrate` runs the model on a few batches (eval mode, no gradient), accumulates C for
every STAR router — padding excluded through the same attention-mask hooks the GHA statistics use —
and sets B to those eigenvectors directly, ordered by eigenvalue, instead of a random start. With
``preserve=True`` it then recomputes W (and b) with :func:`star_hf.gha.init.preserving_linear`, so the
router logits, and hence the model's outputs, are unchanged.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from star_hf.errors import NotPatchedError
from star_hf.gha.distributed import is_distributed
from star_hf.gha.effective import effective_gate
from star_hf.gha.init import preserving_linear
from star_hf.patching.patcher import find_star_routers
from star_hf.router.star_router import StarGateHostMixin, StarRouterMixin, _first_input

__all__ = ["calibrate", "principal_basis"]


class _SecondMoment:
    """Σ w x xᵀ and Σ w over one router's inputs, on the router's device (float32, no host syncs)."""

    def __init__(self, router: StarRouterMixin) -> None:
        dim = router.star_basis.shape[1]
        device = router.star_basis.device
        self.router = router
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.float32, device=device)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _first_input(args, kwargs)
        if x is None:
            return
        weight = self.router._star_token_weight(x)
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        if weight is None:
            self.sum.addmm_(x.t(), x)
            self.count += x.shape[0]
        else:
            w = weight.detach().reshape(-1).to(x.device, torch.float32)
            self.sum.addmm_((x * w[:, None]).t(), x)
            self.count += w.sum()


def principal_basis(second_moment: torch.Tensor, num_components: int) -> torch.Tensor:
    """The top-``num_components`` eigenvectors of a symmetric D×D matrix as rows (R×D, float64),
    by eigenvalue descending, each signed so that its largest-magnitude entry is positive."""
    _, vectors = torch.linalg.eigh(second_moment.detach().to("cpu", torch.float64))
    basis = vectors[:, -num_components:].flip(-1).t().contiguous()
    peak = basis.gather(1, basis.abs().argmax(dim=1, keepdim=True))
    return basis * torch.where(peak < 0, -1.0, 1.0).to(basis.dtype)


def _input_host(model: nn.Module, path: str, router: StarRouterMixin) -> nn.Module:
    """The module whose forward receives the gate's input: the gate, or the router reading its weight."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, StarGateHostMixin) and parent._star_gate_name == name:
        return parent
    return router


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _model_inputs(model: nn.Module, batch: Any, accepted: set[str]) -> dict[str, Any]:
    """Keyword arguments for one forward from a batch (an ``input_ids`` tensor or a dict of inputs)."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"calibration batches must be input_ids tensors or dicts of model inputs, got {type(batch).__name__}."
        )
    device = _input_device(model)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    config = getattr(model, "config", None)
    needs_decoder = getattr(config, "is_encoder_decoder", False) and not {"decoder_input_ids", "labels"} & set(inputs)
    if needs_decoder:
        # Encoder-decoders: the decoder routers see the same text, shifted right as in training.
        if "input_ids" not in inputs or not hasattr(model, "prepare_decoder_input_ids_from_labels"):
            raise ValueError("calibration batches of an encoder-decoder need 'decoder_input_ids' (or 'labels').")
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=inputs["input_ids"])
        mask = inputs.get("attention_mask")
        if mask is not None and "decoder_attention_mask" not in inputs:
            inputs["decoder_attention_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
    if "logits_to_keep" in accepted and "logits_to_keep" not in inputs and "labels" not in inputs:
        # Only router inputs matter: skip the N×V logits (not with labels, whose loss needs them all).
        inputs["logits_to_keep"] = 1
    return inputs


def _check(routers: dict[str, StarRouterMixin], preserve: bool) -> None:
    if not routers:
        raise NotPatchedError("the model has no STAR routers to calibrate; call star_hf.patch_model(model, ...) first.")
    adapting = [p for p, r in routers.items() if r.__dict__.get("_star_adaptation") is not None]
    if adapting:
        raise RuntimeError(f"test-time adaptation is enabled on {adapting}; disable it before calibrating.")
    gha_only = [p for p, r in routers.items() if r.star_config.gha_only]
    if preserve and gha_only:
        raise ValueError(
            f"routers {gha_only} are GHA-only (z = M B x): a new basis cannot keep their logits, so preserve=True is "
            "impossible. Pass preserve=False to set the basis and accept changed outputs."
        )


def _set_basis(router: StarRouterMixin, basis: torch.Tensor, preserve: bool) -> None:
    with torch.no_grad():
        if preserve:
            w, m, alpha = router.star_linear_weight, router.star_mixing, router.star_alpha
            b = router.star_linear_bias
            w_eff, b_eff = effective_gate(w, b, m, alpha, router.star_basis, gha_only=False, dtype=torch.float64)
            new_w, new_b = preserving_linear(w_eff, b_eff, m, alpha, basis)
            w.copy_(new_w)
            if b is not None:
                b.copy_(new_b)
        router.star_basis.copy_(basis)
    router.star_reset_statistics()  # pending statistics were taken against the old basis


def calibrate(
    model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None, preserve: bool = True
) -> nn.Module:
    """Set every STAR router's basis to the principal subspace of its inputs on ``batches``.

    Args:
        model: a patched model.
        batches: an iterable of ``input_ids`` tensors or dicts of model inputs (``attention_mask``
            excludes padding). Encoder-decoders without ``decoder_input_ids`` feed the decoder the
            same ids shifted right.
        max_batches: stop after this many batches.
        preserve: recompute W and b so that the outputs stay unchanged (float32 round-off).

    Returns:
        ``model``, calibrated in place (its train/eval mode is restored). Memory: one D×D float32
        matrix per router on its device while the batches run. Under ``torch.distributed`` the
        moments are summed over ranks, so every rank sets the same bases.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}.")
    routers = find_star_routers(model)
    _check(routers, preserve)
    moments = {path: _SecondMoment(router) for path, router in routers.items()}
    handles = [
        _input_host(model, path, router).register_forward_pre_hook(moments[path].pre_hook, with_kwargs=True)
        for path, router in routers.items()
    ]
    accepted = set(inspect.signature(model.forward).parameters)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in itertools.islice(batches, max_batches):
                model(**_model_inputs(model, batch, accepted))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if is_distributed():
        for moment in moments.values():
            dist.all_reduce(moment.sum)
            dist.all_reduce(moment.count)
    counts = torch.stack([m.count.to("cpu") for m in moments.values()]).tolist()
    empty = [p for p, c in zip(moments, counts) if c <= 0]
    if empty:
        raise ValueError(f"routers {empty} saw no (unmasked) tokens during calibration; pass non-empty batches.")
    for (path, moment), count in zip(moments.items(), counts):
        router = moment.router
        basis = principal_basis(moment.sum / count, router.star_basis.shape[0])
        _set_basis(router, basis, preserve)
    return model
