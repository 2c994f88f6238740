"""Helpers for the save/load/adapter/calibration tests: tiny patched models that look trained."""

from __future__ import annotations

import torch

from star_hf import StarConfig, find_star_routers, patch_model

from .conftest import tiny_mixtral, tiny_qwen2_moe, tiny_switch

BUILDERS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "switch": tiny_switch}
# A device_map for the tiny causal LMs that offloads layer 1 (and so its router) to disk.
LAYER_1_ON_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def batch(seed: int = 1, size: tuple[int, int] = (2, 12), pad: int = 3) -> dict[str, torch.Tensor]:
    """input_ids with the first ``pad`` positions of row 0 masked out (left padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, size, generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of one eval forward (encoder-decoders get the input ids as decoder input too)."""
    extra = {"decoder_input_ids": inputs["input_ids"]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(**inputs, **extra).logits


def trained(name: str, config: StarConfig | None = None, seed: int = 0, **overrides):
    """A patched tiny model whose STAR tensors all moved away from their initial values."""
    model = patch_model(BUILDERS[name](**overrides), config or StarConfig())
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for router in find_star_routers(model).values():
            for t in (router.star_linear_weight, router.star_linear_bias, router.star_mixing, router.star_alpha):
                if t is not None:
                    t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
            b = router.star_basis + 0.2 * torch.randn(router.star_basis.shape, generator=g)
            router.star_basis.copy_(b / b.norm(dim=1, keepdim=True))
    return model


def star_state(model) -> dict[str, torch.Tensor]:
    """Every STAR tensor of ``model`` (path.name → tensor), for exact comparisons."""
    names = ("star_linear_weight", "star_linear_bias", "star_mixing", "star_alpha", "star_basis")
    return {
        f"{p}.{n}": getattr(r, n).detach().clone()
        for p, r in find_star_routers(model).items()
        for n in names
        if getattr(r, n) is not None
    }


def assert_same_star_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
