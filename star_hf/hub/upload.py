"""Sharing STAR models on the Hugging Face Hub: stage a folder (weights, config, model card), upload it.

Three kinds of upload:

* ``"adapter"``: :func:`star_hf.save_adapter` output — only the router tensors STAR adds or changes;
* ``"full"``: ``save_pretrained`` of the patched model (STAR tensors plus the folded gates);
* ``"folded"``: ``save_pretrained`` of a folded *copy* — a stock checkpoint any serving stack loads.

Everything is written to a temporary staging folder first and uploaded with ``HfApi.create_repo``
and ``HfApi.upload_folder``; the user's model and folders are never modified, also when the upload
fails. This module knows nothing of training: it reads the model as it is.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from star_hf.errors import HubUploadError
from star_hf.hub.card import (
    KINDS,
    card_facts_from_model,
    inherited_license,
    render_model_card,
)
from star_hf.paths import check_repo_id
from star_hf.persistence.text import format_bytes

__all__ = ["push_to_hub", "stage_for_hub", "upload_staged_folder"]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def _hf_model(model: nn.Module, kind: str):
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    raise TypeError(
        f"kind={kind!r} saves the model with save_pretrained, which needs a Transformers PreTrainedModel; "
        f"got {type(model).__name__}. For a PEFT model merge it first (model.merge_and_unload()), "
        "or push only the STAR routers with kind='adapter'."
    )


def _metrics_table(source: nn.Module | str | os.PathLike, metrics: Any) -> str | None:
    """Markdown for the card's routing-metrics section (``None``: leave the section out)."""
    if metrics is False:
        return None
    if metrics is None:
        from star_hf.hub.card import adapter_routing_report
        from star_hf.training.metrics import routing_report

        metrics = adapter_routing_report(source)[1] if _is_folder(source) else routing_report(source)
    if isinstance(metrics, str):
        return metrics.strip() or None
    if hasattr(metrics, "to_markdown"):
        return metrics.to_markdown().strip() or None
    raise TypeError(
        f"metrics must be None (computed with star_hf.routing_report), False (no metrics section), a markdown "
        f"string or a report with to_markdown(); got {type(metrics).__name__}."
    )


