"""Two CPU processes (gloo, launched with torch.distributed.run) train a patched model under DDP and FSDP2.

Checks that the GHA statistics are summed over ranks before each update: the bases of both ranks
are bit-identical and equal (float32 round-off) to one process training on the global batches, and
DDP's buffer broadcasting does not touch the per-rank accumulators. tests/ddp_worker.py is the rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import star_hf

from .ddp_worker import ACCUMULATION, SGD_LR, build_model, global_batches, state_of

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


def single_process_reference() -> dict[str, torch.Tensor]:
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    for micro_batches in global_batches():
        for ids in micro_batches:
            (model(ids, labels=ids).loss / ACCUMULATION).backward()
        opt.step()
        opt.zero_grad()
        star_hf.gha_step(model)
    return state_of(model)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_bases_are_bit_identical_across_ranks_and_equal_one_process_on_the_global_batch(ranks, strategy):
    rank0, rank1 = (load_file(ranks / f"{strategy}-rank{r}.safetensors") for r in (0, 1))
    reference = single_process_reference()
    basis_keys = [k for k in rank0 if k.endswith("star_basis")]
    assert len(basis_keys) == 2
    for key in basis_keys:
        assert torch.equal(rank0[key], rank1[key])
        torch.testing.assert_close(rank0[key], reference[key], rtol=0, atol=1e-6)
    for key in rank0:
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ranks_accumulate_their_own_statistics_despite_buffer_broadcasting(ranks, strategy):
    pending0, pending1 = (load_file(ranks / f"pending-{strategy}-rank{r}.safetensors") for r in (0, 1))
    for key in pending0:  # different data per rank, not overwritten by rank 0's buffers
        assert not torch.allclose(pending0[key], pending1[key])


def test_trainer_with_star_callback_under_ddp(ranks):
    bases0, bases1 = (load_file(ranks / f"trainer-rank{r}.safetensors") for r in (0, 1))
    for key in bases0:
        assert torch.equal(bases0[key], bases1[key])
    logs0, logs1 = (json.loads((ranks / f"trainer-rank{r}.json").read_text()) for r in (0, 1))
    assert len(logs0) == 3 and "star/load_cv_mean" in logs0[0]
    assert logs0 == logs1  # the expert load is summed over ranks before it is logged
