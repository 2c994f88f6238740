"""Test-time subspace adaptation (STAR.md §5): the routing basis keeps tracking the inputs at inference.

While adaptation is enabled, every eval-mode forward of a selected STAR router — a plain call,
each step of ``model.generate`` with a KV cache, a ``pipeline`` — applies the spec's GHA (Sanger)
update to the router inputs it sees, before computing its logits. Padding positions are left out
through the attention mask (see :mod:`star_hf.router.masking`); non-finite statistics skip the update on
device and are counted in ``router.star_skipped_updates``. No gradient is taken and no parameter or
other buffer changes: only ``star_basis`` moves.

The router does the work (``StarRouterMixin._star_observe``); this module only switches it on and
off, per router, and keeps the bases to go back to.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from star_hf.errors import AdaptationActiveError, NotPatchedError
from star_hf.patching.patcher import find_star_routers
from star_hf.paths import layer_index
from star_hf.router.star_router import StarRouterMixin

__all__ = [
    "TestTimeAdaptation",
    "enable_test_time_adaptation",
    "test_time_adaptation",
]

MODES = ("episodic", "continual")


@dataclass(frozen=True)
class RouterAdaptation:
    """What a router reads in ``router._star_adaptation``: its test-time GHA learning rate."""

    lr: float

    def __deepcopy__(self, memo: dict) -> None:
        # A deep copy of an adapting model is out of reach of the handle (it could never be
        # disabled or reset), so the copy does not adapt.
        return None


def _check_lr(lr: float | None) -> None:
    if lr is None:
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"test-time adaptation lr must be a finite number >= 0 or None (each router's gha_lr), got {lr!r}.")


def _select(routers: "OrderedDict[str, StarRouterMixin]", layers: Sequence[int | str] | None) -> "OrderedDict[str, StarRouterMixin]":
    """The routers named by ``layers``: layer indices (of the model's layer list) or router paths (or suffixes)."""
    if layers is None:
        return routers
    if isinstance(layers, (int, str)):
        layers = [layers]
    chosen: set[str] = set()
    for entry in layers:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise ValueError(f"layers must hold layer indices (int) or router paths (str), got {entry!r}.")
        if isinstance(entry, int):
            hits = {p for p in routers if layer_index(p) == entry}
        else:
            hits = {p for p in routers if p == entry or p.endswith("." + entry)}
        if not hits:
            raise ValueError(f"layers entry {entry!r} matches no STAR router; the model's routers are {list(routers)}.")
        chosen |= hits
    return OrderedDict((p, r) for p, r in routers.items() if p in chosen)


class TestTimeAdaptation:
    """Handle on an enabled test-time adaptation; see :func:`enable_test_time_adaptation`.

    ``reset()`` puts the bases back to their values at enable time (adaptation continues);
    ``disable()`` stops adaptation — restoring those bases first in ``"episodic"`` mode, keeping the
    adapted ones in ``"continual"`` mode. Also a context manager that disables on exit, exceptions
    included.

    Thread safety: ``reset()`` and ``disable()`` are serialised by a lock and ``disable()`` is
    idempotent, so they may be called from any thread. Forwards are not: each forward's attention
    mask is thread-local, but the bases are shared state of the model, so concurrent forwards of
    one model interleave their read-update-write steps in an undefined order (results then depend
    on timing), and a ``reset()`` during a forward lands between two of its layers. Serialise the
    forwards of an adapting model (one request or one batch at a time), and call ``reset()`` /
    ``disable()`` between forwards.
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, routers: "OrderedDict[str, StarRouterMixin]", lrs: dict[str, float], mode: str) -> None:
        self.mode = mode
        self._routers = routers
        self._lrs = lrs
        self._initial = {p: r.star_basis.detach().clone() for p, r in routers.items()}
        self._lock = threading.Lock()
        self._active = False

    def _enable(self) -> None:
        for path, router in self._routers.items():
            router._star_adaptation = RouterAdaptation(self._lrs[path])
        self._active = True

    @property
    def active(self) -> bool:
        """Whether forwards currently adapt the bases."""
        return self._active

    @property
    def paths(self) -> list[str]:
        """Module paths of the adapting routers."""
        return list(self._routers)

    @property
    def learning_rates(self) -> dict[str, float]:
        """Router path → the test-time GHA learning rate it uses."""
        return dict(self._lrs)

    def _restore(self) -> None:
        with torch.no_grad():
            for path, router in self._routers.items():
                router.star_basis.copy_(self._initial[path])

    def reset(self) -> None:
        """Put every adapted basis back to its value at enable time; adaptation stays on."""
        with self._lock:
            if not self._active:
                raise RuntimeError("this test-time adaptation handle is disabled; enable a new one to adapt again.")
            self._restore()

    def disable(self) -> None:
        """Stop adapting (episodic mode: restore the bases at enable time first). Idempotent."""
        with self._lock:
            if not self._active:
                return
            try:
                if self.mode == "episodic":
                    self._restore()
            finally:
                for router in self._routers.values():
                    router.__dict__.pop("_star_adaptation", None)
                self._active = False

    def __enter__(self) -> "TestTimeAdaptation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def __repr__(self) -> str:
        state = "active" if self._active else "disabled"
        return f"TestTimeAdaptation({self.mode}, {state}, routers={len(self._routers)})"


def enable_test_time_adaptation(
    model: nn.Module,
    lr: float | None = None,
    mode: str = "episodic",
    layers: Sequence[int | str] | None = None,
) -> TestTimeAdaptation:
    """Make every eval-mode forward of ``model`` apply the GHA update to its router inputs.

    The server form of :func:`test_time_adaptation`: adaptation stays on until ``handle.disable()``.

    Args:
        model: a model patched by :func:`star_hf.patch_model` (or a PEFT/DDP wrapper of one), in eval
            mode. Adaptation acts on eval-mode forwards only; a model in training mode is refused,
            because its forwards already feed the training-time GHA statistics. Switching a router to
            training mode while adaptation is on makes its forwards training forwards again.
        lr: test-time GHA learning rate; ``None`` uses each router's ``star_config.gha_lr``. Each
            forward applies one update of this size from that forward's real tokens, so a prompt
            (one forward) and each generated token (one forward each) count alike.
        mode: ``"episodic"`` — ``disable()`` (the end of the block) restores the bases at enable time;
            ``"continual"`` — the adapted bases are kept.
        layers: restrict adaptation to these routers: layer indices (matched against the numbers in
            the router paths) or router paths as listed by :func:`star_hf.find_star_routers`.

    Returns:
        A :class:`TestTimeAdaptation` handle.
    """
    if mode not in MODES:
        raise ValueError(f"test-time adaptation mode must be one of {MODES}, got {mode!r}.")
    _check_lr(lr)
    every = find_star_routers(model)
    if not every:
        raise NotPatchedError(
            f"{type(model).__name__} has no STAR routers: test-time adaptation updates STAR routing bases. "
            "Patch the model first with star_hf.patch_model(model, star_hf.StarConfig(...))."
        )
    busy = [p for p, r in every.items() if r.__dict__.get("_star_adaptation") is not None]
    if busy:
        raise AdaptationActiveError(
            f"test-time adaptation is already enabled on {busy[0]} (and {len(busy) - 1} other routers); it does "
            "not nest. Leave the enclosing block or call disable() on the existing handle first."
        )
    routers = _select(every, layers)
    training = [p for p, r in routers.items() if r.training]
    if training:
        raise ValueError(
            f"router {training[0]} is in training mode; test-time adaptation acts on eval-mode forwards "
            "(training forwards feed gha_step instead). Call model.eval() before enabling it."
        )
    lrs = {p: float(r.star_config.gha_lr if lr is None else lr) for p, r in routers.items()}
    handle = TestTimeAdaptation(routers, lrs, mode)
    handle._enable()
    return handle


@contextmanager
def test_time_adaptation(
    model: nn.Module,
    lr: float | None = None,
    mode: str = "episodic",
    layers: Sequence[int | str] | None = None,
) -> Iterator[TestTimeAdaptation]:
    """``with star_hf.test_time_adaptation(model): ...`` — adapt the routing bases inside the block.

    Same arguments as :func:`enable_test_time_adaptation`. Episodic mode restores the bases when the
    block exits (normally or by an exception): one block is one episode, whatever number of forwards,
    generate calls or batches ran inside it. For one episode per request in a server, keep a handle
    and call ``handle.reset()`` after each request. Note that a batch is one episode: the rows of a
    batch share (and influence) each other's update.
    """
    handle = enable_test_time_adaptation(model, lr=lr, mode=mode, layers=layers)
    try:
        yield handle
    finally:
        handle.disable()


test_time_adaptation.__test__ = False  # type: ignore[attr-defined]  # a library function, not a pytest test
