"""Whole patched checkpoints: ``from_pretrained`` restores one, ``save_pretrained`` writes one atomically.

A patched model's ``save_pretrained`` folder is a normal Transformers checkpoint plus the STAR
tensors: ``config.json`` carries ``star_config``, every router has its ``star_*`` tensors, and the
folded gate W_eff (b_eff) sits under the router's original name. Hence:

* plain Transformers loads it unchanged as the equivalent stock model (the folded gate; eval outputs
  equal to the STAR model's) and lists the ``star_*`` keys as UNEXPECTED in its load report;
* :func:`from_pretrained` loads it with the Auto class — dtype, device_map, sharding and the
  checkpoint's key conversions are all Transformers' own — then patches the routers with the saved
  config and loads the STAR tensors under the same key conversion Transformers applied to the rest.
  Each STAR tensor takes the dtype of its router's gate as Transformers loaded it, so gates kept in
  float32 (``_keep_in_fp32_modules``) keep float32 STAR parameters under ``dtype=torch.bfloat16``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.nn as nn

from star_hf.config import StarConfig
from star_hf.patching.patcher import patch_model
from star_hf.persistence.adapter import (
    ADAPTER_CONFIG_NAME,
    STAR_TENSOR_NAMES,
    canonical_routers,
    check_resident,
    copy_router_tensors,
    router_shapes,
    tensor_problems,
)
from star_hf.persistence.io import CorruptFileError, atomic_directory, read_json

__all__ = ["from_pretrained", "save_pretrained"]

# from_pretrained keyword arguments that locate files (forwarded to the config and file look-ups).
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"


def _add_variant(name: str, variant: str | None) -> str:
    # Transformers' naming of variant files: model.safetensors -> model.<variant>.safetensors
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def is_star_key(key: str) -> bool:
    return key.rpartition(".")[2] in STAR_TENSOR_NAMES


# ------------------------------------------------------------------------------- load report
class _HeldLoadReport(logging.Filter):
    """Holds back this thread's Transformers LOAD REPORT, to show it only if it says more than STAR keys."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() == self.thread and "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextmanager
def _held_load_report() -> Iterator[_HeldLoadReport]:
    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldLoadReport()
    logger.addFilter(held)
    try:
        yield held
    except BaseException:
        logger.removeFilter(held)
        _release(held)
        raise
    finally:
        logger.removeFilter(held)


def _release(held: _HeldLoadReport) -> None:
    logger = logging.getLogger("transformers.modeling_utils")
    for record in held.records:
        logger.handle(record)


def _without_star_keys(info: dict[str, Any]) -> dict[str, Any]:
    info = dict(info)
    info["unexpected_keys"] = type(info["unexpected_keys"])(k for k in info["unexpected_keys"] if not is_star_key(k))
    return info


def _has_findings(info: dict[str, Any]) -> bool:
    return any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))


# ------------------------------------------------------------------------------------ helpers
def _model_class(config: Any, model_class: Any) -> Any:
    """The class to load with: the given one, the checkpoint's own architecture, or an Auto class."""
    if model_class is not None:
        return model_class
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def _not_a_checkpoint(path_or_repo_id: str | os.PathLike) -> None:
    folder = Path(path_or_repo_id)
    if folder.is_dir() and not (folder / "config.json").exists() and (folder / ADAPTER_CONFIG_NAME).exists():
        raise FileNotFoundError(
            f"{folder} is a STAR adapter folder (it has {ADAPTER_CONFIG_NAME}, no config.json): load the base "
            "model with Transformers, then star_hf.load_adapter(base_model, folder)."
        )


