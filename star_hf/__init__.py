"""star_hf: STAR routing (Park & Park, ICML 2026) for Hugging Face Transformers MoE models."""

from .adapter import AdapterMismatchError, load_adapter, save_adapter
from .adaptation import TestTimeAdaptation, enable_test_time_adaptation, test_time_adaptation
from .architectures import supported_architectures
from .calibration import calibrate
from .callback import StarCallback
from .config import StarConfig
from .gha import GHAStatistics
from .hub import HubUploadError, push_to_hub, stage_for_hub
from .io import CorruptFileError
# PEFT keeps STAR routers out of LoRA and saves them with adapters; the integration installs itself.
from .integrations import peft as _peft_integration  # noqa: F401
from .loading import from_pretrained, save_pretrained
from .metrics import RoutingMonitor, routing_report
from .patcher import AlreadyPatchedError, BrokenUpstreamError, NoRouterError, UnsupportedRouterError, find_star_routers, fold, patch_model
from .router import StarRouterMixin, is_star_router
from .step import gha_step

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "AlreadyPatchedError",
    "BrokenUpstreamError",
    "CorruptFileError",
    "GHAStatistics",
    "HubUploadError",
    "NoRouterError",
    "RoutingMonitor",
    "StarCallback",
    "StarConfig",
    "StarRouterMixin",
    "TestTimeAdaptation",
    "UnsupportedRouterError",
    "calibrate",
    "enable_test_time_adaptation",
    "find_star_routers",
    "fold",
    "from_pretrained",
    "gha_step",
    "is_star_router",
    "load_adapter",
    "patch_model",
    "push_to_hub",
    "routing_report",
    "save_adapter",
    "save_pretrained",
    "stage_for_hub",
    "supported_architectures",
    "test_time_adaptation",
]
