"""The architectures star_hf is verified on, and how ``logits_fp32`` meets a few of them.

The patcher itself is generic (see :mod:`star_hf.discovery`); ``VERIFIED_ROUTERS`` records the router
classes of Transformers 5.23 that have a case in ``tests/test_architectures.py``, a tiny model built
from their config: outputs, recorded router logits and aux / z losses unchanged and no other weight
touched, gradients reaching the STAR parameters, statistics collected on exactly the input each gate
multiplies, patching after Transformers' output hooks were installed. Patching a router class that is
not listed needs ``patch_model(..., allow_unverified=True)``.
"""

from __future__ import annotations

__all__ = ["LOGITS_FP32_MODES", "LOGITS_FP32_REFUSED", "VERIFIED_ROUTERS", "supported_architectures"]

# router class name -> Transformers model_type (of the family: multimodal text routers map to the wrapper's)
VERIFIED_ROUTERS: dict[str, str] = {
    "MixtralTopKRouter": "mixtral",
    "Qwen2MoeTopKRouter": "qwen2_moe",
    "Qwen3MoeTopKRouter": "qwen3_moe",
    "Qwen3NextTopKRouter": "qwen3_next",
    "Qwen3_5MoeTopKRouter": "qwen3_5_moe",
    "Qwen4ExpTextTopKRouter": "qwen4_exp",
    "Qwen3VLMoeTextTopKRouter": "qwen3_vl_moe",
    "Qwen3OmniMoeThinkerTextTopKRouter": "qwen3_omni_moe",
    "Qwen3OmniMoeTalkerTextTopKRouter": "qwen3_omni_moe",
    "OlmoeTopKRouter": "olmoe",
    "FlexOlmoTopKRouter": "flex_olmo",
    "GptOssTopKRouter": "gpt_oss",
    "OpenAIPrivacyFilterTopKRouter": "openai_privacy_filter",
    "GraniteMoeTopKRouter": "granitemoe",
    "GraniteMoeSharedTopKRouter": "granitemoeshared",
    "GraniteMoeSWATopKRouter": "granitemoe_swa",
    "GraniteMoeHybridTopKRouter": "granitemoehybrid",
    "JambaTopKRouter": "jamba",
    "MiniMaxTopKRouter": "minimax",
    "MiniMaxM2TopKRouter": "minimax_m2",
    "MiniMaxM3VLTopKRouter": "minimax_m3_vl",
    "Ernie4_5_MoeTopKRouter": "ernie4_5_moe",
    "Cohere2MoeTopKRouter": "cohere2_moe",
    "AriaTextTopKRouter": "aria",
    "Lfm2MoeTopKRouter": "lfm2_moe",
    "MellumTopKRouter": "mellum",
    "FlintTopKRouter": "flint",
    "LagunaTopKRouter": "laguna",
    "Kolibri1TopKRouter": "kolibri1",
    "HYV3TopKRouter": "hy_v3",
    "MuseSparkTopkRouter": "muse_spark",
    "BeamTopKRouter": "beam",
    "Step3p7TopKRouter": "step3p7",
    "NemotronHTopkRouter": "nemotron_h",
    "DeepseekV2TopkRouter": "deepseek_v2",
    "DeepseekV3TopkRouter": "deepseek_v3",
    "DeepseekV32TopkRouter": "deepseek_v32",
    "DeepseekOcr2TextTopkRouter": "deepseek_ocr2",
    "UnlimitedOcrTextTopkRouter": "unlimited_ocr",
    "AXK1TopkRouter": "axk1",
    "AXK2TopkRouter": "axk2",
    "Dots1TopkRouter": "dots1",
    "Dots3NoteTextTopkRouter": "dots3_note",
    "Glm4MoeTopkRouter": "glm4_moe",
    "Glm4MoeLiteTopkRouter": "glm4_moe_lite",
    "GlmMoeDsaTopkRouter": "glm_moe_dsa",
    "Glm4vMoeTextTopkRouter": "glm4v_moe",
    "Glm5NextTextTopkRouter": "glm5_next",
    "Mistral4TopkRouter": "mistral4",
    "MistralLarge4TextTopkRouter": "mistral_large4",
    "ExaoneMoeTopkRouter": "exaone_moe",
    "SolarOpenTopkRouter": "solar_open",
    "MiMoV2FlashTopkRouter": "mimo_v2_flash",
    "HYV4TopkRouter": "hy_v4",
    "KimiLinearTopkRouter": "kimi_linear",
    "BailingHybridTopkRouter": "bailing_hybrid",
    "InklingTopkRouter": "inkling",
    "Inkling2TopKRouter": "inkling2",
    "PhimoeTopKRouter": "phimoe",
    "Llama4Router": "llama4",
    "SwitchTransformersTop1Router": "switch_transformers",
    "NllbMoeTop2Router": "nllb-moe",
    "DbrxRouter": "dbrx",
    "JetMoeTopKGating": "jetmoe",
    "HunYuanMoEV1Gate": "hunyuan_v1_moe",
    "LongcatFlashTopkRouter": "longcat_flash",
    "AfmoeTokenChoiceRouter": "afmoe",
    "Gemma4TextRouter": "gemma4",
    "DiffusionGemmaTextRouter": "diffusion_gemma",
    "Ernie4_5_VLMoeMoeTopKRouter": "ernie4_5_vl_moe",
    "DeepseekV4TopKRouter": "deepseek_v4",
}


# ``StarConfig(logits_fp32=True)`` in a bf16/fp16 model runs a router's forward on a float32 copy of
# its input, so its score function and top-k see float32 logits; most MoE blocks then take the float32
# routing weights that come out. These routers need something else (router class name -> mode):
LOGITS_FP32_MODES: dict[str, str] = {
    # Its scores scale the hidden states fed to bf16 experts: outputs go back to the input dtype.
    "Llama4Router": "outputs",
    # It upcasts to float32 itself and casts its weights to the input dtype: the input stays as is.
    "InklingTopkRouter": "native",
}
# Routers whose logits go through code outside the router that cannot take float32 logits.
LOGITS_FP32_REFUSED: dict[str, str] = {
    "DbrxRouter": (
        "DBRX computes its routing weights from the router logits outside the router and mixes them into "
        "the expert outputs in the logits' dtype, so float32 logits cannot meet its bf16/fp16 experts"
    ),
}


def supported_architectures() -> list[str]:
    """The Transformers ``model_type`` values whose MoE routers star_hf is verified on."""
    return sorted(set(VERIFIED_ROUTERS.values()))
