"""Home of the STAR classes generated at run time.

A STAR router is an instance of ``StarRouter__<module>__<class>``, a subclass of the architecture's
own router (or gate ``nn.Linear``) class, so Transformers' ``isinstance``-based output recording keeps
working. The classes are created on first use and registered here under a name that encodes the base
class, so that pickle (``torch.save(model)``) finds them by name in a fresh process.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch.nn as nn

# ``StarConfig(logits_fp32=True)`` in a bf16/fp16 model runs a router's forward on a float32 copy of
# its input, so its score function and top-k see float32 logits; most MoE blocks then take the float32
# routing weights that come out. These routers need something else (router class name -> mode):
LOGITS_FP32_MODES: dict[str, str] = {
    # Its scores scale the hidden states fed to bf16 experts: outputs go back to the input dtype.
    "Llama4Router": "outputs",
    # It upcasts to float32 itself and casts its weights to the input dtype: the input stays as is.
    "InklingTopkRouter": "native",
}

# class-name prefix -> name of the mixin in star_hf.router.star_router placed in front of the base class
_MIXINS = {"StarRouter__": "StarRouterMixin", "StarGateHost__": "StarGateHostMixin"}
_cache: dict[tuple[str, type], type] = {}


def _escape(text: str) -> str:
    return text.replace("_", "_u").replace(".", "_d")


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "_":
            out.append({"u": "_", "d": "."}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _multiplies_through_linear_forward(base: type) -> bool:
    """An ``nn.Linear`` subclass whose own forward reaches ``nn.Linear.forward`` via ``super().forward``."""
    if not issubclass(base, nn.Linear) or base.forward is nn.Linear.forward:
        return False
    try:
        return "super().forward(" in inspect.getsource(base.forward)
    except (OSError, TypeError):
        return False


def _generate(prefix: str, base: type) -> type:
    cls = _cache.get((prefix, base))
    if cls is None:
        from star_hf.router import star_router as router

        router.count_optimizer_steps()
        name = f"{prefix}{_escape(base.__module__)}__{_escape(base.__qualname__)}"
        mixin = getattr(router, _MIXINS[prefix])
        namespace = {"__module__": __name__, "__qualname__": name, "_star_base_class": base}
        bases: tuple[type, ...] = (mixin, base)
        if prefix == "StarRouter__":
            namespace["_star_logits_fp32_mode"] = LOGITS_FP32_MODES.get(base.__name__, "input")
            if _multiplies_through_linear_forward(base):
                bases += (router.StarLinearInput,)
                namespace["_star_observes_linear_input"] = True
        cls = type(name, bases, namespace)
        _cache[(prefix, base)] = cls
        globals()[name] = cls
    return cls


def star_class_for(base: type) -> type:
    """The STAR router subclass of ``base``."""
    return _generate("StarRouter__", base)


def gate_host_class_for(base: type) -> type:
    """The subclass of router class ``base`` that captures its gate child's input."""
    return _generate("StarGateHost__", base)


def __getattr__(name: str) -> Any:
    prefix = next((p for p in _MIXINS if name.startswith(p)), None)
    if prefix is None:
        raise AttributeError(name)
    module_part, _, qual_part = name[len(prefix) :].partition("__")
    obj: Any = importlib.import_module(_unescape(module_part))
    for attr in _unescape(qual_part).split("."):
        obj = getattr(obj, attr)
    return _generate(prefix, obj)
