"""The Python code blocks of README.md and docs/*.md, run as written on tiny local models (no hub).

Every ```python block in the documentation is preceded by a marker line: ``<!-- run: NAME -->`` (run
here, with the names the block assumes — ``model``, ``loader``, ... — set up by ``SETUPS[NAME]`` on a
tiny local checkpoint) or ``<!-- not run: why -->``. An unmarked block fails the suite, so new
documentation cannot slip in untested. The only edits made to a block before it runs replace a Hub
id or a placeholder path by a local folder, and shrink a size the tiny model does not have.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import star_hf

from .conftest import tiny_mixtral
from .test_hub import FakeHub

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- (run|not run): (.+?) -->$")


@dataclass
class Block:
    source: Path
    line: int
    marker: tuple[str, str] | None
    code: str


def _blocks() -> list[Block]:
    blocks = []
    for doc in DOCS:
        lines = doc.read_text().split("\n")
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                end = lines.index("```", i + 1)
                match = MARKER.match(lines[i - 1].strip()) if i else None
                marker = (match.group(1), match.group(2)) if match else None
                blocks.append(Block(doc, i + 1, marker, "\n".join(lines[i + 1 : end]) + "\n"))
                i = end
            i += 1
    return blocks


BLOCKS = _blocks()
RUN = {b.marker[1]: b for b in BLOCKS if b.marker and b.marker[0] == "run"}


def test_every_python_block_is_marked_run_or_not_run():
    unmarked = [f"{b.source.name}:{b.line}" for b in BLOCKS if b.marker is None]
    assert not unmarked, f"python blocks without a <!-- run: NAME --> / <!-- not run: why --> marker: {unmarked}"
    assert "quickstart" in RUN


def test_every_run_block_has_a_setup_and_every_setup_a_block():
    assert sorted(RUN) == sorted(SETUPS)


# ---------------------------------------------------------------------------- setups


def _batches(n: int, batch_size: int = 2, seq_len: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (batch_size, seq_len), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mixtral"
    tiny_mixtral().save_pretrained(path)
    return path


def _bases(model) -> dict[str, torch.Tensor]:
    return {p: r.star_basis.detach().clone() for p, r in star_hf.find_star_routers(model).items()}


def _patched(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    return star_hf.patch_model(AutoModelForCausalLM.from_pretrained(_checkpoint(tmp_path)), star_hf.StarConfig())


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


class Tokenizer:
    """The call the calibration block makes of a tokenizer, on the tiny model's 128-token vocabulary."""

    def __call__(self, texts, return_tensors="pt", padding=True):
        rows = [[1 + (b % 100) for b in t.encode()][:16] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, path):
        Path(path, "tokenizer_config.json").write_text("{}")
        return ()


@dataclass
class Setup:
    """What a block needs: the names it assumes, text replacements, and the check after it ran."""

    names: dict
    check: Callable[[dict], None]
    replace: dict[str, str] = field(default_factory=dict)


def quickstart(tmp_path, monkeypatch) -> Setup:
    from transformers import AutoModelForCausalLM

    ckpt = _checkpoint(tmp_path)
    # The block folds its model at the end: record the bases fold receives.
    folded: list[dict[str, torch.Tensor]] = []
    fold = star_hf.fold
    monkeypatch.setattr(star_hf, "fold", lambda model: (folded.append(_bases(model)), fold(model))[1])

    def check(ns):
        # The bases moved: the block trained with GHA on (a model left in eval mode would not).
        initial = _bases(
            star_hf.patch_model(AutoModelForCausalLM.from_pretrained(ckpt), star_hf.StarConfig(gha_lr=5e-5))
        )
        (trained,) = folded
        assert trained.keys() == initial.keys() and all(not torch.equal(trained[p], initial[p]) for p in initial)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert not star_hf.find_star_routers(stock)
        batch = _batches(1, seed=5)[0]
        torch.testing.assert_close(_logits(stock, batch), _logits(ns["model"], batch), rtol=1e-5, atol=1e-5)

    return Setup({"loader": _batches(3)}, check, {"path/to/a/local/mixtral": str(ckpt)})


