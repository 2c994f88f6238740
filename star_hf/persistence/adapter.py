"""STAR adapters: only what STAR adds to a base model, in two small files.

``save_adapter`` writes ``star_config.json`` (the :class:`StarConfig`, the base model's identity and
shape, and every router's path and size) and ``star_adapter.safetensors`` (W, b, M, α and B of every
STAR router, keyed ``<router path>.<name>`` in the in-memory module naming of the Transformers model).
That is megabytes for a model of gigabytes. ``load_adapter`` checks that a stock base model matches
— architecture, hidden size, layer count, router paths, expert counts — before touching it, then
patches it and loads the tensors.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from star_hf.config import StarConfig
from star_hf.errors import AdapterMismatchError, NotPatchedError
from star_hf.patching.discovery import scan_routers
from star_hf.patching.patcher import find_star_routers, patch_model
from star_hf.paths import canonical_path, hf_root, is_repo_id
from star_hf.persistence.io import (
    CorruptFileError,
    atomic_directory,
    read_json,
    read_safetensors,
    write_json,
)
from star_hf.router.star_router import (
    STAR_BUFFER_NAMES,
    STAR_PARAMETER_NAMES,
    StarRouterMixin,
)

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "load_adapter", "save_adapter"]

ADAPTER_CONFIG_NAME = "star_config.json"
ADAPTER_WEIGHTS_NAME = "star_adapter.safetensors"
_FORMAT = "star_hf.persistence.adapter"
_FORMAT_VERSION = 1
STAR_TENSOR_NAMES = STAR_PARAMETER_NAMES + STAR_BUFFER_NAMES
# Config fields that only shape the initial tensors, which a load overwrites.
_INIT_ONLY_FIELDS = ("init", "seed")
_ROUTER_FIELDS = ("num_experts", "hidden_size", "num_components")


# ------------------------------------------------------------------------------ paths and shapes
def canonical_routers(model: nn.Module) -> "OrderedDict[str, StarRouterMixin]":
    """Canonical path → STAR router (the copies the forward runs)."""
    prefix, _ = hf_root(model)
    return OrderedDict((canonical_path(p, prefix), r) for p, r in find_star_routers(model).items())


def expected_shapes(
    num_experts: int, hidden_size: int, num_components: int, has_bias: bool
) -> dict[str, tuple[int, ...]]:
    """Name → shape of the tensors of one STAR router."""
    shapes = {
        "star_linear_weight": (num_experts, hidden_size),
        "star_mixing": (num_experts, num_components),
        "star_alpha": (num_experts,),
        "star_basis": (num_components, hidden_size),
    }
    if has_bias:
        shapes["star_linear_bias"] = (num_experts,)
    return shapes


def router_shapes(router: StarRouterMixin) -> dict[str, tuple[int, ...]]:
    e, d = router.star_linear_weight.shape
    return expected_shapes(e, d, router.star_mixing.shape[1], router.star_linear_bias is not None)


def router_tensors(router: StarRouterMixin) -> dict[str, torch.Tensor]:
    """The STAR tensors of one router (name → tensor), without the absent bias."""
    return {n: t for n in STAR_TENSOR_NAMES if (t := getattr(router, n)) is not None}


def group_by_router(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<path>.<star name>": t}`` → ``{path: {star name: t}}`` (other keys are ignored)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, _, name = key.rpartition(".")
        if name in STAR_TENSOR_NAMES:
            grouped.setdefault(path, {})[name] = tensor
    return grouped


def tensor_problems(where: str, shapes: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> list[str]:
    """What is missing, extra or mis-shaped in one router's tensors (empty when they fit)."""
    problems = [f"{where}: missing {n}" for n in shapes if n not in tensors]
    problems += [f"{where}: unexpected {n}" for n in tensors if n not in shapes]
    problems += [
        f"{where}.{n}: shape {tuple(t.shape)}, expected {shapes[n]}"
        for n, t in tensors.items()
        if n in shapes and tuple(t.shape) != shapes[n]
    ]
    return problems


