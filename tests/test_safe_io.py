"""star_hf.persistence.io: atomic folder writes and readers that name the file they refuse."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from star_hf.errors import CorruptFileError, StarError
from star_hf.persistence.io import atomic_directory, read_json, read_safetensors, write_json


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_new_folder_appears_complete(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        assert not (tmp_path / "out").exists() and tmp.parent == tmp_path
        write_json(tmp / "a.json", {"x": 1})
    assert read_json(tmp_path / "out" / "a.json") == {"x": 1} and _hidden(tmp_path) == []


def test_a_failed_write_leaves_the_previous_folder_as_it_was(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        write_json(tmp / "a.json", {"v": 1})
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(tmp_path / "out") as tmp:
        write_json(tmp / "a.json", {"v": 2})
        raise RuntimeError("boom")
    assert read_json(tmp_path / "out" / "a.json") == {"v": 1} and _hidden(tmp_path) == []


@pytest.mark.parametrize("keep", [False, True])
def test_replacing_keeps_other_files_only_when_asked(tmp_path, keep):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("mine")
    (tmp_path / "out" / "a.json").write_text("{}")
    with atomic_directory(tmp_path / "out", keep_existing=keep) as tmp:
        write_json(tmp / "a.json", {"new": True})
    assert read_json(tmp_path / "out" / "a.json") == {"new": True}
    assert (tmp_path / "out" / "README.md").exists() is keep


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(tmp_path / "out"):
            pass


@pytest.mark.parametrize(
    "content, match",
    [(b"{not json", "is not valid JSON"), (b"[1, 2]", "must hold a JSON object"), (b"\xff\xfe", "is not valid JSON")],
)
def test_read_json_names_a_corrupt_file(tmp_path, content, match):
    (tmp_path / "c.json").write_bytes(content)
    with pytest.raises(CorruptFileError, match=match) as err:
        read_json(tmp_path / "c.json", "config")
    assert str(tmp_path / "c.json") in str(err.value) and isinstance(err.value, (StarError, ValueError))


def test_read_json_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config .* does not exist"):
        read_json(tmp_path / "none.json", "config")


def test_read_safetensors_round_trip_and_truncation(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(tensors, tmp_path / "w.safetensors", metadata={"k": "v"})
    loaded, metadata = read_safetensors(tmp_path / "w.safetensors")
    assert torch.equal(loaded["a"], tensors["a"]) and metadata == {"k": "v"}
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.safetensors"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_a_pickle_is_never_unpickled(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "w.safetensors")  # a pickle under a safetensors name
    with pytest.raises(CorruptFileError):
        read_safetensors(tmp_path / "w.safetensors")
