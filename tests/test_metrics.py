"""Routing metrics against independent computations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import star_hf
from star_hf import (
    RoutingMonitor,
    StarConfig,
    find_star_routers,
    patch_model,
    routing_report,
)
from star_hf.training.metrics import monitor_of

from .conftest import tiny_mixtral, tiny_qwen2_moe, tiny_switch


def naive_cv_entropy(load: np.ndarray) -> tuple[float, float]:
    mean = load.mean()
    cv = math.sqrt(((load - mean) ** 2).mean()) / mean
    p = load / load.sum()
    entropy = -sum(q * math.log(q) for q in p if q > 0) / math.log(len(load))
    return cv, entropy


def padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, :7] = 0
    return ids, mask


@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen2_moe])
def test_top_k_load_matches_the_recorded_router_logits(build):
    model = patch_model(build())
    monitor = RoutingMonitor(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
    k = model.config.num_experts_per_tok
    real = mask.reshape(-1).bool()
    report = routing_report(model)
    for logits, row in zip(out.router_logits, report.layers):
        chosen = torch.softmax(logits.double(), dim=-1).topk(k, dim=-1).indices[real]
        want = np.bincount(chosen.reshape(-1).numpy(), minlength=logits.shape[-1]).astype(float)
        assert row.load_source == "indices"
        assert row.load == pytest.approx(want.tolist())
        assert row.tokens == int(real.sum())
        cv, entropy = naive_cv_entropy(want)
        assert row.load_cv == pytest.approx(cv, rel=1e-9)
        assert row.load_entropy == pytest.approx(entropy, rel=1e-9)
    monitor.close()


def test_switch_load_counts_the_dispatch_after_capacity():
    model = patch_model(tiny_switch(expert_capacity=3))
    RoutingMonitor(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids[:, :8], output_router_logits=True)
    rows = {r.path.split(".")[0]: r for r in routing_report(model).layers}
    for name, logits in [("encoder", out.encoder_router_logits[0]), ("decoder", out.decoder_router_logits[0])]:
        want = np.zeros(4)
        for sequence in logits:  # capacity is per sequence: the first `capacity` tokens of an expert pass
            taken = np.zeros(4)
            for expert in sequence.argmax(-1).tolist():
                taken[expert] += 1
                want[expert] += taken[expert] <= 3
        assert rows[name].load_source == "dispatch_mask"
        assert rows[name].load == pytest.approx(want.tolist())
        assert sum(rows[name].load) < logits.shape[0] * logits.shape[1]  # some tokens were dropped


def test_logits_fallback_counts_the_top_k_of_the_logits():
    model = patch_model(tiny_mixtral())
    monitor = RoutingMonitor(model)
    path, tracker = next(iter(monitor.trackers.items()))
    router = find_star_routers(model)[path]
    x = torch.randn(7, 32)
    logits = torch.randn(7, 4)
    tracker.hook(router, (x,), {}, logits)  # a router that returns nothing but its logits
    want = np.bincount(logits.topk(2, dim=-1).indices.reshape(-1).numpy(), minlength=4)
    assert tracker.source == "logits_topk"
    assert tracker.counts.tolist() == want.tolist()


def test_load_tracking_syncs_nothing_with_the_host(monkeypatch):
    model = patch_model(tiny_mixtral())
    monitor = RoutingMonitor(model)
    path, tracker = next(iter(monitor.trackers.items()))
    router = find_star_routers(model)[path]
    x = torch.randn(5, 32)
    output = (torch.randn(5, 4), torch.rand(5, 2), torch.randint(0, 4, (5, 2)))
    tracker.hook(router, (x,), {}, output)  # first call: locate the indices (shape inspection only)

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device synchronisation in the forward hook")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    tracker.hook(router, (x,), {}, output)
    monkeypatch.undo()
    assert tracker.counts.sum().item() == 2 * 2 * 5


def test_gradient_checkpointing_recomputation_is_not_counted():
    ids, mask = padded_batch()
    loads = []
    for checkpointing in (False, True):
        model = patch_model(tiny_mixtral()).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        RoutingMonitor(model)
        model(ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
        loads.append([r.load for r in routing_report(model).layers])
    assert loads[0] == loads[1]


def test_basis_health_drift_and_interpolation_match_naive_values():
    model = patch_model(tiny_mixtral(), StarConfig(gha_lr=0.2)).train()
    monitor = RoutingMonitor(model)
    routers = find_star_routers(model)
    ids, mask = padded_batch()
    drifts = {p: [] for p in routers}
    for _ in range(3):
        before = {p: r.star_basis.double().clone() for p, r in routers.items()}
        model(ids, attention_mask=mask)
        assert monitor.gha_step() == 2
        for p, r in routers.items():
            drifts[p].append(float(torch.linalg.norm(r.star_basis.double() - before[p])))
    for row in routing_report(model).layers:
        router = routers[row.path]
        b = router.star_basis.double().numpy()
        assert row.orthonormality_error == pytest.approx(np.linalg.norm(b @ b.T - np.eye(b.shape[0])), rel=1e-6)
        assert row.drift == pytest.approx(drifts[row.path][-1], rel=1e-5)
        assert row.drift_mean == pytest.approx(np.mean(drifts[row.path]), rel=1e-5)
        s = [1 / (1 + math.exp(-a)) for a in router.star_alpha.tolist()]
        assert row.interpolation == pytest.approx(s) and row.interpolation_mean == pytest.approx(np.mean(s))
        assert row.skipped_updates == 0 and row.num_experts == 4 and row.num_components == 4


def test_windows_partition_the_totals_and_summary_aggregates_layers():
    model = patch_model(tiny_mixtral())
    monitor = RoutingMonitor(model, training_only=True)
    ids, mask = padded_batch()
    monitor.window_report()
    model.train()
    model(ids, attention_mask=mask)
    monitor.gha_step()
    first = monitor.window_report()
    model(ids[:2], attention_mask=mask[:2])
    monitor.gha_step()
    model.eval()
    with torch.no_grad():
        model(ids)  # eval forwards are not counted with training_only=True
    second = monitor.window_report()
    total = routing_report(model)
    for a, b, t in zip(first.layers, second.layers, total.layers):
        assert np.add(a.load, b.load).tolist() == pytest.approx(t.load)
        assert a.tokens == int(mask.sum()) and b.tokens == int(mask[:2].sum())
        assert np.mean([a.drift_mean, b.drift_mean]) == pytest.approx(t.drift_mean, rel=1e-5)
    summary = total.summary()
    assert summary["star/load_cv_max"] == pytest.approx(max(r.load_cv for r in total.layers))
    assert summary["star/load_entropy_mean"] == pytest.approx(np.mean([r.load_entropy for r in total.layers]))
    assert summary["star/orthonormality_error_max"] == max(r.orthonormality_error for r in total.layers)
    markdown = total.to_markdown()
    assert markdown.count("\n") == 2 + len(total.layers) and "`model.layers.1.mlp.gate`" in markdown
    assert len(total.to_dicts()) == 2 and total.to_dicts()[0]["load_source"] == "indices"


def test_report_without_monitor_and_monitor_lifecycle():
    model = patch_model(tiny_mixtral())
    row = routing_report(model).layers[0]
    assert row.load is None and row.drift is None and row.orthonormality_error > 0
    assert "star/load_cv_mean" not in routing_report(model).summary()
    monitor = RoutingMonitor(model)
    assert monitor_of(model) is monitor
    with pytest.raises(ValueError, match="already tracked"):
        RoutingMonitor(model)
    monitor.close()
    assert monitor_of(model) is None
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 5)))
    assert all(t.counts.sum() == 0 for t in monitor.trackers.values())  # hooks are gone
    with pytest.raises(ValueError, match="patch_model"):
        routing_report(tiny_mixtral())
    with pytest.raises(ValueError, match="patch_model"):
        star_hf.RoutingMonitor(tiny_mixtral())