def check_resident(model: nn.Module, star_config: StarConfig) -> None:
    """Refuse routers that a device_map offloaded (meta weights): tensors copied into them would be lost."""
    offloaded = [p for p, r in find_star_routers(model).items() if r.star_linear_weight.is_meta]
    sites = [s for s in scan_routers(model)[0] if not isinstance(s.gate, StarRouterMixin)]
    selected = [s for s in sites if star_config.selects(s.path) or star_config.selects(s.router_path)]
    offloaded += [s.path for s in selected if s.gate.weight.is_meta]
    if offloaded:
        raise ValueError(
            f"routers {offloaded} were offloaded by the device_map (their weights stay on the meta device); STAR "
            "routers must be resident. Use a device_map that keeps the routers on a device (e.g. device_map='cpu')."
        )


def copy_router_tensors(router: StarRouterMixin, tensors: dict[str, torch.Tensor]) -> None:
    """Load checked tensors into a STAR router, keeping each tensor's own dtype (basis: float32) and device."""
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(router, name).copy_(value)
    router.star_reset_statistics()


# ------------------------------------------------------------------------------------- saving
def _model_summary(hf_model: nn.Module) -> dict[str, Any]:
    config = hf_model.config
    return {
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or [type(hf_model).__name__]),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
    }


def _adapter_metadata(
    model: nn.Module,
    routers: "OrderedDict[str, StarRouterMixin]",
    star_config: StarConfig,
    base_model_name_or_path: str | None,
    revision: str | None,
) -> dict[str, Any]:
    """The content of ``star_config.json``: format, STAR config, base model identity and routers."""
    from star_hf._version import __version__

    _, hf_model = hf_root(model)
    base = {
        "name_or_path": base_model_name_or_path or getattr(hf_model.config, "_name_or_path", "") or None,
        "revision": revision,
        **_model_summary(hf_model),
    }
    routers_info = {
        path: {
            "class": type(router)._star_base_class.__name__,
            "num_experts": router.star_linear_weight.shape[0],
            "hidden_size": router.star_linear_weight.shape[1],
            "num_components": router.star_mixing.shape[1],
            "bias": router.star_linear_bias is not None,
        }
        for path, router in routers.items()
    }
    return {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "star_hf_version": __version__,
        "star_config": star_config.to_dict(),
        "base_model": base,
        "routers": routers_info,
    }


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
) -> str:
    """Save the STAR routers of ``model`` as a small adapter folder (atomically).

    Args:
        model: a patched model (or a PEFT / DDP wrapper of one).
        save_directory: the adapter folder. Files of an existing folder other than the two adapter
            files are kept.
        base_model_name_or_path: the base checkpoint the adapter applies to (default: the name the
            model was loaded from, ``model.config._name_or_path``).
        revision: the base checkpoint's revision (commit, branch or tag), recorded for reproducibility.

    Returns:
        The path of the adapter folder.
    """
    routers = canonical_routers(model)
    if not routers:
        raise NotPatchedError(f"{type(model).__name__} has no STAR routers to save (was it patched?).")
    configs = {r.star_config.to_json_string(): r.star_config for r in routers.values()}
    if len(configs) > 1:
        raise ValueError("the STAR routers of this model carry different StarConfigs; an adapter holds one config.")
    meta = _adapter_metadata(model, routers, next(iter(configs.values())), base_model_name_or_path, revision)
    tensors = {
        f"{path}.{name}": tensor.detach().to("cpu").contiguous()
        for path, router in routers.items()
        for name, tensor in router_tensors(router).items()
    }
    from safetensors.torch import save_file

    with atomic_directory(save_directory, keep_existing=True) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt", "star_hf": _FORMAT})
        write_json(tmp / ADAPTER_CONFIG_NAME, meta)
    return str(save_directory)


