"""Calibration warm start: B = top-R eigenvectors of the router inputs' uncentred second moment.

The expected bases are computed here independently: router inputs are captured with plain forward
pre-hooks, padding is removed with the batch's own attention mask, and the second moment is
decomposed with float64 ``torch.linalg.eigh``.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import star_hf
from star_hf import StarConfig, calibrate, find_star_routers, gha_step, patch_model

from .serialization_utils import BUILDERS, outputs, trained

ARCHS = list(BUILDERS)


def _batches(name: str, count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches with right and left padding (and explicit decoder inputs for Switch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(0, 128, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        mask[1, -3:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if name == "switch":
            batch["decoder_input_ids"] = torch.randint(0, 128, (3, 6), generator=g)
            dmask = torch.ones_like(batch["decoder_input_ids"])
            dmask[2, -2:] = 0
            batch["decoder_attention_mask"] = dmask
        out.append(batch)
    return out


def _host_paths(model) -> dict[str, str]:
    """Router path → path of the module whose forward receives the gate input (Switch: the router)."""
    hosts = {}
    for path in find_star_routers(model):
        parent, _, leaf = path.rpartition(".")
        hosts[path] = parent if leaf == "classifier" else path
    return hosts


def naive_second_moments(model, batches, masked: bool = True) -> dict[str, torch.Tensor]:
    """E[x xᵀ] (float64) of every router's unmasked inputs, from plain pre-hooks."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    current = {}

    def hook_for(path, is_decoder):
        def hook(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            mask = current["decoder_attention_mask" if is_decoder else "attention_mask"]
            keep = mask.reshape(-1).bool() if masked else torch.ones(x.shape[0], dtype=torch.bool)
            x = x[keep]
            sums[path] = sums.get(path, 0) + x.t() @ x
            counts[path] = counts.get(path, 0) + x.shape[0]

        return hook

    handles = [
        model.get_submodule(host).register_forward_pre_hook(hook_for(path, path.startswith("decoder.")))
        for path, host in _host_paths(model).items()
    ]
    with torch.no_grad():
        for batch in batches:
            current.update(batch)
            model(**batch)
    for h in handles:
        h.remove()
    return {p: sums[p] / counts[p] for p in sums}


def top_eigenvectors(c: torch.Tensor, r: int) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(c)
    order = torch.argsort(values, descending=True)[:r]
    return vectors[:, order].t()


@pytest.mark.parametrize("name", ARCHS)
def test_basis_is_the_top_eigenvectors_of_the_masked_second_moment(name):
    model = patch_model(BUILDERS[name](), StarConfig(num_components=3))
    batches = _batches(name)
    expected = {p: top_eigenvectors(c, 3) for p, c in naive_second_moments(model, batches).items()}
    unmasked = {p: top_eigenvectors(c, 3) for p, c in naive_second_moments(model, batches, masked=False).items()}
    calibrate(model, batches)
    for path, router in find_star_routers(model).items():
        basis = router.star_basis
        assert basis.dtype == torch.float32 and basis.shape == (3, 32)
        alignment = (basis.double() * expected[path]).sum(dim=1).abs()  # rows equal up to sign, in order
        assert torch.allclose(alignment, torch.ones(3, dtype=torch.float64), atol=1e-4), (path, alignment)
        assert torch.allclose(basis.double() @ basis.double().t(), torch.eye(3, dtype=torch.float64), atol=1e-5)
        # the padding really was left out: the unmasked subspace is a different one
        assert (basis.double() * unmasked[path]).sum(dim=1).abs().min() < 0.999


@pytest.mark.parametrize("name", ARCHS)
def test_preserve_keeps_outputs_and_changes_only_w_b_and_basis(name):
    model = trained(name)
    batches = _batches(name)
    probe = _batches(name, count=1, seed=9)[0]
    with torch.no_grad():
        before = model(**probe).logits
    kept = {p: (r.star_mixing.clone(), r.star_alpha.clone()) for p, r in find_star_routers(model).items()}
    old_w = {p: r.star_linear_weight.clone() for p, r in find_star_routers(model).items()}
    calibrate(model, batches)
    with torch.no_grad():
        after = model(**probe).logits
    assert (after - before).abs().max() <= 1e-5
    for path, router in find_star_routers(model).items():
        assert torch.equal(router.star_mixing, kept[path][0]) and torch.equal(router.star_alpha, kept[path][1])
        assert not torch.allclose(router.star_linear_weight, old_w[path])


def test_preserve_with_a_gate_bias():
    model = trained("switch", router_bias=True)
    probe = _batches("switch", count=1, seed=9)[0]
    with torch.no_grad():
        before = model(**probe).logits
    calibrate(model, _batches("switch"))
    with torch.no_grad():
        assert (model(**probe).logits - before).abs().max() <= 1e-5


def test_calibrated_basis_is_a_gha_fixed_point():
    batches = _batches("mixtral")

    def basis_change(model) -> float:
        start = {p: r.star_basis.clone() for p, r in find_star_routers(model).items()}
        model.train()
        for batch in batches:  # the same inputs (eval and train forwards agree: no dropout, no jitter)
            model(**batch)
        assert gha_step(model, lr=0.5) == 2
        return max((r.star_basis - start[p]).abs().max().item() for p, r in find_star_routers(model).items())

    random_start = patch_model(BUILDERS["mixtral"]())
    calibrated = calibrate(patch_model(BUILDERS["mixtral"]()), batches)
    assert basis_change(random_start) > 1e-2
    assert basis_change(calibrated) < 1e-4


def test_preserve_false_sets_only_the_basis():
    model = trained("mixtral")
    inputs = _batches("mixtral", count=1, seed=9)[0]
    before = outputs(model, inputs)
    params = {n: p.clone() for n, p in model.named_parameters()}
    calibrate(model, _batches("mixtral"), preserve=False)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert not torch.allclose(outputs(model, inputs), before)


def test_gha_only_routers_need_preserve_false():
    model = patch_model(BUILDERS["mixtral"](), StarConfig(gha_only=True))
    before = {p: r.star_basis.clone() for p, r in find_star_routers(model).items()}
    with pytest.raises(ValueError, match="GHA-only.*preserve=False"):
        calibrate(model, _batches("mixtral"))
    assert all(torch.equal(r.star_basis, before[p]) for p, r in find_star_routers(model).items())
    calibrate(model, _batches("mixtral"), preserve=False)
    assert not any(torch.equal(r.star_basis, before[p]) for p, r in find_star_routers(model).items())


def test_input_ids_tensors_max_batches_and_mode():
    batches = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    consumed = []

    def stream():
        for b in batches:
            consumed.append(b)
            yield b

    a = patch_model(BUILDERS["mixtral"]()).train()
    a(input_ids=batches[0])  # pending statistics against the old basis
    calibrate(a, stream(), max_batches=2)
    assert len(consumed) == 2 and a.training
    assert all(r.star_pending_statistics is None for r in find_star_routers(a).values())
    b = calibrate(patch_model(BUILDERS["mixtral"]()), [{"input_ids": t} for t in batches[:2]])
    for ra, rb in zip(find_star_routers(a).values(), find_star_routers(b).values()):
        assert torch.equal(ra.star_basis, rb.star_basis)


def test_training_batches_with_labels_calibrate_like_input_ids():
    batches = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    labels = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t} for t in batches]
    a = calibrate(patch_model(BUILDERS["mixtral"]()), labels)
    b = calibrate(patch_model(BUILDERS["mixtral"]()), batches)
    for ra, rb in zip(find_star_routers(a).values(), find_star_routers(b).values()):
        torch.testing.assert_close(ra.star_basis, rb.star_basis)


