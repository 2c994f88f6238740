"""The architectures star_hf is verified on.

The patcher itself is generic (see :mod:`star_hf.discovery`); this table records which router
classes have a test in ``tests/test_architectures.py`` with a tiny model built from their config
(preserve-exactness, gradients reaching the STAR parameters, aux loss / router logits intact).
Patching a router class that is not listed needs ``patch_model(..., allow_unverified=True)``.
"""

from __future__ import annotations

__all__ = ["VERIFIED_ROUTERS", "supported_architectures"]

# router class name -> Transformers model_type
VERIFIED_ROUTERS: dict[str, str] = {
    "MixtralTopKRouter": "mixtral",
    "Qwen2MoeTopKRouter": "qwen2_moe",
    "Qwen3MoeTopKRouter": "qwen3_moe",
    "SwitchTransformersTop1Router": "switch_transformers",
}


def supported_architectures() -> list[str]:
    """The Transformers ``model_type`` values whose MoE routers star_hf is verified on."""
    return sorted(set(VERIFIED_ROUTERS.values()))