# ------------------------------------------------------------------------------------ loading
def _adapter_files(dir_or_repo_id: str | os.PathLike, revision: str | None, hub_kwargs: dict) -> tuple[Path, Path]:
    """Local paths of the two adapter files: from a folder, or downloaded from a Hub repo."""
    local = Path(dir_or_repo_id)
    if local.is_dir():
        sub = hub_kwargs.get("subfolder") or ""
        return local / sub / ADAPTER_CONFIG_NAME, local / sub / ADAPTER_WEIGHTS_NAME
    text = str(dir_or_repo_id)
    if local.exists() or not is_repo_id(text):
        raise FileNotFoundError(f"{text} is not a STAR adapter folder (nor a Hub repo id of the form 'owner/name').")
    import huggingface_hub

    paths = []
    for filename in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        try:
            paths.append(Path(huggingface_hub.hf_hub_download(text, filename, revision=revision, **hub_kwargs)))
        except Exception as err:  # huggingface_hub raises many types (offline, 404, auth, HTTP)
            raise OSError(
                f"{text!r} is not a local folder, and downloading {filename} from the Hugging Face Hub repo {text!r}"
                f"{f' (revision {revision})' if revision else ''} failed: {type(err).__name__}: {err}"
            ) from err
    return paths[0], paths[1]


def _read_adapter(
    config_file: Path, weights_file: Path
) -> tuple[dict[str, Any], StarConfig, dict[str, dict[str, torch.Tensor]]]:
    meta = read_json(config_file, "STAR adapter config")
    if meta.get("format") != _FORMAT or not isinstance(meta.get("routers"), dict) or "star_config" not in meta:
        raise CorruptFileError(
            f"{config_file} is not a star_hf adapter config (expected keys 'format': {_FORMAT!r}, 'star_config', "
            "'routers'). A whole patched checkpoint loads with star_hf.from_pretrained instead."
        )
    if meta.get("format_version", 0) > _FORMAT_VERSION:
        raise CorruptFileError(
            f"{config_file} has adapter format version {meta['format_version']}, newer than this star_hf supports "
            f"({_FORMAT_VERSION}); upgrade star_hf."
        )
    try:
        star_config = StarConfig.from_dict(meta["star_config"])
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"{config_file}: invalid star_config: {err}") from None
    for path, info in meta["routers"].items():
        fields_ok = isinstance(info, dict) and all(isinstance(info.get(k), int) for k in _ROUTER_FIELDS)
        if not fields_ok or not isinstance(info.get("bias"), bool):
            raise CorruptFileError(
                f"{config_file}: router {path!r} must list {', '.join(_ROUTER_FIELDS)} (integers) "
                "and bias (true/false)."
            )
    tensors, _ = read_safetensors(weights_file, "STAR adapter weights")
    grouped = group_by_router(tensors)
    problems = [f"tensors for router {p}, which the config does not list" for p in grouped if p not in meta["routers"]]
    for path, info in meta["routers"].items():
        shapes = expected_shapes(info["num_experts"], info["hidden_size"], info["num_components"], info["bias"])
        problems += tensor_problems(path, shapes, grouped.get(path, {}))
    if problems:
        raise CorruptFileError(
            f"{weights_file} does not match {config_file.name} (were they saved together?): " + "; ".join(problems)
        )
    return meta, star_config, grouped


def _compare(what: str, adapter_value: Any, model_value: Any, differences: list[str]) -> None:
    if adapter_value is not None and model_value is not None and adapter_value != model_value:
        differences.append(f"{what}: adapter {adapter_value!r}, model {model_value!r}")


def _base_differences(model: nn.Module, meta: dict[str, Any]) -> list[str]:
    """How the model's architecture, hidden size and layer count differ from the adapter's base."""
    _, hf_model = hf_root(model)
    differences: list[str] = []
    base = meta.get("base_model", {})
    summary = _model_summary(hf_model)
    _compare("architecture (model_type)", base.get("model_type"), summary["model_type"], differences)
    _compare("hidden size", base.get("hidden_size"), summary["hidden_size"], differences)
    _compare("number of layers", base.get("num_hidden_layers"), summary["num_hidden_layers"], differences)
    return differences


