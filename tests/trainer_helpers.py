"""Small helpers shared by the Trainer tests: a token dataset, Trainer arguments, input capture."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from star_hf import find_star_routers


class TokenDataset(torch.utils.data.Dataset):
    """``n`` random sequences of ``length`` token ids (< 128), as causal-LM examples."""

    def __init__(self, n: int = 16, length: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(output_dir, **overrides) -> TrainingArguments:
    """Deterministic, quiet CPU arguments; no reporting, no checkpoints unless asked."""
    defaults = dict(
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_steps=3,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    return TrainingArguments(str(output_dir), **{**defaults, **overrides})


def record_router_inputs(model) -> dict[str, list[torch.Tensor]]:
    """Every training-mode input each STAR router receives (hooks independent of star_hf)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def make_hook(name):
        def hook(module, args):
            if module.training and torch.is_grad_enabled():
                seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

        return hook

    for name, router in find_star_routers(model).items():
        router.register_forward_pre_hook(make_hook(name))
    return seen


def bases(model) -> dict[str, torch.Tensor]:
    return {name: router.star_basis.detach().clone() for name, router in find_star_routers(model).items()}
