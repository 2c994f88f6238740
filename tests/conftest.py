"""Shared fixtures: tiny MoE models built from configs (no hub access)."""

from __future__ import annotations

import os

# Tests never reach the Hugging Face Hub: every model is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Two cores: one intra-op thread per test process keeps timings stable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("STAR_HF_TEST_THREADS", "1")))

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_mixtral(**overrides):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, **overrides})
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen2_moe(**overrides):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        **{
            **COMMON,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            **overrides,
        }
    )
    return Qwen2MoeForCausalLM(cfg).eval()


def tiny_switch(**overrides):
    from transformers import (
        SwitchTransformersConfig,
        SwitchTransformersForConditionalGeneration,
    )

    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(
        **{
            "vocab_size": 128,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "num_experts": 4,
            "expert_capacity": 16,
            "num_sparse_encoder_layers": 1,
            "num_sparse_decoder_layers": 1,
            "decoder_start_token_id": 0,
            **overrides,
        }
    )
    return SwitchTransformersForConditionalGeneration(cfg).eval()


@pytest.fixture
def mixtral():
    return tiny_mixtral()


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=g)
