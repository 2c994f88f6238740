"""One rank of the 2-process test in tests/test_distributed.py (launched by torch.distributed.run).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR

1. A custom loop under DDP (gloo, default buffer broadcasting) and then under FSDP2 (fully_shard),
   with gradient accumulation (no gradient sync on the first micro-batch), over the global batches
   of :func:`global_batches`, each rank taking its half of every micro-batch; it writes the final
   state to OUT_DIR/{ddp,fsdp2}-rank{r}.safetensors and the pending statistics of the first step,
   before the all-reduce, to OUT_DIR/pending-{ddp,fsdp2}-rank{r}.safetensors.
2. The Trainer with StarCallback under DDP; it writes the final bases to
   OUT_DIR/trainer-rank{r}.safetensors and the logged star/ metrics to OUT_DIR/trainer-rank{r}.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import star_hf  # noqa: E402
from tests.conftest import tiny_mixtral  # noqa: E402

STEPS, ACCUMULATION, GLOBAL_BATCH, LENGTH = 3, 2, 4, 10
GHA_LR, SGD_LR = 0.05, 0.1


def global_batches() -> torch.Tensor:
    """(STEPS, ACCUMULATION, GLOBAL_BATCH, LENGTH) token ids, the same on every rank."""
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 128, (STEPS, ACCUMULATION, GLOBAL_BATCH, LENGTH), generator=g)


def build_model() -> torch.nn.Module:
    return star_hf.patch_model(tiny_mixtral(), star_hf.StarConfig(gha_lr=GHA_LR)).train()


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of every state-dict tensor."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v  # FSDP2 shards parameters as DTensors
        out[k] = v.detach().clone().contiguous()
    return out


def wrap(model: torch.nn.Module, strategy: str):
    """(module to call, context manager factory that skips the gradient sync of a micro-batch)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Default buffer syncing: rank 0's buffers (the bases among them) are copied to every rank before
        # each forward. Harmless as long as the per-step accumulators are not buffers and the bases agree.
        ddp = DistributedDataParallel(model)
        return ddp, ddp.no_sync
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return model, no_sync


def custom_loop(rank: int, world: int, out: Path, strategy: str) -> None:
    model = build_model()
    wrapped, no_sync = wrap(model, strategy)
    assert not any("_star_stats" in name for name, _ in model.named_buffers())
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    per_rank = GLOBAL_BATCH // world
    for step, micro_batches in enumerate(global_batches()):
        for micro, batch in enumerate(micro_batches):
            ids = batch[rank * per_rank : (rank + 1) * per_rank]
            last = micro == ACCUMULATION - 1  # gradients are averaged over ranks at the last micro-batch
            with contextlib.nullcontext() if last else no_sync():
                (wrapped(ids, labels=ids).loss / ACCUMULATION).backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            pending = {p: r.star_pending_statistics.yx.clone() for p, r in star_hf.find_star_routers(model).items()}
            save_file(pending, str(out / f"pending-{strategy}-rank{rank}.safetensors"))
        assert star_hf.gha_step(wrapped) == 2
    save_file(state_of(model), str(out / f"{strategy}-rank{rank}.safetensors"))


class TokenRows(torch.utils.data.Dataset):
    """The rows of :func:`global_batches` as causal-LM examples."""

    def __init__(self) -> None:
        self.ids = global_batches().reshape(-1, LENGTH)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_run(rank: int, out: Path) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StarLogs(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.logs.append({k: v for k, v in logs.items() if k.startswith("star/")})

    model = build_model()
    args = TrainingArguments(
        str(out / "trainer"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        seed=0,
    )
    recorder = StarLogs()
    trainer = Trainer(model=model, args=args, train_dataset=TokenRows(), callbacks=[recorder, star_hf.StarCallback()])
    trainer.train()
    bases = {p: r.star_basis.clone() for p, r in star_hf.find_star_routers(model).items()}
    save_file(bases, str(out / f"trainer-rank{rank}.safetensors"))
    (out / f"trainer-rank{rank}.json").write_text(json.dumps(recorder.logs))


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for strategy in ("ddp", "fsdp2"):
            custom_loop(rank, world, out, strategy)
            dist.barrier()
        trainer_run(rank, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    # Every result is written and the process group is destroyed. Leave without running C++ static
    # destructors: about one run in fifteen, a still-joinable background thread of the distributed
    # runtime aborted the interpreter's teardown ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
