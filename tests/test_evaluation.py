"""star_hf.experiments.evaluation: NMI, routing fluctuation, subspace alignment, router-logit recording.

Expected values are computed by hand (closed forms in the test), never with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from star_hf.experiments.evaluation import (
    gate_modules,
    normalized_mutual_info,
    principal_subspace,
    record_router_logits,
    routing_fluctuation,
    subspace_alignment,
    top1_experts,
)


def test_nmi_hand_computed_example():
    # Joint distribution of (true, pred) over 4 items: (0,0) 2/4, (1,0) 1/4, (1,1) 1/4.
    true, pred = [0, 0, 1, 1], [0, 0, 0, 1]
    mi = (
        0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.25))
    )
    h_true = math.log(2)
    h_pred = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mi / ((h_true + h_pred) / 2)
    assert expected == pytest.approx(0.343711, abs=1e-6)
    assert normalized_mutual_info(true, pred) == pytest.approx(expected, abs=1e-12)
    assert normalized_mutual_info(pred, true) == pytest.approx(expected, abs=1e-12)


def test_nmi_extremes():
    # A renaming of the labels is a perfect match; label values need not be contiguous.
    assert normalized_mutual_info([0, 0, 1, 1, 2, 2], [5, 5, 3, 3, 0, 0]) == pytest.approx(1.0)
    # Independent labelings: every (true, pred) pair equally often.
    assert normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_info([1, 1, 1], [2, 2, 2]) == 1.0
    assert normalized_mutual_info([0, 1, 2], [4, 4, 4]) == 0.0
    assert normalized_mutual_info(torch.tensor([0, 1]), torch.tensor([1, 0])) == pytest.approx(1.0)


def test_nmi_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        normalized_mutual_info([0, 1], [0])
    with pytest.raises(TypeError, match="integer"):
        normalized_mutual_info(torch.tensor([0.0, 1.0]), [0, 1])
    with pytest.raises(ValueError, match=">= 0"):
        normalized_mutual_info([-1, 0], [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        normalized_mutual_info([], [])


def test_routing_fluctuation():
    assert routing_fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3, 3])) == pytest.approx(0.25)
    assert routing_fluctuation([2, 2], [2, 2]) == 0.0
    with pytest.raises(ValueError, match="same non-empty probe set"):
        routing_fluctuation([0, 1], [0, 1, 2])


def test_top1_experts_flattens_tokens():
    logits = torch.tensor([[[0.1, 0.9, 0.0], [2.0, -1.0, 0.5]]])
    assert top1_experts(logits).tolist() == [1, 0]


def test_principal_subspace_and_alignment():
    g = torch.Generator().manual_seed(0)
    # Variances 9, 4, 0.01, 0.01 along the axes: the top-2 subspace is span(e0, e1).
    x = torch.randn(20000, 4, generator=g) * torch.tensor([3.0, 2.0, 0.1, 0.1])
    top2 = principal_subspace(x, 2)
    assert torch.allclose(top2 @ top2.t(), torch.eye(2, dtype=top2.dtype), atol=1e-9)
    assert subspace_alignment(top2, torch.eye(4)[:2]) == pytest.approx(1.0, abs=1e-3)

    e = torch.eye(3)
    # The same plane described by a non-orthonormal basis.
    assert subspace_alignment(torch.stack([e[0] + e[1], e[1]]), e[:2]) == pytest.approx(1.0)
    assert subspace_alignment(e[:1], e[1:2]) == pytest.approx(0.0, abs=1e-12)
    # A 45 degree angle: cos^2 = 1/2.
    assert subspace_alignment(e[:1], ((e[0] + e[1]) / math.sqrt(2))[None]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="different dimensions"):
        subspace_alignment(e[:1], torch.eye(4)[:1])


def test_record_router_logits_matches_model_output(mixtral, input_ids):
    routers = gate_modules(mixtral)
    assert len(routers) == 2
    with torch.no_grad(), record_router_logits(routers) as recorded:
        out = mixtral(input_ids, output_router_logits=True)
    for path, expected in zip(routers, out.router_logits):
        assert len(recorded[path]) == 1
        torch.testing.assert_close(recorded[path][0], expected)
    # The hooks are gone after the block.
    with torch.no_grad():
        mixtral(input_ids)
    assert all(len(v) == 1 for v in recorded.values())


def test_record_router_logits_keeps_graph_when_asked(mixtral, input_ids):
    routers = gate_modules(mixtral)
    mixtral.train()
    with record_router_logits(routers, detach=False) as recorded:
        mixtral(input_ids)
    assert all(t[0].requires_grad for t in recorded.values())


def test_gate_modules_same_paths_after_patching(mixtral, input_ids):
    import star_hf

    before = gate_modules(mixtral)
    with torch.no_grad(), record_router_logits(before) as stock:
        mixtral(input_ids)
    star_hf.patch_model(mixtral, star_hf.StarConfig(init="preserve"))
    after = gate_modules(mixtral)
    assert list(after) == list(before)
    assert all(star_hf.is_star_router(m) for m in after.values())
    with torch.no_grad(), record_router_logits(after) as patched:
        mixtral(input_ids)
    for path in before:
        torch.testing.assert_close(patched[path][0], stock[path][0], atol=1e-5, rtol=0)


def test_evaluate_causal_lm_matches_model_loss_and_routing(mixtral, input_ids):
    from star_hf.experiments.evaluation import evaluate_causal_lm

    mixtral.train()  # the evaluation switches to eval mode and back
    result = evaluate_causal_lm(mixtral, [input_ids[:1], {"input_ids": input_ids[1:]}])
    assert mixtral.training
    mixtral.eval()
    with torch.no_grad():
        out = [mixtral(input_ids[i : i + 1], output_router_logits=True) for i in range(2)]
        # Without output_router_logits: Mixtral's loss then has no aux term.
        losses = [mixtral(input_ids[i : i + 1], labels=input_ids[i : i + 1]).loss for i in range(2)]
    # Both rows predict 11 tokens: the token-weighted mean is the mean of the two losses.
    assert result.predicted_tokens == 2 * 11
    assert result.loss == pytest.approx(float((losses[0] + losses[1]) / 2), abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    for layer, path in enumerate(result.top1):
        logits = torch.cat([o.router_logits[layer] for o in out])
        assert result.top1[path].tolist() == logits.argmax(-1).tolist()
        top2 = logits.topk(2, dim=-1).indices.reshape(-1)
        expected = [float((top2 == e).sum()) for e in range(4)]
        assert result.load[path].tolist() == expected
        assert result.load[path].sum() == 2 * 12 * 2


def test_evaluate_causal_lm_leaves_padding_out(mixtral):
    from star_hf.experiments.evaluation import evaluate_causal_lm

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])  # second row left-padded
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    result = evaluate_causal_lm(mixtral, [{"input_ids": ids, "attention_mask": mask}])
    assert result.predicted_tokens == 5 + 3
    path = next(iter(result.top1))
    assert result.top1[path].numel() == 10
    assert result.load[path].sum() == 10 * 2
    with torch.no_grad():
        row = evaluate_causal_lm(mixtral, [ids[:1]])
        # The unpadded row alone gives the same routing for its tokens.
        assert row.top1[path].tolist() == result.top1[path][:6].tolist()
    with pytest.raises(ValueError, match="input_ids"):
        evaluate_causal_lm(mixtral, [{"attention_mask": mask}])


def test_evaluate_causal_lm_input_moments(mixtral):
    from star_hf.experiments.evaluation import evaluate_causal_lm

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    gate = mixtral.model.layers[1].mlp.gate
    seen = []
    handle = gate.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, 32)))
    result = evaluate_causal_lm(mixtral, [{"input_ids": ids, "attention_mask": mask}], input_moments=True)
    handle.remove()
    x = seen[0][mask.reshape(-1).bool()].double()  # the 10 real tokens
    expected = sum(torch.outer(row, row) for row in x) / 10
    torch.testing.assert_close(result.input_moment["model.layers.1.mlp.gate"], expected)
    torch.testing.assert_close(result.input_mean["model.layers.1.mlp.gate"], x.mean(0))
    assert evaluate_causal_lm(mixtral, [ids]).input_moment is None


def test_mean_direction():
    from star_hf.experiments.evaluation import mean_direction

    # Inputs x = (3, ±1): mean (3, 0), E[x xᵀ] = diag(9, 1); the mean is the whole top eigenvalue.
    moment, mean = torch.diag(torch.tensor([9.0, 1.0])), torch.tensor([3.0, 0.0])
    out = mean_direction(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), moment, mean)
    assert out["mean_share"] == pytest.approx(1.0)
    assert out["first_row_cos"] == pytest.approx(1 / math.sqrt(2))
    # A zero-mean input: no share, and a first row orthogonal to nothing in particular.
    out = mean_direction(torch.eye(2), moment, torch.tensor([0.0, 0.0]))
    assert out["mean_share"] == 0.0 and out["first_row_cos"] == 0.0
