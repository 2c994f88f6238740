"""Every verified architecture, one tiny model each (no hub), through the one generic patcher.

For each case the tiny model is built once per module and deep-copied per test. The tests check that
- patching changes nothing but the gates: outputs, recorded router logits and aux / z losses are
  unchanged (float32, max |Δ| ≤ 1e-5) and every other state-dict entry (score-correction biases,
  experts, norms) is bit-identical;
- a backward pass reaches W, b, M and α of every STAR router, and a training forward collects GHA
  statistics in every STAR router;
- each STAR router observes exactly the input its gate multiplies: in a training forward (input
  jitter on where the architecture has it), F.linear(observed x, W_eff, b_eff) reproduces the router
  logits Transformers records;
- patching after Transformers installed its output-recording hooks keeps router logits and losses;
- ``star_hf.patching.architectures.VERIFIED_ROUTERS`` lists exactly the router classes that have a case here,
  and the README's table lists exactly those.
Then the routers STAR refuses before any change (MLP router, product keys, hash routing); precision
(gates an architecture keeps in float32 stay float32 STAR parameters in a bf16 model; ``logits_fp32``
in bf16); score-correction biases through DeepSeek-V4's checkpoint rename.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from star_hf import (
    BrokenUpstreamError,
    StarConfig,
    UnsupportedRouterError,
    find_star_routers,
    patch_model,
)
from star_hf.patching.architectures import VERIFIED_ROUTERS, upstream_failure
from star_hf.patching.discovery import scan_routers

from .conftest import COMMON, tiny_mixtral, tiny_qwen2_moe, tiny_switch

Recorded = Callable[[list[tuple[nn.Module, torch.Tensor]], dict], list[torch.Tensor]]


@dataclass(frozen=True)
class Case:
    """One architecture: how to build its tiny model and what it reports.

    Attributes:
        build: returns the tiny model in eval mode (seeded).
        router_classes: the architecture's router classes that become STAR routers.
        num_routers: how many STAR routers the tiny model has (all of its linear gates).
        lm: the model has a language-modelling head (``logits`` and ``loss``); otherwise it is a
            ``*TextModel`` returning ``last_hidden_state``.
        logit_fields: output fields holding the recorded router logits.
        loss_fields: output fields holding aux / z losses; ``NO_AUX`` (empty) for architectures that
            compute none, which the tests then check they indeed do not report.
        recorded: maps the gate logits of each router call in a forward, ``[(router, z), ...]``, and
            the forward's inputs to what Transformers records (``None``: the logits themselves).
        inputs: the model inputs, given random ``input_ids`` (``None``: just those ids).
        star_config: ``StarConfig`` arguments (for architectures where some layers must be left out).
    """

    build: Callable[[], nn.Module]
    router_classes: tuple[str, ...]
    num_routers: int
    lm: bool = True
    logit_fields: tuple[str, ...] = ("router_logits",)
    loss_fields: tuple[str, ...] = ("aux_loss",)
    recorded: Recorded | None = None
    inputs: Callable[[torch.Tensor], dict] | None = None
    star_config: dict = field(default_factory=dict)
    model_type: str | None = None


def _lm(config: str, model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A builder of a tiny Transformers model from a config (no hub), seeded, in eval mode."""

    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, model)(getattr(transformers, config)(**kwargs)).eval()

    build.__qualname__ = model
    return build


def _initialised(build: Callable[[], nn.Module], parts: tuple[str, ...]) -> Callable[[], nn.Module]:
    """``build`` with the parameters whose names contain one of ``parts`` drawn from N(0, 0.02²), for
    models whose ``_init_weights`` leaves them uninitialised or at zero."""

    def build_initialised() -> nn.Module:
        model = build()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if any(part in name for part in parts):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        return model

    return build_initialised


# Tiny shapes: hidden 32, 2 layers, 4 experts (top-2) wherever the config allows.
C = {**COMMON, "pad_token_id": 0}
MOE = {"num_experts_per_tok": 2}
DEEPSEEK = {
    **C,
    **MOE,
    "num_key_value_heads": 4,
    "moe_intermediate_size": 16,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
}
LLAMA4_MOE = {
    "head_dim": 8,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "intermediate_size_mlp": 64,
    "interleave_moe_layer_step": 1,
    "attention_chunk_size": 16,
}
HYBRID = ["linear_attention", "full_attention"]
LINEAR_ATTENTION = {
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
}
VISION_START, IMAGE, VISION_END = 120, 121, 122  # multimodal special tokens of the tiny configs
QWEN_VISION = {
    "depth": 1,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": COMMON["hidden_size"],
    "num_position_embeddings": 16,
    "deepstack_visual_indexes": [0],
}
MROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]}  # head_dim 8
NO_AUX = ()  # the architecture computes no aux loss from its router logits (checked: it reports none)
BASE_MODEL = {"lm": False, "loss_fields": NO_AUX}  # a *TextModel: hidden states out, no loss


def _probabilities(calls: list[tuple[nn.Module, torch.Tensor]], inputs: dict) -> list[torch.Tensor]:
    # Gemma4-style routers record the softmax probabilities of their logits.
    return [torch.softmax(z.float(), dim=-1) for _, z in calls]


def _routed_columns(calls: list[tuple[nn.Module, torch.Tensor]], inputs: dict) -> list[torch.Tensor]:
    # Inkling's gate also scores the shared experts (its last rows); it records the routed columns.
    return [z[..., : router.num_experts] for router, z in calls]


def _scaled_logits(calls: list[tuple[nn.Module, torch.Tensor]], inputs: dict) -> list[torch.Tensor]:
    # MuSpark records its logits times a constant output multiplier.
    return [z * router.output_multiplier for router, z in calls]


