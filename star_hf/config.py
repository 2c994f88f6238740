"""``StarConfig``: the hyperparameters of a STAR upgrade, serialisable to JSON."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["StarConfig"]

INIT_MODES = ("preserve", "paper")
UPDATE_MODES = ("step", "forward")


@dataclass
class StarConfig:
    """How routers are upgraded to STAR routers and how their basis learns.

    Args:
        gha_lr: GHA learning rate η for the basis (constant; the authors' best setting is 5e-5).
        num_components: R, the number of tracked principal directions. ``None`` uses the router's
            number of experts E, as in the reference.
        init: ``"preserve"`` keeps the patched model's outputs equal to the original's at step 0;
            ``"paper"`` keeps W = W0 and adds the randomly initialised structure-aware path.
        update: ``"step"`` accumulates statistics over the forwards of an optimizer step and applies
            one update in :func:`star_hf.gha_step`; ``"forward"`` updates the basis inside every
            training forward, before the logits, like the reference implementation.
        gha_only: route with ``z = M B x`` alone; W, b and α are kept frozen.
        layers_to_transform: only patch routers whose module path contains one of these layer
            indices (``None``: all layers).
        target_modules: a regex (full match on the router's module path) or a list of path suffixes;
            only matching routers are patched (``None``: all routers).
        logits_fp32: compute router logits in float32 even in a bf16/fp16 model.
        mask_padding: leave tokens whose attention mask is 0 out of the GHA statistics.
        seed: seed for the random initialisation of M and B (each router gets its own stream).
    """

    gha_lr: float = 5e-5
    num_components: int | None = None
    init: str = "preserve"
    update: str = "step"
    gha_only: bool = False
    layers_to_transform: list[int] | None = None
    target_modules: str | list[str] | None = None
    logits_fp32: bool = False
    mask_padding: bool = True
    seed: int = 0
    # Filled in by the patcher; informative when the config travels with a checkpoint.
    patched_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with an actionable message for an invalid value."""
        if not isinstance(self.gha_lr, (int, float)) or isinstance(self.gha_lr, bool) or self.gha_lr < 0:
            raise ValueError(f"StarConfig.gha_lr must be a number >= 0, got {self.gha_lr!r}.")
        if self.num_components is not None and (
            not isinstance(self.num_components, int) or isinstance(self.num_components, bool) or self.num_components < 1
        ):
            raise ValueError(f"StarConfig.num_components must be a positive integer or None, got {self.num_components!r}.")
        if self.init not in INIT_MODES:
            raise ValueError(f"StarConfig.init must be one of {INIT_MODES}, got {self.init!r}.")
        if self.update not in UPDATE_MODES:
            raise ValueError(f"StarConfig.update must be one of {UPDATE_MODES}, got {self.update!r}.")
        if self.layers_to_transform is not None:
            if isinstance(self.layers_to_transform, int):
                self.layers_to_transform = [self.layers_to_transform]
            if not all(isinstance(i, int) and i >= 0 for i in self.layers_to_transform):
                raise ValueError(
                    f"StarConfig.layers_to_transform must be a list of layer indices >= 0, got {self.layers_to_transform!r}."
                )
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"StarConfig.target_modules is not a valid regex: {err}") from None

    def selects(self, module_path: str) -> bool:
        """Whether the router at ``module_path`` is to be patched under this config."""
        if self.layers_to_transform is not None:
            indices = {int(tok) for tok in module_path.split(".") if tok.isdigit()}
            if not indices & set(self.layers_to_transform):
                return False
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_path) is not None
        return any(module_path == t or module_path.endswith("." + t) for t in self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StarConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown StarConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "StarConfig":
        return cls.from_dict(json.loads(text))
