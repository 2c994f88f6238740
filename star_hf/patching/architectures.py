"""The architectures and library versions star_hf is verified on, and how ``logits_fp32`` meets a few.

Version policy: CI runs the whole suite on two stacks, the lowest supported pins
(``constraints/lowest.txt``) and the newest releases pip resolves that day. ``VERIFIED_TRANSFORMERS``
and ``VERIFIED_PEFT`` name that range; a newer release still imports and patches, with one warning
naming the range. ``UPSTREAM_FAILURES`` lists model classes whose *stock, unpatched* forward fails in
some Transformers releases: on those, patching is refused with the upstream error named.

The patcher itself is generic (see :mod:`star_hf.patching.discovery`); ``VERIFIED_ROUTERS`` records the router
classes of Transformers that have a case in ``tests/test_architectures.py``, a tiny model built
from their config: outputs, recorded router logits and aux / z losses unchanged and no other weight
touched, gradients reaching the STAR parameters, statistics collected on exactly the input each gate
multiplies, patching after Transformers' output hooks were installed. Patching a router class that is
not listed needs ``patch_model(..., allow_unverified=True)``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from dataclasses import dataclass

from packaging.version import Version

__all__ = [
    "LOGITS_FP32_REFUSED",
    "UPSTREAM_FAILURES",
    "VERIFIED_PEFT",
    "VERIFIED_ROUTERS",
    "VERIFIED_TRANSFORMERS",
    "UpstreamFailure",
    "check_versions",
    "known_upstream_failures",
    "supported_architectures",
    "upstream_failure",
]

# (lowest supported, newest verified): the pins of constraints/lowest.txt and what pip resolved when
# CI last verified the newest stack. Bump the second when CI passes on a newer release.
VERIFIED_TRANSFORMERS: tuple[str, str] = ("5.23.0", "5.24.0")
VERIFIED_PEFT: tuple[str, str] = ("0.20.0", "0.21.2")


@dataclass(frozen=True)
class UpstreamFailure:
    """A model class whose stock forward fails inside Transformers in a range of releases.

    Attributes:
        model_class: the ``PreTrainedModel`` class name.
        since: the first Transformers release where the stock model fails.
        fixed_in: the first release where it works again (``None``: not fixed in the newest verified).
        error: the error the stock forward raises.
        advice: what a user can do instead.
    """

    model_class: str
    since: str
    fixed_in: str | None
    error: str
    advice: str

    def applies_to(self, version: str) -> bool:
        v = Version(version)
        return v >= Version(self.since) and (self.fixed_in is None or v < Version(self.fixed_in))

    def message(self, version: str) -> str:
        return (
            f"{self.model_class} is broken upstream in transformers {version}: the stock, unpatched model's "
            f"forward raises {self.error} inside Transformers (since {self.since}). {self.advice}"
        )


UPSTREAM_FAILURES: tuple[UpstreamFailure, ...] = (
    UpstreamFailure(
        model_class="Llama4ForConditionalGeneration",
        since="5.24.0",
        fixed_in=None,
        error="AttributeError: 'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'",
        advice=(
            "Its text model (Llama4ForCausalLM) is not affected; for the multimodal model use "
            "transformers<5.24, or pass allow_unverified=True to patch it anyway."
        ),
    ),
)

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


# Routers whose logits go through code outside the router that cannot take float32 logits.
LOGITS_FP32_REFUSED: dict[str, str] = {
    "DbrxRouter": (
        "DBRX computes its routing weights from the router logits outside the router and mixes them into "
        "the expert outputs in the logits' dtype, so float32 logits cannot meet its bf16/fp16 experts"
    ),
}


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def known_upstream_failures(transformers_version: str | None = None) -> list[UpstreamFailure]:
    """The entries of ``UPSTREAM_FAILURES`` that apply to ``transformers_version`` (default: installed)."""
    version = transformers_version or _installed("transformers")
    return [f for f in UPSTREAM_FAILURES if version is not None and f.applies_to(version)]


def upstream_failure(model_class_name: str, transformers_version: str | None = None) -> UpstreamFailure | None:
    """The known upstream failure of ``model_class_name`` on that Transformers version, if any."""
    return next((f for f in known_upstream_failures(transformers_version) if f.model_class == model_class_name), None)


def supported_architectures() -> list[str]:
    """The Transformers ``model_type`` values whose MoE routers star_hf is verified on.

    Model classes broken upstream in the installed Transformers are listed by
    :func:`known_upstream_failures` (e.g. ``Llama4ForConditionalGeneration`` on 5.24, whose text model
    ``Llama4ForCausalLM`` still holds, so ``llama4`` stays listed).
    """
    return sorted(set(VERIFIED_ROUTERS.values()))


@functools.cache
def check_versions() -> None:
    """Warn once per process when Transformers or PEFT is outside the range CI verifies."""
    for package, (lowest, newest) in (("transformers", VERIFIED_TRANSFORMERS), ("peft", VERIFIED_PEFT)):
        installed = _installed(package)
        if installed is None:
            continue
        if not Version(lowest) <= Version(installed) <= Version(newest):
            warnings.warn(
                f"star_hf is verified with {package} {lowest} to {newest} (CI runs both ends); {installed} is "
                f"installed. It should work, but check the patched model's outputs, and report what breaks.",
                UserWarning,
                stacklevel=3,
            )