def _vision_tokens(input_ids: torch.Tensor) -> dict:
    # Ernie-4.5-VL sends each token to its modality's MoE block; the last 4 of each row are "vision".
    types = torch.zeros_like(input_ids)
    types[:, -4:] = 1
    return {"input_ids": input_ids, "moe_mm_token_type_ids": types}


def _image(input_ids: torch.Tensor) -> dict:
    # One 8×8 image per row (2×2 patches of 4 pixels, merged into one token) between vision markers.
    ids = input_ids.clone()
    ids[:, 2:5] = torch.tensor([VISION_START, IMAGE, VISION_END])
    return {
        "input_ids": ids,
        "mm_token_type_ids": (ids == IMAGE).long(),
        "pixel_values": torch.randn(8, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(2)),
        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]]),
    }


def _embeddings(input_ids: torch.Tensor) -> dict:
    # Qwen3-Omni's talker is driven by embeddings from the thinker, not by token ids.
    return {
        "inputs_embeds": torch.randn(
            *input_ids.shape, COMMON["hidden_size"], generator=torch.Generator().manual_seed(2)
        )
    }


def _modality_scatter(calls: list[tuple[nn.Module, torch.Tensor]], inputs: dict) -> list[torch.Tensor]:
    # Ernie-4.5-VL records one tensor per layer: text-gate logits at text tokens, vision-gate logits
    # at vision tokens (each layer calls its text gate, then its vision gate).
    vision = inputs["moe_mm_token_type_ids"].reshape(-1).bool()
    out = []
    for (_, z_text), (_, z_vision) in zip(calls[0::2], calls[1::2]):
        merged = z_text.new_zeros(vision.numel(), z_text.shape[-1])
        merged[~vision], merged[vision] = z_text, z_vision
        out.append(merged)
    return out


CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- F.linear(x, self.weight) routers
    "mixtral": Case(lambda: tiny_mixtral(router_jitter_noise=0.1), ("MixtralTopKRouter",), 2),
    "qwen2_moe": Case(tiny_qwen2_moe, ("Qwen2MoeTopKRouter",), 2),
    "qwen3_moe": Case(
        _lm(
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            num_experts=4,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        ("Qwen3MoeTopKRouter",),
        2,
    ),
    "qwen3_next": Case(
        _lm(
            "Qwen3NextConfig",
            "Qwen3NextForCausalLM",
            **C,
            **MOE,
            **LINEAR_ATTENTION,
            head_dim=8,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            layer_types=HYBRID,
        ),
        ("Qwen3NextTopKRouter",),
        2,
    ),
    "qwen3_5_moe": Case(
        _lm(
            "Qwen3_5MoeTextConfig",
            "Qwen3_5MoeForCausalLM",
            **C,
            **MOE,
            **LINEAR_ATTENTION,
            head_dim=8,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            layer_types=HYBRID,
        ),
        ("Qwen3_5MoeTopKRouter",),
        2,
    ),
    "qwen4_exp": Case(
        _lm(
            "Qwen4ExpTextConfig",
            "Qwen4ExpForCausalLM",
            **C,
            **MOE,
            **LINEAR_ATTENTION,
            head_dim=8,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            layer_types=["linear_attention", "indexed_attention"],
            hc_count=2,
            hc_lowrank=8,
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=8,
            indexer_budget=8,
            indexer_compress_ratio=4,
        ),
        ("Qwen4ExpTextTopKRouter",),
        2,
    ),
    "qwen3_vl_moe": Case(
        _lm(
            "Qwen3VLMoeConfig",
            "Qwen3VLMoeForConditionalGeneration",
            text_config={
                **C,
                **MOE,
                "head_dim": 8,
                "moe_intermediate_size": 32,
                "num_experts": 4,
                "rope_parameters": MROPE,
            },
            vision_config=QWEN_VISION,
            image_token_id=IMAGE,
            video_token_id=123,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        ),
        ("Qwen3VLMoeTextTopKRouter",),
        2,
        inputs=_image,
    ),
    "qwen3_omni_moe": Case(
        _lm(
            "Qwen3OmniMoeThinkerConfig",
            "Qwen3OmniMoeThinkerForConditionalGeneration",
            text_config={
                **C,
                **MOE,
                "head_dim": 8,
                "moe_intermediate_size": 32,
                "num_experts": 4,
                "rope_parameters": MROPE,
            },
            vision_config=QWEN_VISION,
            audio_config={
                "d_model": 16,
                "encoder_layers": 1,
                "encoder_attention_heads": 2,
                "encoder_ffn_dim": 32,
                "output_dim": COMMON["hidden_size"],
                "num_mel_bins": 16,
                "downsample_hidden_size": 8,
            },
            audio_start_token_id=119,
            user_token_id=118,
            audio_token_id=123,
            image_token_id=IMAGE,
            video_token_id=124,
        ),
        ("Qwen3OmniMoeThinkerTextTopKRouter",),
        2,
    ),
    # Transformers 5.23 leaves the talker's expert and gate weights uninitialised.
    "qwen3_omni_moe_talker": Case(
        _initialised(
            _lm(
                "Qwen3OmniMoeTalkerTextConfig",
                "Qwen3OmniMoeTalkerModel",
                **C,
                **MOE,
                moe_intermediate_size=32,
                num_experts=4,
                shared_expert_intermediate_size=32,
            ),
            ("mlp.experts.", "mlp.gate."),
        ),
        ("Qwen3OmniMoeTalkerTextTopKRouter",),
        2,
        **BASE_MODEL,
        inputs=_embeddings,
        model_type="qwen3_omni_moe",
    ),
    "olmoe": Case(_lm("OlmoeConfig", "OlmoeForCausalLM", **C, **MOE, num_experts=4), ("OlmoeTopKRouter",), 2),
    "flex_olmo": Case(
        _lm("FlexOlmoConfig", "FlexOlmoForCausalLM", **C, **MOE, num_experts=4), ("FlexOlmoTopKRouter",), 2
    ),
    "gpt_oss": Case(
        _lm(
            "GptOssConfig",
            "GptOssForCausalLM",
            **{**C, "intermediate_size": 32},
            **MOE,
            head_dim=8,
            num_local_experts=4,
            sliding_window=16,
        ),
        ("GptOssTopKRouter",),
        2,
    ),
    "openai_privacy_filter": Case(
        _lm(
            "OpenAIPrivacyFilterConfig",
            "OpenAIPrivacyFilterModel",
            **C,
            **MOE,
            head_dim=8,
            num_local_experts=4,
            sliding_window=16,
        ),
        ("OpenAIPrivacyFilterTopKRouter",),
        2,
        **BASE_MODEL,
    ),
    "granitemoe": Case(
        _lm("GraniteMoeConfig", "GraniteMoeForCausalLM", **C, **MOE, num_local_experts=4), ("GraniteMoeTopKRouter",), 2
    ),
    "granitemoeshared": Case(
        _lm(
            "GraniteMoeSharedConfig",
            "GraniteMoeSharedForCausalLM",
            **C,
            **MOE,
            num_local_experts=4,
            shared_intermediate_size=32,
        ),
        ("GraniteMoeSharedTopKRouter",),
        2,
    ),
    "granitemoe_swa": Case(
        _lm("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", **C, **MOE, num_local_experts=4, sliding_window=16),
        ("GraniteMoeSWATopKRouter",),
        2,
    ),
    "granitemoehybrid": Case(
        _lm(
            "GraniteMoeHybridConfig",
            "GraniteMoeHybridForCausalLM",
            **C,
            **MOE,
            num_local_experts=4,
            shared_intermediate_size=32,
            layer_types=["mamba", "attention"],
            mamba_n_heads=4,
            mamba_d_state=8,
            mamba_d_head=16,
            mamba_chunk_size=16,
        ),
        ("GraniteMoeHybridTopKRouter",),
        2,
    ),
    "jamba": Case(
        _lm(
            "JambaConfig",
            "JambaForCausalLM",
            **C,
            **MOE,
            num_experts=4,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
        ),
        ("JambaTopKRouter",),
        2,
    ),
    "minimax": Case(
        _lm("MiniMaxConfig", "MiniMaxForCausalLM", **C, **MOE, head_dim=8, num_local_experts=4, sliding_window=16),
        ("MiniMaxTopKRouter",),
        2,
    ),
    "minimax_m2": Case(
        _lm("MiniMaxM2Config", "MiniMaxM2ForCausalLM", **C, **MOE, head_dim=8, num_local_experts=4),
        ("MiniMaxM2TopKRouter",),
        2,
    ),
    "minimax_m3_vl": Case(
        _lm("MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", **C, **MOE, head_dim=8, num_local_experts=4),
        ("MiniMaxM3VLTopKRouter",),
        2,
    ),
    "ernie4_5_moe": Case(
        _lm(
            "Ernie4_5_MoeConfig",
            "Ernie4_5_MoeForCausalLM",
            **C,
            moe_intermediate_size=32,
            moe_num_experts=4,
            moe_k=2,
            moe_layer_start_index=0,
        ),
        ("Ernie4_5_MoeTopKRouter",),
        2,
    ),
    "cohere2_moe": Case(
        _lm(
            "Cohere2MoeConfig",
            "Cohere2MoeForCausalLM",
            **C,
            **MOE,
            head_dim=8,
            num_experts=4,
            sliding_window=16,
            num_shared_experts=1,
        ),
        ("Cohere2MoeTopKRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "aria": Case(
        _lm(
            "AriaTextConfig",
            "AriaTextForCausalLM",
            **C,
            head_dim=8,
            moe_num_experts=4,
            moe_topk=2,
            moe_num_shared_experts=1,
        ),
        ("AriaTextTopKRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "lfm2_moe": Case(
        _lm(
            "Lfm2MoeConfig",
            "Lfm2MoeForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            num_experts=4,
            num_dense_layers=0,
            layer_types=["conv", "full_attention"],
        ),
        ("Lfm2MoeTopKRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "mellum": Case(
        _lm(
            "MellumConfig",
            "MellumForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            num_experts=4,
            sliding_window=16,
        ),
        ("MellumTopKRouter",),
        2,
    ),
    "flint": Case(
        _lm(
            "FlintConfig",
            "FlintForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            num_experts=4,
            shared_expert_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            sliding_window=16,
        ),
        ("FlintTopKRouter",),
        2,
    ),
    "laguna": Case(
        _lm(
            "LagunaConfig",
            "LagunaForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            num_experts=4,
            shared_expert_intermediate_size=32,
            sliding_window=16,
            mlp_layer_types=["sparse", "sparse"],
        ),
        ("LagunaTopKRouter",),
        2,
    ),
    "kolibri1": Case(
        _lm(
            "Kolibri1Config",
            "Kolibri1ForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            num_experts=4,
            shared_expert_intermediate_size=32,
            sliding_window=16,
        ),
        ("Kolibri1TopKRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "hy_v3": Case(
        _lm(
            "HYV3Config",
            "HYV3ForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            num_experts=4,
            num_shared_experts=1,
            mlp_layer_types=["sparse", "sparse"],
        ),
        ("HYV3TopKRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "muse_spark": Case(
        _lm(
            "MuseSparkTextConfig",
            "MuseSparkTextModel",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            num_local_experts=4,
            sliding_window=16,
        ),
        ("MuseSparkTopkRouter",),
        2,
        **BASE_MODEL,
        recorded=_scaled_logits,
    ),
    "beam": Case(
        _lm(
            "BeamConfig",
            "BeamForCausalLM",
            **C,
            **MOE,
            head_dim=8,
            moe_intermediate_size=32,
            num_experts=4,
            n_group=2,
            topk_group=1,
            mlp_layer_types=["sparse", "sparse"],
        ),
        ("BeamTopKRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "step3p7": Case(
        _lm(
            "Step3p7TextConfig",
            "Step3p7TextModel",
            **C,
            **MOE,
            head_dim=8,
            num_local_experts=4,
            moe_intermediate_size=32,
            n_routed_experts=4,
            share_expert_dim=32,
            mlp_layer_types=["sparse", "sparse"],
            sliding_window=16,
        ),
        ("Step3p7TopKRouter",),
        2,
        **BASE_MODEL,
    ),
    "nemotron_h": Case(
        _lm(
            "NemotronHConfig",
            "NemotronHForCausalLM",
            **{**C, "num_hidden_layers": 3},
            **MOE,
            head_dim=8,
            layers_block_type=["moe", "full_attention", "moe"],
            use_mamba_kernels=False,
            n_routed_experts=4,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
        ),
        ("NemotronHTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    # ------------------------------------------------ DeepSeek family: float32 F.linear, score-correction bias
    "deepseek_v2": Case(
        _lm("DeepseekV2Config", "DeepseekV2ForCausalLM", **DEEPSEEK, first_k_dense_replace=0),
        ("DeepseekV2TopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "deepseek_v3": Case(
        _lm("DeepseekV3Config", "DeepseekV3ForCausalLM", **DEEPSEEK, first_k_dense_replace=0),
        ("DeepseekV3TopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "deepseek_v32": Case(
        _lm("DeepseekV32Config", "DeepseekV32ForCausalLM", **DEEPSEEK, first_k_dense_replace=0),
        ("DeepseekV32TopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "deepseek_ocr2": Case(
        _lm(
            "DeepseekOcr2TextConfig",
            "DeepseekOcr2TextModel",
            **DEEPSEEK,
            first_k_dense_replace=0,
            mlp_layer_types=["sparse", "sparse"],
        ),
        ("DeepseekOcr2TextTopkRouter",),
        2,
        **BASE_MODEL,
    ),
    "unlimited_ocr": Case(
        _lm("UnlimitedOcrTextConfig", "UnlimitedOcrTextModel", **DEEPSEEK, first_k_dense_replace=0),
        ("UnlimitedOcrTextTopkRouter",),
        2,
        **BASE_MODEL,
    ),
    "axk1": Case(
        _lm("AXK1Config", "AXK1ForCausalLM", **DEEPSEEK, mlp_layer_types=["sparse", "sparse"]),
        ("AXK1TopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "axk2": Case(
        _lm("AXK2Config", "AXK2ForCausalLM", **DEEPSEEK, head_dim=8, mlp_layer_types=["sparse", "sparse"]),
        ("AXK2TopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "dots1": Case(
        _lm("Dots1Config", "Dots1ForCausalLM", **DEEPSEEK, first_k_dense_replace=0, sliding_window=16),
        ("Dots1TopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "dots3_note": Case(
        _lm("Dots3NoteTextConfig", "Dots3NoteTextModel", **DEEPSEEK, first_k_dense_replace=0),
        ("Dots3NoteTextTopkRouter",),
        2,
        **BASE_MODEL,
    ),
    "glm4_moe": Case(
        _lm("Glm4MoeConfig", "Glm4MoeForCausalLM", **DEEPSEEK, first_k_dense_replace=0),
        ("Glm4MoeTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "glm4_moe_lite": Case(
        _lm("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", **DEEPSEEK, mlp_layer_types=["sparse", "sparse"]),
        ("Glm4MoeLiteTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "glm_moe_dsa": Case(
        _lm("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", **DEEPSEEK, head_dim=8, first_k_dense_replace=0),
        ("GlmMoeDsaTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "glm4v_moe": Case(
        _lm(
            "Glm4vMoeTextConfig",
            "Glm4vMoeTextModel",
            **C,
            **MOE,
            moe_intermediate_size=16,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [2, 1, 1],
                "partial_rotary_factor": 0.5,
            },
        ),
        ("Glm4vMoeTextTopkRouter",),
        2,
        **BASE_MODEL,
    ),
    "glm5_next": Case(
        _lm(
            "Glm5NextTextConfig",
            "Glm5NextTextModel",
            **{**DEEPSEEK, "qk_rope_head_dim": 0},
            head_dim=0,
            layer_types=["linear_attention", "indexed_attention"],
            mlp_layer_types=["sparse", "sparse"],
            linear_head_dim=8,
            linear_num_heads=4,
            index_n_heads=2,
            index_head_dim=8,
            index_topk=4,
            index_kpool=2,
            hc_mult=2,
        ),
        ("Glm5NextTextTopkRouter",),
        2,
        **BASE_MODEL,
    ),
    "mistral4": Case(
        _lm("Mistral4Config", "Mistral4ForCausalLM", **DEEPSEEK, first_k_dense_replace=0),
        ("Mistral4TopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "mistral_large4": Case(
        _lm("MistralLarge4TextConfig", "MistralLarge4TextModel", **DEEPSEEK, head_dim=8, first_k_dense_replace=0),
        ("MistralLarge4TextTopkRouter",),
        2,
        **BASE_MODEL,
    ),
    "exaone_moe": Case(
        _lm(
            "ExaoneMoeConfig",
            "ExaoneMoeForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            num_experts=4,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            sliding_window=16,
            num_shared_experts=1,
        ),
        ("ExaoneMoeTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "solar_open": Case(
        _lm(
            "SolarOpenConfig",
            "SolarOpenForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            n_routed_experts=4,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
        ),
        ("SolarOpenTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "mimo_v2_flash": Case(
        _lm(
            "MiMoV2FlashConfig",
            "MiMoV2FlashForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            n_routed_experts=4,
            n_group=2,
            topk_group=1,
            v_head_dim=8,
            sliding_window=16,
            mlp_layer_types=["sparse", "sparse"],
        ),
        ("MiMoV2FlashTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "hy_v4": Case(
        _lm("HYV4Config", "HYV4ForCausalLM", **DEEPSEEK, head_dim=8, mlp_layer_types=["sparse", "sparse"]),
        ("HYV4TopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "kimi_linear": Case(
        _lm(
            "KimiLinearConfig",
            "KimiLinearForCausalLM",
            **{**DEEPSEEK, "n_group": 1},
            num_local_experts=4,
            layer_types=HYBRID,
            mlp_layer_types=["sparse", "sparse"],
            linear_head_dim=8,
            linear_num_heads=4,
        ),
        ("KimiLinearTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "bailing_hybrid": Case(
        _lm(
            "BailingHybridConfig",
            "BailingHybridForCausalLM",
            **DEEPSEEK,
            num_local_experts=4,
            first_k_dense_replace=0,
            layer_types=HYBRID,
            head_dim=8,
        ),
        ("BailingHybridTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "inkling": Case(
        _lm(
            "InklingTextConfig",
            "InklingForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            n_routed_experts=4,
            n_shared_experts=1,
        ),
        ("InklingTopkRouter",),
        2,
        loss_fields=NO_AUX,
        recorded=_routed_columns,
    ),
    "inkling2": Case(
        _lm(
            "Inkling2TextConfig",
            "Inkling2ForCausalLM",
            **C,
            **MOE,
            moe_intermediate_size=32,
            head_dim=8,
            n_routed_experts=4,
        ),
        ("Inkling2TopKRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    # ---------------------------------------------------------------- routers that are nn.Linear subclasses
    "phimoe": Case(
        _lm(
            "PhimoeConfig",
            "PhimoeForCausalLM",
            **C,
            **MOE,
            num_local_experts=4,
            sliding_window=16,
            input_jitter_noise=0.1,
        ),
        ("PhimoeTopKRouter",),
        2,
    ),
    "llama4": Case(
        _lm(
            "Llama4Config",
            "Llama4ForConditionalGeneration",
            text_config={**C, **LLAMA4_MOE},
            vision_config={
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "vision_output_dim": 16,
                "image_size": 16,
                "patch_size": 4,
                "projector_input_dim": 16,
                "projector_output_dim": COMMON["hidden_size"],
            },
            boi_token_index=VISION_START,
            eoi_token_index=VISION_END,
            image_token_index=IMAGE,
        ),
        ("Llama4Router",),
        2,
        loss_fields=NO_AUX,
    ),
    "llama4_text": Case(
        _lm("Llama4TextConfig", "Llama4ForCausalLM", **C, **LLAMA4_MOE),
        ("Llama4Router",),
        2,
        loss_fields=NO_AUX,
        model_type="llama4",
    ),
    # ---------------------------------------------------------------- child nn.Linear gates
    "switch_transformers": Case(
        tiny_switch,
        ("SwitchTransformersTop1Router",),
        2,
        logit_fields=("encoder_router_logits", "decoder_router_logits"),
        loss_fields=("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"),
    ),
    "nllb-moe": Case(
        _lm(
            "NllbMoeConfig",
            "NllbMoeForConditionalGeneration",
            vocab_size=128,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_experts=4,
            expert_capacity=16,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            max_position_embeddings=64,
            decoder_start_token_id=2,
            pad_token_id=1,
            router_bias=True,
            encoder_layerdrop=0.0,
            decoder_layerdrop=0.0,
        ),
        ("NllbMoeTop2Router",),
        4,
        logit_fields=("encoder_router_logits", "decoder_router_logits"),
        loss_fields=("encoder_aux_loss", "decoder_aux_loss"),  # NLLB-MoE computes no z-loss
    ),
    "dbrx": Case(
        _lm(
            "DbrxConfig",
            "DbrxForCausalLM",
            vocab_size=128,
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2, "moe_jitter_eps": 0.1},
        ),
        ("DbrxRouter",),
        2,
    ),
    "jetmoe": Case(
        _lm("JetMoeConfig", "JetMoeForCausalLM", **C, **MOE, num_local_experts=4, kv_channels=8),
        ("JetMoeTopKGating",),
        4,  # per layer: the mixture-of-attention router and the MoE router
    ),
    "hunyuan_v1_moe": Case(
        _lm("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", **C, head_dim=8, num_experts=4, moe_topk=2),
        ("HunYuanMoEV1Gate",),
        2,
        loss_fields=NO_AUX,
    ),
    "longcat_flash": Case(
        _lm(
            "LongcatFlashConfig",
            "LongcatFlashForCausalLM",
            vocab_size=128,
            hidden_size=32,
            num_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            ffn_hidden_size=64,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            head_dim=8,
            v_head_dim=8,
            moe_topk=2,
            n_routed_experts=4,
            zero_expert_num=2,
            expert_ffn_hidden_size=32,
            pad_token_id=0,
        ),
        ("LongcatFlashTopkRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    # Afmoe initialises its gates to zero (all logits tie); the test gives them real weights.
    "afmoe": Case(
        _initialised(
            _lm(
                "AfmoeConfig",
                "AfmoeForCausalLM",
                **C,
                **MOE,
                moe_intermediate_size=32,
                head_dim=8,
                num_experts=4,
                sliding_window=16,
                num_shared_experts=1,
                num_dense_layers=0,
            ),
            ("router.gate.",),
        ),
        ("AfmoeTokenChoiceRouter",),
        2,
        loss_fields=NO_AUX,
    ),
    "gemma4": Case(
        _lm(
            "Gemma4TextConfig",
            "Gemma4ForCausalLM",
            **C,
            head_dim=8,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
            vocab_size_per_layer_input=128,
            hidden_size_per_layer_input=8,
        ),
        ("Gemma4TextRouter",),
        2,
        loss_fields=NO_AUX,
        recorded=_probabilities,
    ),
    "diffusion_gemma": Case(
        _lm(
            "DiffusionGemmaTextConfig",
            "DiffusionGemmaEncoderTextModel",
            **C,
            head_dim=8,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=32,
        ),
        ("DiffusionGemmaTextRouter",),
        2,
        **BASE_MODEL,
        recorded=_probabilities,
    ),
    "ernie4_5_vl_moe": Case(
        _lm(
            "Ernie4_5_VLMoeTextConfig",
            "Ernie4_5_VLMoeTextModel",
            **C,
            moe_intermediate_size=[32, 32],
            moe_num_experts=4,
            moe_k=2,
            moe_num_shared_experts=1,
            mlp_layer_types=["sparse", "sparse"],
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]},
        ),
        ("Ernie4_5_VLMoeMoeTopKRouter",),
        4,  # per layer: the text and the vision MoE block's gate
        **BASE_MODEL,
        inputs=_vision_tokens,
        recorded=_modality_scatter,
    ),
    # ------------------------------------------------ hash-routed layers left out (test_deepseek_v4_...)
    "deepseek_v4": Case(
        _lm(
            "DeepseekV4Config",
            "DeepseekV4ForCausalLM",
            **{**C, "num_key_value_heads": 1},
            **MOE,
            head_dim=16,
            q_lora_rank=16,
            moe_intermediate_size=32,
            n_routed_experts=4,
            o_groups=2,
            o_lora_rank=16,
            index_n_heads=4,
            index_head_dim=8,
            index_topk=4,
            sliding_window=8,
            mlp_layer_types=["hash_moe", "moe"],
            layer_types=["sliding_attention", "compressed_sparse_attention"],
            hc_mult=2,
        ),
        ("DeepseekV4TopKRouter",),
        1,
        star_config={"layers_to_transform": [1]},
    ),
}


# ---------------------------------------------------------------------------- shared builds


@functools.cache
def _original(name: str) -> nn.Module:
    # Never run: a forward would install Transformers' output hooks on it (and on every copy).
    return CASES[name].build()


def _fresh(name: str) -> nn.Module:
    return copy.deepcopy(_original(name))


def _patched(name: str) -> nn.Module:
    return patch_model(_fresh(name), StarConfig(**CASES[name].star_config))


def _inputs(case: Case) -> dict:
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids} if case.inputs is None else case.inputs(ids)
    if case.lm:
        kwargs["labels"] = kwargs["input_ids"]
    return {**kwargs, "output_router_logits": True}


def _output(case: Case, out) -> torch.Tensor:
    return out.logits if case.lm else out.last_hidden_state


def _flatten(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []


def _recorded_logits(case: Case, out) -> list[torch.Tensor]:
    return [t for f in case.logit_fields for t in _flatten(getattr(out, f))]


@functools.cache
def _reference(name: str):
    with torch.no_grad():
        return _fresh(name)(**_inputs(CASES[name]))


@pytest.fixture(scope="module", autouse=True)
def _release_builds():
    yield
    _original.cache_clear()
    _reference.cache_clear()


NAMES = sorted(CASES)


def _broken_upstream(name: str) -> bool:
    """True when this case's stock model is known to fail in the installed Transformers — after
    checking, here, that the stock model fails with exactly that error, that ``patch_model`` refuses
    it naming the failure, and that a patch forced with ``allow_unverified`` fails identically."""
    case = CASES[name]
    failure = upstream_failure(type(_original(name)).__name__)
    if failure is None:
        return False

    def forward_error(model: nn.Module) -> str:
        with torch.no_grad(), pytest.raises(Exception) as err:
            model(**_inputs(case))
        return f"{type(err.value).__name__}: {err.value}"

    assert forward_error(_fresh(name)) == failure.error
    model = _fresh(name)
    before = _state(model)
    with pytest.raises(BrokenUpstreamError, match=re.escape(failure.error)):
        patch_model(model, StarConfig(**case.star_config))
    state, types = _state(model)
    assert types == before[1] and all(torch.equal(state[k], v) for k, v in before[0].items())
    forced = patch_model(model, StarConfig(**case.star_config), allow_unverified=True)
    assert find_star_routers(forced) and forward_error(forced) == failure.error
    return True


def _assert_recorded_in_order(expected: list[torch.Tensor], recorded: list[torch.Tensor]) -> None:
    """``recorded`` is ``expected`` in call order, where Transformers may record one call's logits
    more than once in a row (how often is Transformers' choice: JetMoE 5.23 records its attention
    router twice per layer, 5.24 once)."""

    def same(z: torch.Tensor, rec: torch.Tensor) -> bool:
        return z.numel() == rec.numel() and torch.allclose(z.float(), rec.reshape(z.shape).float(), rtol=1e-5, atol=1e-5)

    position = -1
    for rec in recorded:
        if position >= 0 and same(expected[position], rec):
            continue
        position += 1
        assert position < len(expected), "more recorded router logits than router calls"
        torch.testing.assert_close(
            expected[position].float(), rec.reshape(expected[position].shape).float(), rtol=1e-5, atol=1e-5
        )
    assert position == len(expected) - 1, f"{len(expected) - 1 - position} router calls were not recorded"


def test_every_verified_router_class_has_a_case():
    covered = {cls: case.model_type or name for name, case in CASES.items() for cls in case.router_classes}
    assert covered == VERIFIED_ROUTERS


def test_readme_lists_exactly_the_verified_routers():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Supported architectures") :]
    section = section[: section.index("\n## ")]
    rows = re.findall(r"^\| ([\w-]+) \| (\w+) \| ", section, flags=re.MULTILINE)
    assert {cls: model_type for model_type, cls in rows if cls != "router"} == VERIFIED_ROUTERS


@pytest.mark.parametrize("name", NAMES)
def test_patch_changes_only_the_gates(name):
    case = CASES[name]
    if _broken_upstream(name):
        return
    patched = _patched(name)
    routers = find_star_routers(patched)
    sites = [s for s in scan_routers(_original(name))[0] if StarConfig(**case.star_config).selects(s.path)]
    assert sorted(routers) == sorted(s.path for s in sites) and len(routers) == case.num_routers
    assert {type(s.router).__name__ for s in sites} == set(case.router_classes)
    with torch.no_grad():
        out = patched(**_inputs(case))
    ref = _reference(name)
    assert (_output(case, out) - _output(case, ref)).abs().max() <= 1e-5
    a, b = _recorded_logits(case, ref), _recorded_logits(case, out)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x.float() - y.float()).abs().max() <= 1e-5
    for f in case.loss_fields:
        assert getattr(ref, f, None) is not None, f"{name} should report {f}"
        torch.testing.assert_close(getattr(out, f), getattr(ref, f), rtol=1e-5, atol=1e-6)
    if not case.loss_fields:
        assert getattr(ref, "aux_loss", None) is None, f"{name} reports an aux loss: list it in loss_fields"
    # Every state-dict entry keeps its name and value; the gates (folded W_eff, b_eff) to round-off.
    before, after = _original(name).state_dict(), patched.state_dict()
    gates = {f"{p}.{n}" for p in routers for n in ("weight", "bias")}
    for key, value in before.items():
        if key in gates:
            assert (after[key] - value).abs().max() <= 1e-5, key
        else:
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_star_parameters_and_statistics_are_collected(name):
    case = CASES[name]
    if _broken_upstream(name):
        return
    model = _patched(name).train()
    out = model(**_inputs(case))
    loss = out.loss if case.lm else out.last_hidden_state.float().square().mean()
    loss.backward()
    routers = find_star_routers(model)
    for path, router in routers.items():
        names = ["star_linear_weight", "star_mixing", "star_alpha"] + ["star_linear_bias"] * (
            router.star_linear_bias is not None
        )
        for pname in names:
            grad = getattr(router, pname).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (path, pname)
        assert "star_basis" not in dict(router.named_parameters())
        stats = router.star_pending_statistics
        assert stats is not None and float(stats.count) > 0, path


@pytest.mark.parametrize("name", NAMES)
def test_router_observes_the_input_its_gate_multiplies(name):
    """In a training forward, F.linear(observed x, W_eff, b_eff) is what Transformers records."""
    case = CASES[name]
    if _broken_upstream(name):
        return
    model = _patched(name).train()
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    for router in find_star_routers(model).values():
        router._star_observe = functools.partial(lambda r, x: calls.append((r, x.detach().clone())), router)
    kwargs = _inputs(case)
    with torch.no_grad():
        out = model(**kwargs)
        logits = [(r, F.linear(x.reshape(-1, x.shape[-1]), r.weight, r.bias)) for r, x in calls]
    expected = (case.recorded or (lambda c, _: [z for _, z in c]))(logits, kwargs)
    assert len(calls) >= case.num_routers
    _assert_recorded_in_order(expected, _recorded_logits(case, out))


@pytest.mark.parametrize("name", NAMES)
def test_patch_after_output_hooks_were_installed(name):
    """Transformers installs its output-recording hooks lazily, on module objects."""
    case = CASES[name]
    if _broken_upstream(name):
        return
    model = _fresh(name)
    kwargs = _inputs(case)
    with torch.no_grad():
        ref = model(**kwargs)
        patch_model(model, StarConfig(**case.star_config))
        out = model(**kwargs)
    assert len(_recorded_logits(case, out)) == len(_recorded_logits(case, ref)) > 0
    for f in case.loss_fields:
        torch.testing.assert_close(getattr(out, f), getattr(ref, f), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- routers STAR refuses


def _state(model: nn.Module) -> tuple[dict, list[type]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


REFUSED = {
    # An MLP router: a down-projection, then a small MLP producing the logits.
    "zaya": (
        _lm(
            "ZayaConfig",
            "ZayaForCausalLM",
            **C,
            head_dim=8,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=1,
            router_hidden_size=16,
        ),
        "ZayaRouter",
    ),
    # Product keys: 2·√E key scores instead of one logit per expert.
    "doge": (
        _lm("DogeConfig", "DogeForCausalLM", **C, is_moe=True, num_experts=16, num_experts_per_tok=2),
        "DogeCDMoE",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_router_that_is_not_a_linear_gate_is_refused_before_any_change(name):
    build, router_class = REFUSED[name]
    model = build()
    before = _state(model)
    with pytest.raises(UnsupportedRouterError, match=rf"{router_class}\): no E×D linear gate"):
        patch_model(model, allow_unverified=True)
    state, types = _state(model)
    assert [type(m) for m in model.modules()] == before[1] == types
    assert all(torch.equal(state[k], v) for k, v in before[0].items())


def test_deepseek_v4_hash_routed_layers_are_refused_with_the_layers_to_keep():
    """DeepSeek-V4's first layers pick experts by token id; the patcher names them and the fix."""
    model = _original("deepseek_v4")
    before = _state(model)
    with pytest.raises(UnsupportedRouterError) as err:
        patch_model(copy.deepcopy(model))
    message = str(err.value)
    assert "model.layers.0.mlp.gate (DeepseekV4HashRouter)" in message and "hash routing" in message
    assert "StarConfig(layers_to_transform=[1])" in message
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    # Following the hint patches only the linear gate; the hash router keeps its stock class.
    patched = _patched("deepseek_v4")
    assert list(find_star_routers(patched)) == ["model.layers.1.mlp.gate"]
    assert type(patched.model.layers[0].mlp.gate) is type(model.model.layers[0].mlp.gate)


# ---------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    "name",
    [
        "ernie4_5_moe",  # _keep_in_fp32_modules_strict = ["gate.weight", ...]
        "beam",  # _keep_in_fp32_modules_strict = [..., "mlp.gate.weight"]
        "flint",  # _keep_in_fp32_modules_strict = ["gate.weight", ...]
        "mistral_large4",  # _keep_in_fp32_modules_strict = [..., "mlp.gate.weight"]
        "hunyuan_v1_moe",  # nn.Linear(..., dtype=torch.float32) gate
    ],
)
def test_gate_kept_in_float32_gives_float32_star_parameters_in_a_bf16_model(name, tmp_path):
    import transformers

    case = CASES[name]
    _fresh(name).save_pretrained(tmp_path)
    auto = transformers.AutoModelForCausalLM if case.lm else transformers.AutoModel
    stock = auto.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = auto.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    sites = scan_routers(model)[0]
    assert sites and all(s.gate.weight.dtype == torch.float32 for s in sites)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    patch_model(model)
    for router in find_star_routers(model).values():
        for tensor in (router.star_linear_weight, router.star_mixing, router.star_alpha, router.star_basis):
            assert tensor.dtype == torch.float32
    kwargs = _inputs(case)
    with torch.no_grad():
        ref, out = stock(**kwargs), model(**kwargs)
    # The gates compute in float32 on both sides: their logits agree to float32 round-off.
    for x, y in zip(_recorded_logits(case, ref), _recorded_logits(case, out)):
        assert x.dtype == y.dtype == torch.float32 and (x - y).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "name, logits_dtype",
    [
        ("mixtral", torch.float32),  # softmax, then top-k
        ("gpt_oss", torch.float32),  # top-k, then softmax; gate bias
        ("deepseek_v3", torch.float32),  # sigmoid, score-correction bias, group-limited top-k
        ("switch_transformers", torch.float32),  # top-1 with expert capacity, router in float32
        ("longcat_flash", torch.float32),  # the router reads its gate child's weight directly
        ("inkling", torch.float32),  # upcasts itself, returns weights in the input dtype: input left as is
        ("inkling2", torch.float32),  # upcasts its input but not its weight: stock bf16 fails, float32 W_eff runs
        # An nn.Linear router whose scores scale the bf16 expert inputs: it routes on float32 logits
        # and returns its outputs (scores and the recorded logits) in bf16.
        ("llama4", torch.bfloat16),
    ],
)
def test_logits_fp32_in_a_bf16_model(name, logits_dtype):
    case = CASES[name]
    if _broken_upstream(name):
        return
    model = patch_model(_fresh(name).to(torch.bfloat16), StarConfig(logits_fp32=True, **case.star_config))
    for router in find_star_routers(model).values():
        assert router.star_linear_weight.dtype == torch.bfloat16 and router.weight.dtype == torch.float32
    kwargs = _inputs(case)
    with torch.no_grad():
        out = model(**kwargs)
    assert torch.isfinite(_output(case, out)).all()
    assert all(t.dtype == logits_dtype for t in _recorded_logits(case, out))
    model.train()
    model(**kwargs).loss.backward()
    for router in find_star_routers(model).values():
        assert torch.isfinite(router.star_linear_weight.grad).all() and router.star_pending_statistics is not None


def test_logits_fp32_is_refused_where_the_logits_leave_the_router():
    model = _fresh("dbrx").to(torch.bfloat16)
    before = _state(model)
    with pytest.raises(UnsupportedRouterError, match="logits_fp32=True.*DbrxRouter: DBRX computes its routing weights"):
        patch_model(model, StarConfig(logits_fp32=True))
    assert [type(m) for m in model.modules()] == before[1]
    patch_model(model)  # bf16 logits, as the stock model computes them


@pytest.mark.parametrize("name", ["deepseek_v4", "inkling"])
def test_score_correction_bias_survives_the_checkpoint_rename(name, tmp_path):
    """DeepSeek-V4 (and Inkling's conversion rules) store e_score_correction_bias as ``gate.bias``:
    a patched checkpoint must load in plain Transformers with those biases and the folded gates."""
    import transformers

    case = CASES[name]
    model = _patched(name)
    with torch.no_grad():
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    model.save_pretrained(tmp_path)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    kwargs = _inputs(case)
    with torch.no_grad():
        assert (_output(case, stock(**kwargs)) - _output(case, model(**kwargs))).abs().max() <= 1e-5
    biases = {k: v for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")}
    assert biases and all(torch.equal(dict(stock.named_buffers())[k], v) for k, v in biases.items())
