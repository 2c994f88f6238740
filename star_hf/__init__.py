"""star_hf: STAR routing (Park & Park, ICML 2026) for Hugging Face Transformers MoE models.

The public names below are imported on first use (PEP 562), so ``import star_hf`` is cheap and
changes nothing: no other library is patched and no hook is registered until a call asks for it
(``patch_model``, ``from_pretrained``, ``load_adapter``, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from star_hf._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "StarConfig": "star_hf.config",
    "StarError": "star_hf.errors",
    "NoRouterError": "star_hf.errors",
    "NotPatchedError": "star_hf.errors",
    "UnsupportedRouterError": "star_hf.errors",
    "BrokenUpstreamError": "star_hf.errors",
    "AlreadyPatchedError": "star_hf.errors",
    "AdapterMismatchError": "star_hf.errors",
    "CorruptFileError": "star_hf.errors",
    "HubUploadError": "star_hf.errors",
    "AdaptationActiveError": "star_hf.errors",
    "GHAStatistics": "star_hf.gha.sanger",
    "StarRouterMixin": "star_hf.router.star_router",
    "is_star_router": "star_hf.router.star_router",
    "supported_architectures": "star_hf.patching.architectures",
    "patch_model": "star_hf.patching.patcher",
    "find_star_routers": "star_hf.patching.patcher",
    "fold": "star_hf.patching.patcher",
    "gha_step": "star_hf.training.step",
    "StarCallback": "star_hf.training.callback",
    "calibrate": "star_hf.training.calibration",
    "RoutingMonitor": "star_hf.training.metrics",
    "routing_report": "star_hf.training.metrics",
    "TestTimeAdaptation": "star_hf.adaptation",
    "enable_test_time_adaptation": "star_hf.adaptation",
    "test_time_adaptation": "star_hf.adaptation",
    "save_adapter": "star_hf.persistence.adapter",
    "load_adapter": "star_hf.persistence.adapter",
    "save_pretrained": "star_hf.persistence.loading",
    "from_pretrained": "star_hf.persistence.loading",
    "push_to_hub": "star_hf.hub.upload",
    "stage_for_hub": "star_hf.hub.upload",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    try:  # a subpackage or module, e.g. star_hf.adaptation, star_hf.experiments
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from star_hf.adaptation import (
        TestTimeAdaptation,
        enable_test_time_adaptation,
        test_time_adaptation,
    )
    from star_hf.config import StarConfig
    from star_hf.errors import (
        AdaptationActiveError,
        AdapterMismatchError,
        AlreadyPatchedError,
        BrokenUpstreamError,
        CorruptFileError,
        HubUploadError,
        NoRouterError,
        NotPatchedError,
        StarError,
        UnsupportedRouterError,
    )
    from star_hf.gha.sanger import GHAStatistics
    from star_hf.hub.upload import push_to_hub, stage_for_hub
    from star_hf.patching.architectures import supported_architectures
    from star_hf.patching.patcher import find_star_routers, fold, patch_model
    from star_hf.persistence.adapter import load_adapter, save_adapter
    from star_hf.persistence.loading import from_pretrained, save_pretrained
    from star_hf.router.star_router import StarRouterMixin, is_star_router
    from star_hf.training.calibration import calibrate
    from star_hf.training.callback import StarCallback
    from star_hf.training.metrics import RoutingMonitor, routing_report
    from star_hf.training.step import gha_step