def test_encoder_decoder_batches_of_input_ids_only():
    model = trained("switch")
    probe = _batches("switch", count=1, seed=9)[0]
    with torch.no_grad():
        before = model(**probe).logits
    calibrate(model, [torch.randint(0, 128, (2, 8))])
    with torch.no_grad():
        assert (model(**probe).logits - before).abs().max() <= 1e-5


def test_calibrate_a_sharded_bf16_checkpoint_then_save_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    BUILDERS["mixtral"]().save_pretrained(tmp_path / "base", max_shard_size="20KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16, device_map="cpu")
    patch_model(model)
    probe = _batches("mixtral", count=1, seed=9)[0]
    with torch.no_grad():
        before = model(**probe).logits.float()
    calibrate(model, _batches("mixtral"))
    with torch.no_grad():
        after = model(**probe).logits.float()
    assert (after - before).abs().max() <= 0.05 * before.abs().max()  # bf16 round-off of the new W
    for router in find_star_routers(model).values():
        basis = router.star_basis
        assert basis.dtype == torch.float32 and router.star_linear_weight.dtype == torch.bfloat16
        assert torch.allclose(basis @ basis.t(), torch.eye(4), atol=1e-5)
    star_hf.save_pretrained(model, tmp_path / "calibrated", max_shard_size="20KB")
    loaded = star_hf.from_pretrained(tmp_path / "calibrated", dtype=torch.bfloat16)
    for (p, a), b in zip(find_star_routers(model).items(), find_star_routers(loaded).values()):
        assert torch.equal(a.star_basis, b.star_basis) and torch.equal(a.star_linear_weight, b.star_linear_weight), p


def test_bad_input_is_refused_clearly():
    with pytest.raises(star_hf.NotPatchedError, match="patch_model"):
        calibrate(BUILDERS["mixtral"](), [torch.zeros(1, 4, dtype=torch.long)])
    model = patch_model(BUILDERS["mixtral"]())
    before = {p: r.star_basis.clone() for p, r in find_star_routers(model).items()}
    with pytest.raises(ValueError, match="saw no"):
        calibrate(model, [])
    with pytest.raises(TypeError, match="input_ids tensors or dicts"):
        calibrate(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="max_batches"):
        calibrate(model, [], max_batches=0)
    with star_hf.test_time_adaptation(model, lr=1e-3):
        with pytest.raises(RuntimeError, match="test-time adaptation"):
            calibrate(model, [torch.zeros(1, 4, dtype=torch.long)])
    assert all(torch.equal(r.star_basis, before[p]) for p, r in find_star_routers(model).items())


# --------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calibrate_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = patch_model(BUILDERS["mixtral"]())
        calibrate(model, _batches("mixtral", count=4)[rank::2])  # each rank sees half of the batches
        torch.save({p: r.star_basis for p, r in find_star_routers(model).items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_get_the_basis_of_the_global_batch(tmp_path):
    out = str(tmp_path / "basis")
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers)
    mp.start_processes(_calibrate_rank, args=(_free_port(), out), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    single = calibrate(patch_model(BUILDERS["mixtral"]()), _batches("mixtral", count=4))
    for path, router in find_star_routers(single).items():
        assert torch.equal(ranks[0][path], ranks[1][path])
        alignment = (ranks[0][path].double() * router.star_basis.double()).sum(dim=1)
        assert torch.allclose(alignment, torch.ones_like(alignment), atol=1e-5)
