"""Hub push: staged folders, rendered model cards, and the upload call (only the HTTP-level
``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` are replaced; staging runs for real)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from safetensors import safe_open

import star_hf
from star_hf.hub.card import find_template
from star_hf.hub.upload import HubUploadError, push_to_hub, stage_for_hub

from .conftest import tiny_mixtral, tiny_qwen2_moe, tiny_switch

REPO = "someone/star-tiny"
METRICS = "| layer | mean s |\n|---|---|\n| 0 | 0.5 |"


class FakeHub:
    """Stands in for the Hub's HTTP endpoints; keeps a copy of what each upload received."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, snapshot_dir: Path, fail: str | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.snapshot_dir = snapshot_dir
        self.staged_path: Path | None = None
        self.fail = fail
        for name in ("create_repo", "create_branch", "upload_folder"):
            # A plain function (not the bound method) so that the HfApi instance arrives as ``api``.
            monkeypatch.setattr(HfApi, name, lambda api, *a, _name=name, **k: getattr(self, _name)(api, *a, **k))

    def _maybe_fail(self, name: str) -> None:
        if self.fail == name:
            raise ConnectionError(f"simulated network failure in {name}")

    def create_repo(self, api: HfApi, repo_id: str, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, "token": api.token, **kwargs}))
        self._maybe_fail("create_repo")
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, api: HfApi, repo_id: str, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail("create_branch")

    def upload_folder(self, api: HfApi, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.staged_path = Path(kwargs["folder_path"])
        shutil.copytree(self.staged_path, self.snapshot_dir)
        self._maybe_fail("upload_folder")
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def _patched(build=tiny_mixtral):
    model = build()
    star_hf.patch_model(model, star_hf.StarConfig(seed=3))
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


def test_template_is_the_top_level_model_cards_file():
    path = find_template()
    assert path == Path(__file__).resolve().parent.parent / "model_cards" / "star_model_card.md.j2"
    assert "{{ card_data }}" in path.read_text()


@pytest.mark.parametrize("kind", ["adapter", "full", "folded"])
def test_stage_writes_weights_config_and_card(tmp_path, kind):
    model = _patched()
    before = _state(model)
    folder = stage_for_hub(
        model, tmp_path / "staged", kind, repo_id=REPO, base_model="org/tiny-mixtral", license="mit", metrics=METRICS
    )
    files = {p.name for p in folder.iterdir()}
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()

    # metadata parses and says what HF expects
    assert data["base_model"] == "org/tiny-mixtral"
    assert data["license"] == "mit"
    assert {"moe", "star-routing", "mixtral"} <= set(data["tags"])
    assert data["library_name"] == ("star_hf" if kind == "adapter" else "transformers")
    assert data["pipeline_tag"] == "text-generation"
    assert (data.get("base_model_relation") == "adapter") == (kind == "adapter")
    # required sections
    for section in ("## What was patched", "## How to use", "## Routing metrics", "## Citation"):
        assert section in card.text
    assert "2606.08814" in card.text and "Park, Sumin and Park, Noseong" in card.text
    assert METRICS in card.text
    assert "model.layers.0.mlp.gate" in card.text and "MixtralTopKRouter" in card.text
    assert '"seed": 3' in card.text  # the STAR config
    # one loading code block, the one of this kind
    assert card.text.count("```python") == 1
    assert ("star_hf.load_adapter(base" in card.text) == (kind == "adapter")
    assert ('star_hf.from_pretrained("someone/star-tiny")' in card.text) == (kind == "full")
    assert ('AutoModelForCausalLM.from_pretrained("someone/star-tiny")' in card.text) == (kind == "folded")

    if kind == "adapter":
        assert files == {"README.md", "star_config.json", "star_adapter.safetensors"}
        meta = json.loads((folder / "star_config.json").read_text())
        assert meta["base_model"]["name_or_path"] == "org/tiny-mixtral"
    else:
        config = json.loads((folder / "config.json").read_text())
        assert ("star_config" in config) == (kind == "full")
        assert any(k.endswith("star_basis") for k in _keys(folder)) == (kind == "full")
    # the user's model is untouched (folded kind folds a copy)
    assert len(star_hf.find_star_routers(model)) == 2
    assert model.config.star_config["seed"] == 3
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_folded_stage_loads_in_plain_transformers_with_equal_outputs(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model = _patched()
    with torch.no_grad():
        for router in star_hf.find_star_routers(model).values():  # move away from the preserving init
            router.star_alpha.add_(0.7)
            router.star_basis.copy_(torch.linalg.qr(torch.randn(32, 4))[0].t())
        expected = model(input_ids).logits
    folder = stage_for_hub(model, tmp_path / "folded", "folded", metrics=False)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not star_hf.find_star_routers(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, expected, rtol=0, atol=1e-5)


def test_switch_card_uses_seq2seq_class(tmp_path):
    model = _patched(tiny_switch)
    folder = stage_for_hub(model, tmp_path / "s", "folded", repo_id=REPO, metrics=False)
    card = ModelCard.load(folder / "README.md")
    assert 'AutoModelForSeq2SeqLM.from_pretrained("someone/star-tiny")' in card.text
    assert "SwitchTransformersTop1Router" in card.text
    assert "encoder.block.1.layer.1.mlp.router.classifier" in card.text
    assert card.data.pipeline_tag == "text2text-generation"
    assert "## Routing metrics" not in card.text  # metrics=False leaves the section out


def test_push_uploads_the_staged_folder(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path / "uploaded")
    model = _patched(tiny_qwen2_moe)
    info = push_to_hub(
        model,
        REPO,
        "adapter",
        private=True,
        token="hf_test",
        revision="star",
        commit_message="add STAR",
        metrics=METRICS,
        license="apache-2.0",
    )
    assert info.commit_url.endswith("/commit/abc")
    assert hub.names() == ["create_repo", "create_branch", "upload_folder"]
    create = hub.calls[0][1]
    assert create["repo_id"] == REPO and create["private"] is True and create["exist_ok"] is True
    assert create["token"] == "hf_test"
    assert hub.calls[1][1]["branch"] == "star"
    upload = hub.calls[2][1]
    assert upload["repo_id"] == REPO and upload["revision"] == "star" and upload["commit_message"] == "add STAR"
    uploaded = {p.name for p in (tmp_path / "uploaded").iterdir()}
    assert uploaded == {"README.md", "star_config.json", "star_adapter.safetensors"}
    card = ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.license == "apache-2.0" and "qwen2_moe" in card.data.tags
    # the adapter that was uploaded restores the routers on a fresh base model
    base = tiny_qwen2_moe()
    star_hf.load_adapter(base, tmp_path / "uploaded")
    for (path, a), b in zip(star_hf.find_star_routers(model).items(), star_hf.find_star_routers(base).values()):
        assert torch.equal(a.star_basis, b.star_basis), path
    # the staging folder was temporary
    assert not hub.staged_path.exists()


@pytest.mark.parametrize("fail", ["create_repo", "upload_folder"])
def test_failed_upload_changes_nothing_and_says_what_failed(tmp_path, monkeypatch, fail):
    hub = FakeHub(monkeypatch, tmp_path / "uploaded", fail=fail)
    model = _patched()
    before = _state(model)
    user_dir = tmp_path / "mine"
    star_hf.save_adapter(model, user_dir)
    user_files = {p.name: p.read_bytes() for p in user_dir.iterdir()}
    temp_before = set(Path(tempfile.gettempdir()).glob("star_hf_push_*"))

    with pytest.raises(HubUploadError) as info:
        push_to_hub(model, REPO, "full", metrics=False)
    message = str(info.value)
    step = "creating the Hub repository" if fail == "create_repo" else "uploading"
    assert step in message and REPO in message and "simulated network failure" in message
    assert "Nothing local was changed" in message and "was removed" in message
    # nothing local changed: model, the user's folder, no staging debris
    assert len(star_hf.find_star_routers(model)) == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {p.name: p.read_bytes() for p in user_dir.iterdir()} == user_files
    assert set(Path(tempfile.gettempdir()).glob("star_hf_push_*")) == temp_before
    assert (hub.staged_path is None) == (fail == "create_repo")


def test_bad_arguments_fail_before_any_call(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path / "uploaded")
    model = _patched()
    with pytest.raises(ValueError, match="kind must be one of"):
        push_to_hub(model, REPO, "merged")
    with pytest.raises(ValueError, match="invalid Hub repository id"):
        push_to_hub(model, "not a/valid/id", "adapter")
    with pytest.raises(ValueError, match="no STAR routers"):
        push_to_hub(tiny_mixtral(), REPO, "full", metrics=False)
    with pytest.raises(ValueError, match="only be pushed as kind='adapter'"):
        push_to_hub(tmp_path, REPO, "full")
    assert hub.calls == []


def test_license_inherited_from_the_base_checkpoint_card(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny_mixtral().save_pretrained(base_dir)
    (base_dir / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n# base\n"
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    star_hf.patch_model(model)
    inherited = ModelCard.load(stage_for_hub(model, tmp_path / "a", "adapter", metrics=False) / "README.md").data
    assert (inherited.license, inherited.license_name, inherited.license_link) == ("other", "tiny-license", "LICENSE")
    assert inherited.base_model is None  # a local path is no Hub id
    explicit = ModelCard.load(
        stage_for_hub(model, tmp_path / "b", "adapter", metrics=False, license="mit") / "README.md"
    ).data
    assert explicit.license == "mit" and getattr(explicit, "license_name", None) is None


def test_push_an_adapter_folder(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path / "uploaded")
    adapter_dir = tmp_path / "adapter"
    star_hf.save_adapter(_patched(tiny_switch), adapter_dir, base_model_name_or_path="org/tiny-switch")
    original = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}
    push_to_hub(adapter_dir, REPO, "adapter", metrics=False)
    assert hub.names() == ["create_repo", "upload_folder"]
    uploaded = tmp_path / "uploaded"
    assert {p.name for p in uploaded.iterdir()} == set(original) | {"README.md"}
    assert all((uploaded / name).read_bytes() == data for name, data in original.items())
    assert {p.name: p.read_bytes() for p in adapter_dir.iterdir()} == original  # README not added to the user's folder
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.base_model == "org/tiny-switch" and "AutoModelForSeq2SeqLM" in card.text


def test_corrupt_adapter_folder_is_refused_before_upload(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path / "uploaded")
    adapter_dir = tmp_path / "adapter"
    star_hf.save_adapter(_patched(), adapter_dir)
    (adapter_dir / "star_adapter.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(star_hf.CorruptFileError, match="star_adapter.safetensors"):
        push_to_hub(adapter_dir, REPO, "adapter", metrics=False)
    assert hub.calls == []


def test_default_metrics_table_is_the_routing_report(tmp_path, input_ids):
    model = _patched()
    monitor = star_hf.RoutingMonitor(model)
    with torch.no_grad():
        model(input_ids)  # 2 × 12 tokens through each router
    card = ModelCard.load(stage_for_hub(model, tmp_path / "m", "full") / "README.md")
    assert star_hf.routing_report(model).to_markdown().strip() in card.text
    monitor.close()
    metrics = card.text.split("## Routing metrics")[1]
    row = next(line for line in metrics.splitlines() if line.startswith("| `model.layers.1.mlp.gate`"))
    assert row.split("|")[4].strip() == "24"  # tokens counted by the monitor
