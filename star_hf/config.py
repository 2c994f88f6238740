"""``StarConfig``: the hyperparameters of a STAR upgrade, serialisable to JSON.

Like PEFT's configs: a dataclass whose fields carry their help text (``field(metadata={"help": ...})``),
``Literal`` types for modes, validation that only validates (at construction and by the calls that use
a config), and forward-compatible loading — a saved config with a field this version does not know
loads with one warning and the field ignored, so an older install can read a newer config.
What a patch did (which routers it upgraded) lives on the model: :func:`star_hf.find_star_routers`.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from star_hf.paths import layer_index

__all__ = ["INIT_MODES", "UPDATE_MODES", "StarConfig"]

InitMode = Literal["preserve", "paper"]
UpdateMode = Literal["step", "forward"]
INIT_MODES: tuple[str, ...] = get_args(InitMode)
UPDATE_MODES: tuple[str, ...] = get_args(UpdateMode)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class StarConfig:
    """How routers are upgraded to STAR routers and how their basis learns (see each field's help)."""

    gha_lr: float = field(
        default=5e-5,
        metadata={"help": "GHA learning rate η for the basis (constant; the authors' best setting is 5e-5)."},
    )
    num_components: int | None = field(
        default=None,
        metadata={"help": "R, the number of tracked principal directions; None: the router's number of experts E."},
    )
    init: InitMode = field(
        default="preserve",
        metadata={
            "help": "'preserve': the patched model's outputs equal the original's at step 0; 'paper': W = W0 plus "
            "the randomly initialised structure-aware path."
        },
    )
    update: UpdateMode = field(
        default="step",
        metadata={
            "help": "'step': accumulate statistics over an optimizer step's forwards, one update in gha_step; "
            "'forward': update inside every training forward, before the logits, like the reference."
        },
    )
    gha_only: bool = field(default=False, metadata={"help": "Route with z = M B x alone; W, b and α stay frozen."})
    layers_to_transform: list[int] | None = field(
        default=None,
        metadata={"help": "Only patch routers in these layers (indices of the model's layer list); None: all."},
    )
    layers_pattern: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Name(s) of the layer list that layers_to_transform indexes (e.g. 'layers', 'block'); None: "
            "the outermost indexed module list on a router's path."
        },
    )
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={"help": "A regex (full match on the router's path) or a list of path suffixes; None: all."},
    )
    logits_fp32: bool = field(default=False, metadata={"help": "Router logits in float32 even in a bf16/fp16 model."})
    mask_padding: bool = field(
        default=True, metadata={"help": "Leave tokens whose attention mask is 0 out of the GHA statistics."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the random initial M and B (each router draws its own stream)."}
    )

    def __post_init__(self) -> None:
        if _is_int(self.layers_to_transform):
            self.layers_to_transform = [self.layers_to_transform]
        elif isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the accepted values; changes nothing."""
        errors = []
        lr = self.gha_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 <= lr < float("inf")):
            errors.append(f"gha_lr must be a finite number >= 0, got {lr!r}")
        r = self.num_components
        if r is not None and (not _is_int(r) or r < 1):
            errors.append(f"num_components must be a positive integer or None, got {r!r}")
        if self.init not in INIT_MODES:
            errors.append(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.update not in UPDATE_MODES:
            errors.append(f"update must be one of {UPDATE_MODES}, got {self.update!r}")
        for name in ("gha_only", "logits_fp32", "mask_padding"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        layers = self.layers_to_transform
        if layers is not None and (not isinstance(layers, list) or not all(_is_int(i) and i >= 0 for i in layers)):
            errors.append(f"layers_to_transform must be a list of layer indices >= 0 or None, got {layers!r}")
        pattern = self.layers_pattern
        if pattern is not None and not (
            (isinstance(pattern, str) and pattern)
            or (isinstance(pattern, list) and pattern and all(isinstance(p, str) and p for p in pattern))
        ):
            errors.append(f"layers_pattern must be a non-empty string, a list of them, or None, got {pattern!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                errors.append(f"target_modules is not a valid regex: {err}")
        elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            errors.append(f"target_modules must be a regex, a list of path suffixes, or None, got {targets!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            errors.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if errors:
            raise ValueError("Invalid StarConfig: " + "; ".join(errors) + ".")

    def selects(self, module_path: str) -> bool:
        """Whether the router at ``module_path`` is to be patched under this config."""
        if self.layers_to_transform is not None:
            if layer_index(module_path, self.layers_pattern) not in self.layers_to_transform:
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
        """A config from saved values; fields this version does not know are ignored with one warning."""
        if not isinstance(data, dict):
            raise ValueError(f"a StarConfig is a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"StarConfig: ignoring field(s) {unknown} unknown to this version of star_hf (saved by another "
                "version?); known fields: " + ", ".join(sorted(known)) + ".",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "StarConfig":
        return cls.from_dict(json.loads(text))