def _checkpoint_files(
    path_or_repo_id: str | os.PathLike, hub: dict[str, Any], variant: str | None
) -> tuple[list[str], list[str]]:
    """Names of all safetensors files of the checkpoint, and local paths of those holding STAR tensors."""
    from transformers.utils import cached_file

    def find(name: str) -> str | None:
        return cached_file(path_or_repo_id, name, _raise_exceptions_for_missing_entries=False, **hub)

    index = find(_add_variant(_WEIGHTS_INDEX, variant))
    if index is not None:
        weight_map = read_json(index, "checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptFileError(f"checkpoint index {index} has no 'weight_map'.")
        folder = Path(index).parent
        star_shards = sorted({f for k, f in weight_map.items() if is_star_key(k)})
        return sorted(set(weight_map.values())), [find(f) or str(folder / f) for f in star_shards]
    single = find(_add_variant(_WEIGHTS, variant))
    if single is None:
        raise FileNotFoundError(
            f"{path_or_repo_id} has no {_add_variant(_WEIGHTS, variant)} or {_add_variant(_WEIGHTS_INDEX, variant)}: "
            "star_hf reads STAR tensors from safetensors checkpoints only (it never unpickles .bin files)."
        )
    return [Path(single).name], [single]


def _unreadable(path_or_repo_id: str | os.PathLike, names: list[str], hub: dict[str, Any]) -> list[str]:
    """The checkpoint files that are missing or whose safetensors header does not parse."""
    from safetensors import SafetensorError, safe_open
    from transformers.utils import cached_file

    bad = []
    for name in names:
        try:
            local = cached_file(path_or_repo_id, name, _raise_exceptions_for_missing_entries=False, **hub)
            if local is None:
                bad.append(f"{name} (missing)")
                continue
            with safe_open(local, framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError) as err:
            bad.append(f"{name} ({err})")
    return bad


def _read_star_tensors(files: list[str]) -> dict[str, Any]:
    """Checkpoint key → tensor for every STAR tensor in ``files`` (read lazily, no unpickling)."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, Any] = {}
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"checkpoint shard {file} does not exist (listed in the checkpoint index).")
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if is_star_key(key):
                        found[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CorruptFileError(f"checkpoint shard {file} is not a readable safetensors file ({err}).") from None
    return found


def _to_model_keys(model: nn.Module, checkpoint_keys: list[str]) -> dict[str, str]:
    """Checkpoint key → module key, by the same renamings Transformers applied when it loaded ``model``."""
    try:
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # a Transformers without weight conversions: keys are stored as named
        return {k: k for k in checkpoint_keys}
    conversions = getattr(model, "_weight_conversions", None) or []
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    own = dict.fromkeys((n for n, _ in model.named_parameters()), True)
    own.update(dict.fromkeys((n for n, _ in model.named_buffers()), True))
    return {k: rename_source_key(k, renamings, converters, model.base_model_prefix, own)[0] for k in checkpoint_keys}


# ----------------------------------------------------------------------------------- public API
def from_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    model_class: Any = None,
    allow_unverified: bool = False,
    **auto_kwargs: Any,
) -> nn.Module:
    """Load a checkpoint saved from a patched model, STAR routers included, exactly as it was saved.

    Args:
        path_or_repo_id: a folder written by ``model.save_pretrained`` (or :func:`save_pretrained`) of
            a patched model, or a Hub repo id holding one.
        model_class: the Transformers class to load with (an Auto class or a concrete class). Default:
            the checkpoint's own architecture (``config.architectures``), else ``AutoModelForCausalLM``
            (``AutoModelForSeq2SeqLM`` for encoder-decoders).
        allow_unverified: as in :func:`star_hf.patch_model`.
        **auto_kwargs: passed to ``from_pretrained`` of that class (``dtype``, ``device_map``,
            ``revision``, ``token``, ``output_loading_info``, ...).

    Returns:
        The patched model (with ``output_loading_info=True``: ``(model, loading_info)``, with the
        STAR keys left out of ``unexpected_keys``).
    """
    from transformers import AutoConfig

    _not_a_checkpoint(path_or_repo_id)
    hub = {k: auto_kwargs[k] for k in _HUB_KWARGS if k in auto_kwargs}
    config = auto_kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(
            path_or_repo_id, trust_remote_code=auto_kwargs.get("trust_remote_code", False), **hub
        )
    star_dict = getattr(config, "star_config", None)
    if not isinstance(star_dict, dict):
        raise ValueError(
            f"{path_or_repo_id} has no 'star_config' in its config.json: it was not saved from a patched model. "
            "Load it with Transformers and call star_hf.patch_model(model, StarConfig(...)), or use "
            "star_hf.load_adapter(model, adapter) for a STAR adapter."
        )
    try:
        star_config = StarConfig.from_dict(star_dict)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path_or_repo_id}: invalid star_config in config.json: {err}") from None
    all_files, star_files = _checkpoint_files(path_or_repo_id, hub, auto_kwargs.get("variant"))
    want_info = auto_kwargs.pop("output_loading_info", False)
    cls = _model_class(config, model_class)
    model, info = _load_stock(path_or_repo_id, cls, config, all_files, hub, auto_kwargs)
    _restore_star_routers(model, star_config, star_files, str(path_or_repo_id), allow_unverified)
    return (model, info) if want_info else model


def _load_stock(
    path_or_repo_id: str | os.PathLike, cls: Any, config: Any, all_files: list[str], hub: dict, auto_kwargs: dict
) -> tuple[nn.Module, dict[str, Any]]:
    """Transformers' own load (the folded gates as stock routers), its report held back for STAR keys."""
    try:
        with _held_load_report() as held:
            model, info = cls.from_pretrained(path_or_repo_id, config=config, output_loading_info=True, **auto_kwargs)
    except Exception as err:
        # Transformers' errors for a damaged shard do not say which file it is.
        bad = _unreadable(path_or_repo_id, all_files, hub)
        if bad:
            raise CorruptFileError(f"checkpoint {path_or_repo_id} has unreadable files: {'; '.join(bad)}") from err
        raise
    info = _without_star_keys(info)
    if _has_findings(info):
        _release(held)  # Transformers' report says more than the STAR keys: show it in full
    return model, info


def _restore_star_routers(
    model: nn.Module, star_config: StarConfig, star_files: list[str], source: str, allow_unverified: bool
) -> None:
    """Patch the stock model with the saved config and load the saved STAR tensors into its routers."""
    stored = _read_star_tensors(star_files)
    if not stored:
        raise ValueError(
            f"{source} has a star_config but no STAR tensors: it was re-saved by plain Transformers, which "
            "keeps only the folded gates. Load it as a stock model (transformers' from_pretrained), or patch it anew."
        )
    check_resident(model, star_config)
    patch_model(model, star_config, allow_unverified=allow_unverified)
    routers = canonical_routers(model)
    grouped: dict[str, dict[str, Any]] = {}
    for ckpt_key, model_key in _to_model_keys(model, list(stored)).items():
        path, _, name = model_key.rpartition(".")
        grouped.setdefault(path, {})[name] = stored[ckpt_key]
    problems = [
        f"STAR tensors for {p}, which is not a STAR router of the loaded model" for p in grouped if p not in routers
    ]
    for path, router in routers.items():
        problems += tensor_problems(path, router_shapes(router), grouped.get(path, {}))
    if problems:
        raise CorruptFileError(
            f"the STAR tensors of {source} do not match its star_config and architecture: " + "; ".join(problems)
        )
    for path, router in routers.items():
        copy_router_tensors(router, grouped[path])


def _not_weights(name: str) -> bool:
    """Whether a file of a previous checkpoint folder survives a new save (weights of the old one do not)."""
    return not (name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin", ".index.json")))


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> str:
    """``model.save_pretrained(save_directory, **kwargs)``, atomically.

    The checkpoint is written into a temporary sibling folder and renamed into place once complete,
    so an interrupted save leaves the previous checkpoint intact. Files of an existing folder that
    the save does not write (a tokenizer, a README) are kept; stale weight files are not. With
    ``is_main_process=False`` (the other ranks of a distributed job) nothing is written.
    """
    if not kwargs.get("is_main_process", True):
        return str(save_directory)
    with atomic_directory(save_directory, keep_existing=_not_weights) as tmp:
        model.save_pretrained(tmp, **kwargs)
    return str(save_directory)