def trainer(tmp_path, monkeypatch) -> Setup:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_checkpoint(tmp_path))
    initial = _bases(star_hf.patch_model(AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral")))
    train = [{k: v[0] for k, v in b.items()} for b in _batches(16, batch_size=1)]

    def check(ns):
        assert ns["trainer"].state.global_step > 0
        assert all(not torch.equal(b, initial[p]) for p, b in _bases(model).items())

    return Setup({"model": model, "train": train}, check)


def custom_loops(tmp_path, monkeypatch) -> Setup:
    model = _patched(tmp_path).train()
    initial = _bases(model)

    def check(ns):
        # 8 batches: 2 plain steps of 4 micro-batches, then 2 accelerate steps.
        assert all(not torch.equal(b, initial[p]) for p, b in _bases(model).items())

    names = {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=1e-3), "loader": _batches(8)}
    return Setup(names, check)


def peft(tmp_path, monkeypatch) -> Setup:
    def check(ns):
        assert not star_hf.find_star_routers(ns["stock"])
        batch = _batches(1, seed=5)[0]
        torch.testing.assert_close(_logits(ns["stock"], batch), _logits(ns["model"], batch), rtol=1e-5, atol=1e-5)

    return Setup({"base": tiny_mixtral(), "fresh_base": tiny_mixtral()}, check)


def save_load(tmp_path, monkeypatch) -> Setup:
    model = _patched(tmp_path)

    def check(ns):
        restored = ns["model"]
        assert restored is not model and _bases(restored).keys() == _bases(model).keys()
        assert all(torch.equal(b, _bases(model)[p]) for p, b in _bases(restored).items())
        assert next(restored.parameters()).dtype == torch.bfloat16

    return Setup({"model": model, "torch": torch}, check)


def adapter(tmp_path, monkeypatch) -> Setup:
    from transformers import AutoModelForCausalLM

    model = _patched(tmp_path)
    with torch.no_grad():
        for router in star_hf.find_star_routers(model).values():
            router.star_mixing.add_(0.1)

    def check(ns):
        loaded = star_hf.find_star_routers(ns["base"])
        assert loaded.keys() == star_hf.find_star_routers(model).keys()
        for path, router in star_hf.find_star_routers(model).items():
            assert torch.equal(loaded[path].star_basis, router.star_basis)
            torch.testing.assert_close(
                loaded[path].star_mixing.float(), router.star_mixing.float(), rtol=1e-2, atol=1e-2
            )

    names = {"model": model, "torch": torch, "AutoModelForCausalLM": AutoModelForCausalLM}
    return Setup(names, check, {"mistralai/Mixtral-8x7B-v0.1": str(tmp_path / "mixtral")})


def export(tmp_path, monkeypatch) -> Setup:
    from transformers import AutoModelForCausalLM

    model = _patched(tmp_path)

    def check(ns):
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
        assert not star_hf.find_star_routers(stock) and not star_hf.find_star_routers(model)

    return Setup({"model": model}, check)


def calibration(tmp_path, monkeypatch) -> Setup:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_checkpoint(tmp_path))
    chunks = [["some text to calibrate on", "and a little more"], ["a second batch of text"]]
    batch = _batches(1, seed=5)[0]
    before = _logits(model, batch)

    def check(ns):
        after = _logits(model, batch)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # outputs preserved
        initial = _bases(star_hf.patch_model(AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral")))
        assert all(not torch.equal(b, initial[p]) for p, b in _bases(model).items())

    return Setup({"model": model, "tok": Tokenizer(), "chunks": chunks}, check)


def hub(tmp_path, monkeypatch) -> Setup:
    model = _patched(tmp_path)
    star_hf.save_adapter(model, tmp_path / "star-adapter")
    fake = FakeHub(monkeypatch, tmp_path / "uploaded")
    fake.upload_folder = lambda api, **kwargs: (  # record only: the snapshot folder holds one upload
        fake.calls.append(("upload_folder", kwargs)),
        type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})(),
    )[1]

    def check(ns):
        uploads = [kwargs["repo_id"] for name, kwargs in fake.calls if name == "upload_folder"]
        assert uploads == ["me/mixtral-star", "me/mixtral-star-full", "me/mixtral-folded", "me/mixtral-star"]
        assert star_hf.find_star_routers(model)  # the folded push folds a copy

    return Setup({"model": model, "tok": Tokenizer()}, check)


def tta(tmp_path, monkeypatch) -> Setup:
    model = _patched(tmp_path).eval()
    initial = _bases(model)
    batch = {k: v for k, v in _batches(1, seq_len=4)[0].items() if k != "labels"}
    served = []

    def check(ns):
        assert len(served) == 2 and ns["out"].shape[1] > batch["input_ids"].shape[1]
        after = _bases(model)
        adapted = [p for p in initial if not torch.equal(after[p], initial[p])]
        assert adapted == ["model.layers.1.mlp.gate"]  # only the continual block's layer keeps its change

    names = {"model": model, "batch": batch, "requests": [batch, batch], "respond": lambda m, r: served.append(m(**r))}
    return Setup(names, check, {"layers=[10, 11]": "layers=[1]", "max_new_tokens=64": "max_new_tokens=4"})


SETUPS: dict[str, Callable[..., Setup]] = {
    "quickstart": quickstart,
    "trainer": trainer,
    "custom_loops": custom_loops,
    "peft": peft,
    "save_load": save_load,
    "adapter": adapter,
    "export": export,
    "calibration": calibration,
    "hub": hub,
    "test_time_adaptation": tta,
}


@pytest.mark.parametrize("name", sorted(RUN))
def test_block_runs_as_written(name, tmp_path, monkeypatch):
    block = RUN[name]
    setup = SETUPS[name](tmp_path, monkeypatch)
    code = block.code
    for old, new in setup.replace.items():
        assert old in code, f"{name}: {old!r} is no longer in the block"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{name}", "star_hf": star_hf, **setup.names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, f"{block.source.name}:{block.line}", "exec"), namespace)
    idle = [w for w in caught if "collected GHA statistics" in str(w.message)]
    assert not idle, f"{name}: {idle[0].message}"
    setup.check(namespace)