def _is_folder(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _write_weights(
    model: nn.Module, folder: Path, kind: str, base_model: str | None, base_model_revision: str | None
) -> None:
    if kind == "adapter":
        from star_hf.persistence.adapter import save_adapter

        save_adapter(model, folder, base_model_name_or_path=base_model, revision=base_model_revision)
    elif kind == "full":
        _hf_model(model, kind).save_pretrained(folder)
    else:
        from star_hf.patching.patcher import fold

        # Folding is in place: fold a copy so the caller's model keeps its STAR routers.
        fold(copy.deepcopy(_hf_model(model, kind))).save_pretrained(folder)


def _copy_adapter_folder(source: Path, folder: Path) -> None:
    from star_hf.persistence.adapter import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        shutil.copy2(source / name, folder / name)


def _stage_into(
    source: nn.Module | str | os.PathLike,
    folder: Path,
    kind: str,
    repo_id: str,
    *,
    base_model: str | None,
    base_model_revision: str | None,
    license: str | None,
    metrics: Any,
    tokenizer: Any,
) -> None:
    """Write weights, config, tokenizer and README.md of ``source`` into the empty ``folder``."""
    from star_hf.hub.card import card_facts_from_adapter

    if _is_folder(source):
        if kind != "adapter":
            raise ValueError(
                f"a folder can only be pushed as kind='adapter' (a STAR adapter folder); got kind={kind!r}. "
                "Load a checkpoint first (star_hf.from_pretrained) to push it as 'full' or 'folded'."
            )
        facts = card_facts_from_adapter(source, base_model=base_model, metrics_table=_metrics_table(source, metrics))
        _copy_adapter_folder(Path(source), folder)
        local_dir = None
    else:
        facts = card_facts_from_model(source, base_model=base_model, metrics_table=_metrics_table(source, metrics))
        _write_weights(source, folder, kind, facts.base_model, base_model_revision)
        if tokenizer is not None and kind != "adapter":
            tokenizer.save_pretrained(folder)
        local_dir = getattr(getattr(source, "config", None), "_name_or_path", None) or None
    card = render_model_card(
        facts,
        repo_id,
        kind,
        license=license,
        license_fields=None if license else inherited_license(facts.base_model, local_dir),
        adapter_size=format_bytes(sum(p.stat().st_size for p in folder.glob("*.safetensors")))
        if kind == "adapter"
        else None,
    )
    card.save(folder / "README.md")


def stage_for_hub(
    model: nn.Module | str | os.PathLike,
    directory: str | os.PathLike,
    kind: str = "adapter",
    *,
    repo_id: str = "star-model",
    base_model: str | None = None,
    base_model_revision: str | None = None,
    license: str | None = None,
    metrics: Any = None,
    tokenizer: Any = None,
) -> Path:
    """Write exactly the folder :func:`push_to_hub` would upload into ``directory``, without uploading.

    Useful to review the model card or to upload by other means. ``directory`` must not exist yet;
    it is written atomically. Arguments as in :func:`push_to_hub`; ``repo_id`` only names the model
    in the card. Returns the folder's path.
    """
    from star_hf.persistence.io import atomic_directory

    _check_kind(kind)
    target = Path(directory)
    if target.exists():
        raise FileExistsError(f"{target} already exists; stage_for_hub writes a new folder (choose another path).")
    options = {
        "base_model": base_model,
        "base_model_revision": base_model_revision,
        "license": license,
        "metrics": metrics,
    }
    with atomic_directory(target) as tmp:
        _stage_into(model, Path(tmp), kind, repo_id, tokenizer=tokenizer, **options)
    return target


def upload_staged_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create ``repo_id`` if needed and upload ``folder`` in one commit. Returns the ``CommitInfo``.

    Raises :class:`HubUploadError` naming the step that failed (creating the repository, the
    branch, or uploading the files).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    api = HfApi(token=token)
    step = f"creating the Hub repository {repo_id!r}"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision is not None:
            step = f"creating branch {revision!r} of {repo_id!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = f"uploading {len(files)} file(s) ({', '.join(files)}) to {repo_id!r}"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except Exception as err:
        raise HubUploadError(f"{step} failed: {type(err).__name__}: {err}") from err


def push_to_hub(
    model: nn.Module | str | os.PathLike,
    repo_id: str,
    kind: str = "adapter",
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
    metrics: Any = None,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    tokenizer: Any = None,
):
    """Stage a STAR model (weights, config, model card) and upload it to the Hub repository ``repo_id``.

    Args:
        model: a model patched with :func:`star_hf.patch_model` (trained or not; it is not modified),
            or the path of a STAR adapter folder (:func:`star_hf.save_adapter` output, ``kind="adapter"``).
        repo_id: ``"user/name"``; created (with ``private``) if it does not exist.
        kind: ``"adapter"`` (STAR router tensors only, loaded with :func:`star_hf.load_adapter`),
            ``"full"`` (the patched model, loaded with :func:`star_hf.from_pretrained`) or ``"folded"``
            (a stock checkpoint of a folded copy, loaded by plain Transformers).
        private, token, commit_message, revision, create_pr: passed to ``huggingface_hub``.
            ``revision`` is the branch to commit to (created if missing).
        license: the card's license; by default inherited from the base model's card when known.
        metrics: the card's routing-metrics table: ``None`` computes :func:`star_hf.routing_report`
            (for an adapter folder: s and basis orthonormality from its tensors), ``False`` leaves it
            out; or a markdown string / a report with ``to_markdown()``.
        base_model: the base model's Hub id for the card metadata and the adapter (default: the
            ``_name_or_path`` of the model's config when it is a Hub id).
        base_model_revision: the base model's revision, recorded in the adapter.
        tokenizer: saved next to a ``"full"`` or ``"folded"`` checkpoint.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the upload.

    Raises:
        HubUploadError: creating the repository or uploading failed. The staged folder (a temporary
            directory) is removed; the model and the user's files are unchanged.
    """
    _check_kind(kind)
    check_repo_id(repo_id)
    staging = Path(tempfile.mkdtemp(prefix="star_hf_push_"))
    try:
        folder = stage_for_hub(
            model,
            staging / "repo",
            kind,
            repo_id=repo_id,
            base_model=base_model,
            base_model_revision=base_model_revision,
            license=license,
            metrics=metrics,
            tokenizer=tokenizer,
        )
        try:
            return upload_staged_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message or f"Upload STAR {kind} with star_hf",
                revision=revision,
                create_pr=create_pr,
            )
        except HubUploadError as err:
            raise HubUploadError(
                f"push_to_hub(kind={kind!r}) to {repo_id!r}: {err}. Nothing local was changed: the model is as it was, "
                f"and the staged copy ({staging}) was removed. Check the token, the network and the repository "
                "permissions, then push again."
            ) from err.__cause__
    finally:
        shutil.rmtree(staging, ignore_errors=True)
