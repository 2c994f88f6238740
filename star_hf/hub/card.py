"""Model cards for STAR checkpoints pushed to the Hugging Face Hub.

The card text is the Jinja template ``model_cards/star_model_card.md.j2`` rendered by
``huggingface_hub.ModelCard.from_template``; this module only gathers the facts it shows (what was
patched, the STAR config, the routing metrics) and the Hub metadata (``ModelCardData``).

Where the template lives: in the source tree (and so in an editable install) it is the top-level
``model_cards/`` folder; a built wheel carries a copy as ``star_hf/model_cards/`` (the ``build_py``
hook in setup.py; MANIFEST.in puts the folder into the sdist).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from star_hf.paths import is_repo_id

__all__ = [
    "CardFacts",
    "adapter_routing_report",
    "card_facts_from_adapter",
    "card_facts_from_model",
    "find_template",
    "inherited_license",
    "render_model_card",
]

TEMPLATE_NAME = "star_model_card.md.j2"
KINDS = ("adapter", "full", "folded")
# The library that loads each kind: an adapter only loads through star_hf; a full checkpoint and a
# folded one are Transformers checkpoints (a full one keeps STAR routing only through star_hf).
LIBRARY_NAME = {"adapter": "star_hf", "full": "transformers", "folded": "transformers"}
BASE_TAGS = ("moe", "mixture-of-experts", "star-routing", "star_hf")


@dataclass
class CardFacts:
    """What a card says about one STAR model, independent of where it came from."""

    architecture: str
    model_type: str
    auto_class: str
    routers: list[dict[str, Any]]
    router_classes: list[str]
    star_config: dict[str, Any]
    base_model: str | None = None
    pipeline_tag: str | None = None
    metrics_table: str | None = None


def find_template(name: str = TEMPLATE_NAME) -> Path:
    """Path of a card template: ``star_hf/model_cards/`` of a wheel, else ``model_cards/`` of the source tree."""
    package = Path(__file__).resolve().parents[1]  # star_hf/
    for folder in (package / "model_cards", package.parent / "model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"model card template {name!r} is neither in {package / 'model_cards'} (wheel) nor in "
        f"{package.parent / 'model_cards'} (source tree); reinstall star_hf."
    )


def _auto_class_and_pipeline(architecture: str | None, model_type: str | None = None) -> tuple[str, str | None]:
    """The Auto class (and pipeline tag) that loads a model class named ``architecture`` (else: of ``model_type``)."""
    from transformers.models.auto import modeling_auto as ma

    for mapping, auto_class, pipeline in (
        (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM", "text-generation"),
        (ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM", "text2text-generation"),
    ):
        if architecture in mapping.values() or (architecture is None and model_type in mapping):
            return auto_class, pipeline
    return "AutoModel", None


def _router_class_name(model: nn.Module, path: str, router: nn.Module) -> str:
    base = type(router)._star_base_class
    if base is nn.Linear and "." in path:
        # A child nn.Linear gate (Switch's ``classifier``): the architecture's router is its parent.
        parent = model.get_submodule(path.rsplit(".", 1)[0])
        base = getattr(type(parent), "_star_base_class", type(parent))
    return base.__name__


def card_facts_from_model(
    model: nn.Module, *, base_model: str | None = None, metrics_table: str | None = None
) -> CardFacts:
    """Gather the card's facts from a patched (not yet folded) model, or a PEFT / DDP wrapper of one."""
    from star_hf.paths import hf_root
    from star_hf.persistence.adapter import canonical_routers

    routers = canonical_routers(model)  # paths relative to the Transformers model
    if not routers:
        raise ValueError(f"{type(model).__name__} has no STAR routers; patch it with star_hf.patch_model first.")
    _, hf_model = hf_root(model)
    config = hf_model.config
    auto_class, pipeline = _auto_class_and_pipeline(type(hf_model).__name__)
    rows = [
        {
            "path": path,
            "num_experts": int(r.star_mixing.shape[0]),
            "hidden_size": int(r.star_basis.shape[1]),
            "num_components": int(r.star_basis.shape[0]),
        }
        for path, r in routers.items()
    ]
    classes = sorted({_router_class_name(hf_model, p, r) for p, r in routers.items()})
    star_config = next(iter(routers.values())).star_config.to_dict()
    if base_model is None and is_repo_id(getattr(config, "_name_or_path", None)):
        base_model = config._name_or_path
    return CardFacts(
        architecture=type(hf_model).__name__,
        model_type=config.model_type,
        auto_class=auto_class,
        routers=rows,
        router_classes=classes,
        star_config=star_config,
        base_model=base_model,
        pipeline_tag=pipeline,
        metrics_table=metrics_table,
    )


