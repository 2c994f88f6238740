"""star_hf: STAR routing (Park & Park, ICML 2026) for Hugging Face Transformers MoE models."""

from .architectures import supported_architectures
from .config import StarConfig
from .gha import GHAStatistics
from .patcher import AlreadyPatchedError, NoRouterError, UnsupportedRouterError, find_star_routers, fold, patch_model
from .router import StarRouterMixin, is_star_router
from .step import gha_step

__version__ = "0.1.0"

__all__ = [
    "AlreadyPatchedError",
    "GHAStatistics",
    "NoRouterError",
    "StarConfig",
    "StarRouterMixin",
    "UnsupportedRouterError",
    "find_star_routers",
    "fold",
    "gha_step",
    "is_star_router",
    "patch_model",
    "supported_architectures",
]