def _stock_differences(model: nn.Module, meta: dict[str, Any], star_config: StarConfig) -> list[str]:
    """Every way a stock model differs from what the adapter was saved from."""
    differences = _base_differences(model, meta)
    prefix, _ = hf_root(model)
    sites, _ = scan_routers(model)
    sites = {
        canonical_path(s.path, prefix): s
        for s in sites
        if star_config.selects(s.path) or star_config.selects(s.router_path)
    }
    routers = meta["routers"]
    missing = [p for p in routers if p not in sites]
    extra = [p for p in sites if p not in routers]
    if missing:
        differences.append(f"router paths in the adapter but not in the model: {missing}")
    if extra:
        differences.append(f"routers the adapter's config selects in the model but the adapter lacks: {extra}")
    for path, info in routers.items():
        site = sites.get(path)
        if site is None:
            continue
        _compare(f"{path} expert count", info["num_experts"], site.num_experts, differences)
        _compare(f"{path} hidden size", info["hidden_size"], site.hidden_size, differences)
        _compare(f"{path} gate bias", info["bias"], site.has_bias, differences)
        _compare(f"{path} gate class", info.get("class"), type(site.gate).__name__, differences)
    return differences


def _patched_differences(model: nn.Module, meta: dict[str, Any], star_config: StarConfig) -> list[str]:
    """Every way an already patched model differs from the adapter (config and routers)."""
    routers = canonical_routers(model)
    current = next(iter(routers.values())).star_config.to_dict()
    wanted = star_config.to_dict()
    differences = _base_differences(model, meta)
    differences += [
        f"StarConfig.{k}: adapter {wanted[k]!r}, model {current[k]!r}"
        for k in wanted
        if k not in _INIT_ONLY_FIELDS and wanted[k] != current.get(k)
    ]
    missing = [p for p in meta["routers"] if p not in routers]
    extra = [p for p in routers if p not in meta["routers"]]
    if missing:
        differences.append(f"STAR routers in the adapter but not in the model: {missing}")
    if extra:
        differences.append(f"STAR routers in the model but not in the adapter: {extra}")
    if differences:  # shapes follow from the config and paths; name them only when those agree
        return differences
    for path, info in meta["routers"].items():
        shapes = expected_shapes(info["num_experts"], info["hidden_size"], info["num_components"], info["bias"])
        if shapes != router_shapes(routers[path]):
            differences.append(f"{path}: adapter shapes {shapes}, model {router_shapes(routers[path])}")
    return differences


def load_adapter(
    base_model: nn.Module,
    dir_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_unverified: bool = False,
    **hub_kwargs: Any,
) -> nn.Module:
    """Patch ``base_model`` with the STAR routers of an adapter and load their tensors.

    Args:
        base_model: the stock base model the adapter was trained on (or a wrapper of it). A model
            that is already patched is accepted when its STAR config and routers equal the
            adapter's (apart from the initialisation fields); the adapter's tensors then replace
            the routers' current ones.
        dir_or_repo_id: a local adapter folder, or a Hugging Face Hub repo id.
        revision: the Hub revision to download (ignored for a local folder).
        allow_unverified: as in :func:`star_hf.patch_model`.
        **hub_kwargs: passed to ``huggingface_hub.hf_hub_download`` (``token``, ``cache_dir``,
            ``subfolder``, ``local_files_only``, ...).

    Returns:
        ``base_model``, patched in place. Every check (files, architecture, shapes) runs before it
        is modified; a mismatch raises :class:`AdapterMismatchError` listing what differs.
    """
    config_file, weights_file = _adapter_files(dir_or_repo_id, revision, hub_kwargs)
    meta, star_config, grouped = _read_adapter(config_file, weights_file)
    source = str(dir_or_repo_id)
    if find_star_routers(base_model):
        differences = _patched_differences(base_model, meta, star_config)
        if differences:
            raise AdapterMismatchError(
                f"the model is already patched, and its STAR routers differ from adapter {source}: "
                + "; ".join(differences)
                + ". Load the adapter into a stock base model, or star_hf.fold(model) first."
            )
        check_resident(base_model, star_config)
        routers = canonical_routers(base_model)
    else:
        differences = _stock_differences(base_model, meta, star_config)
        if differences:
            name = meta.get("base_model", {}).get("name_or_path")
            raise AdapterMismatchError(
                f"STAR adapter {source} does not fit this {type(base_model).__name__}"
                f"{f' (it was saved from {name!r})' if name else ''}: " + "; ".join(differences) + "."
            )
        check_resident(base_model, star_config)
        patch_model(base_model, star_config, allow_unverified=allow_unverified)
        routers = canonical_routers(base_model)
    for path, router in routers.items():
        copy_router_tensors(router, grouped[path])
    return base_model