def _read_adapter_folder(folder: str | os.PathLike):
    from star_hf.persistence.adapter import (
        ADAPTER_CONFIG_NAME,
        ADAPTER_WEIGHTS_NAME,
        _read_adapter,
    )

    folder = Path(folder)
    return _read_adapter(folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME)


def adapter_routing_report(folder: str | os.PathLike):
    """(STAR config dict, :class:`star_hf.training.metrics.RoutingReport`) of an adapter folder, from its tensors alone.

    Without the base model nothing can run, so the load columns are empty; s and the basis
    orthonormality come from the saved α and B.
    """
    from star_hf.training.metrics import LayerReport, RoutingReport

    _, star_config, grouped = _read_adapter_folder(folder)
    # Skipped updates are not persisted: a checkpoint loaded by from_pretrained reports 0 too.
    rows = [
        LayerReport.of_tensors(path, t["star_alpha"], t["star_basis"], star_config.gha_only)
        for path, t in grouped.items()
    ]
    return star_config.to_dict(), RoutingReport(rows)


def card_facts_from_adapter(
    folder: str | os.PathLike, *, base_model: str | None = None, metrics_table: str | None = None
) -> CardFacts:
    """Gather the card's facts from a STAR adapter folder (:func:`star_hf.save_adapter` output).

    Both adapter files are read and checked against each other, so a corrupt adapter is refused
    before anything is staged or uploaded.
    """
    meta, star_config, _ = _read_adapter_folder(folder)
    base = meta.get("base_model") or {}
    model_type = base.get("model_type") or "unknown"
    # Models built from a config (not loaded) have no recorded architecture: fall back to the model type.
    architecture = (base.get("architectures") or [None])[0]
    auto_class, pipeline = _auto_class_and_pipeline(architecture, model_type)
    rows = [
        {"path": path, **{k: info[k] for k in ("num_experts", "hidden_size", "num_components")}}
        for path, info in meta["routers"].items()
    ]
    if base_model is None and is_repo_id(base.get("name_or_path")):
        base_model = base["name_or_path"]
    return CardFacts(
        architecture=architecture or f"{model_type} model",
        model_type=model_type,
        auto_class=auto_class,
        routers=rows,
        router_classes=sorted({info.get("class", "?") for info in meta["routers"].values()}),
        star_config=star_config.to_dict(),
        base_model=base_model,
        pipeline_tag=pipeline,
        metrics_table=metrics_table,
    )


def inherited_license(base_model: str | None, local_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """``license`` (and ``license_name``/``license_link``) from the base model's card, when it can be read.

    Looks at ``local_dir/README.md`` first (the folder the model was loaded from), then at the Hub
    card of ``base_model`` unless ``HF_HUB_OFFLINE`` is set. Returns ``{}`` when unknown.
    """
    from huggingface_hub import ModelCard, constants

    candidates: list[str] = []
    if local_dir is not None and (Path(local_dir) / "README.md").is_file():
        candidates.append(str(Path(local_dir) / "README.md"))
    if base_model is not None and is_repo_id(base_model) and not constants.HF_HUB_OFFLINE:
        candidates.append(base_model)
    for source in candidates:
        try:
            data = ModelCard.load(source).data
        except Exception:  # a missing or unreadable card only means "license unknown"
            continue
        found = {k: getattr(data, k, None) for k in ("license", "license_name", "license_link")}
        found = {k: v for k, v in found.items() if v}
        if found:
            return found
    return {}


def render_model_card(
    facts: CardFacts,
    repo_id: str,
    kind: str,
    *,
    license: str | None = None,
    license_fields: dict[str, str] | None = None,
    adapter_size: str | None = None,
):
    """Render the STAR card for ``facts`` as a ``huggingface_hub.ModelCard``.

    ``license`` wins over ``license_fields`` (inherited from the base model); with neither, the
    card has no license field.
    """
    import torch
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    from star_hf._version import __version__

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    licence = {"license": license} if license else dict(license_fields or {})
    tags = list(dict.fromkeys([*BASE_TAGS, facts.model_type]))
    extra: dict[str, Any] = {}
    if kind == "adapter" and facts.base_model:
        extra["base_model_relation"] = "adapter"
    data = ModelCardData(
        base_model=facts.base_model,
        library_name=LIBRARY_NAME[kind],
        pipeline_tag=facts.pipeline_tag,
        tags=tags,
        **licence,
        **extra,
    )
    return ModelCard.from_template(
        data,
        template_path=str(find_template()),
        model_id=repo_id,
        kind=kind,
        architecture=facts.architecture,
        model_type=facts.model_type,
        auto_class=facts.auto_class,
        routers=facts.routers,
        num_routers=len(facts.routers),
        router_classes=facts.router_classes,
        star_config_json=json.dumps(facts.star_config, indent=2, sort_keys=True),
        metrics_table=facts.metrics_table,
        adapter_size=adapter_size,
        star_hf_version=__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
