"""Stateful Fusion update and weights by hand (SPEC §4)."""

import pytest
import torch
import torch.nn.functional as F

from rmoe import FusionConfig, StatefulFusion, build_moe_layer
from rmoe.routing import RoutingRecord


def _rec(probs, idx, gates):
    probs, idx, gates = torch.tensor(probs), torch.tensor(idx), torch.tensor(gates)
    z = torch.zeros(())
    return RoutingRecord(idx, gates.clone(), gates, probs, probs.log(), torch.zeros(probs.shape[1]),
                         torch.ones(probs.shape[1], dtype=torch.bool), z, z, torch.zeros((), dtype=torch.long),
                         dispatch_scores=probs)


def test_sum_update_pi_and_weights_by_hand():
    f = StatefulFusion(3, FusionConfig(ema_decay=0.5, agg="sum")).train()
    rec = _rec([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]], [[2, 0], [0, -1]], [[0.6, 0.4], [1.0, 0.0]])
    out = f(rec)
    # a = (0.8, 0.5, 0.7); m = 0.5*0 + 0.5*a = (0.4, 0.25, 0.35); pi = (1.4, 1.25, 1.35)/4
    assert torch.allclose(f.m, torch.tensor([0.4, 0.25, 0.35]))
    assert torch.allclose(out.fusion_pi, torch.tensor([1.4, 1.25, 1.35]) / 4.0)
    assert torch.allclose(out.expert_weights, torch.tensor([[1.35 / 2.75, 1.4 / 2.75], [1.0, 0.0]]))
    # second step: m = 0.5*m + 0.5*a
    f(rec)
    assert torch.allclose(f.m, torch.tensor([0.6, 0.375, 0.525]))


def test_mean_agg_and_mix_alpha():
    f = StatefulFusion(2, FusionConfig(ema_decay=0.0, agg="mean", mix_alpha=0.25)).train()
    rec = _rec([[0.2, 0.8], [0.6, 0.4]], [[0, 1], [1, 0]], [[0.3, 0.7], [0.4, 0.6]])
    out = f(rec)
    # m = a = mean = (0.4, 0.6); pi ∝ (1.4, 1.6): state weights token0 (1.4/3, 1.6/3)
    assert torch.allclose(f.m, torch.tensor([0.4, 0.6]))
    ws0 = torch.tensor([1.4 / 3, 1.6 / 3])
    expected0 = 0.25 * ws0 + 0.75 * torch.tensor([0.3, 0.7])
    assert torch.allclose(out.expert_weights[0], expected0)
    assert out.expert_weights[1].tolist() == pytest.approx([0.25 * 1.6 / 3 + 0.75 * 0.4, 0.25 * 1.4 / 3 + 0.75 * 0.6])


def test_eval_frozen_unless_update_in_eval():
    rec = _rec([[0.5, 0.5]], [[0, 1]], [[0.5, 0.5]])
    frozen = StatefulFusion(2, FusionConfig(ema_decay=0.9)).eval()
    frozen(rec)
    assert frozen.m.tolist() == [0.0, 0.0]
    live = StatefulFusion(2, FusionConfig(ema_decay=0.9, update_in_eval=True)).eval()
    live(rec)
    assert live.m.tolist() == pytest.approx([0.05, 0.05])


def test_state_is_a_buffer_in_state_dict():
    f = StatefulFusion(4, FusionConfig())
    assert "m" in f.state_dict()


def test_topany_fusion_pi_is_the_ema_of_activation_counts():
    """RMoE's fusion is fed top-any's binary activations z: with agg=sum, a_e counts the tokens
    that activated expert e; π = (1+m)/Σ(1+m) over several steps (reference from SPEC §1/§4)."""
    torch.manual_seed(0)
    beta = 0.9
    layer = build_moe_layer(6, 4, router="topany", initial_experts=4, max_experts=6, top_k=1,
                            fusion={"ema_decay": beta, "agg": "sum"}).train()
    with torch.no_grad():
        layer.router.thresholds.copy_(torch.tensor([-0.5, 0.3, 0.0, 0.6, 0.0, 0.0]))
    w, g = layer.router.weight.detach(), layer.router.thresholds.detach()
    mask = layer.router.expert_mask.float()
    m = torch.zeros(6)
    for step in range(4):
        x = torch.randn(30, 6)
        _, rec = layer(x)
        s = torch.sigmoid(F.normalize(x, dim=-1) @ F.normalize(w, dim=0)) * mask
        z = (s > torch.sigmoid(g)).float()
        m = beta * m + (1 - beta) * z.sum(0)
        pi = (1 + m) / (1 + m).sum()
        assert torch.allclose(layer.fusion.m, m, atol=1e-5), step
        assert torch.allclose(rec.fusion_pi, pi, atol=1e-6)
        # each token's weights: π_e / Σ_{j∈S_t} π_j over its activated experts
        for t in range(30):
            sel = torch.nonzero(z[t]).flatten()
            got = {int(e): float(v) for e, v in zip(rec.expert_indices[t], rec.expert_weights[t]) if e >= 0}
            assert set(got) == set(sel.tolist())
            for e in sel.tolist():
                assert got[e] == pytest.approx(float(pi[e] / pi[sel].sum()), rel=1e-5)
    # popular experts get a visibly larger share (with sigmoid scores s, π would be near uniform)
    assert float(rec.fusion_pi.max() / rec.fusion_pi[mask.bool()].min()) > 1.5


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_mix_alpha_controls_the_task_gradient_reaching_the_router(alpha):
    """alpha=1 (the paper's code): the combine weights are π only, so the task loss sends no
    gradient to the router (thresholds learn nothing from it); alpha<1 keeps the router's gates."""
    torch.manual_seed(1)
    layer = build_moe_layer(6, 4, router="topany", initial_experts=4, max_experts=6, top_k=1, aux_loss="none",
                            fusion={"ema_decay": 0.9, "agg": "sum", "mix_alpha": alpha}).train()
    with torch.no_grad():
        layer.router.thresholds.copy_(torch.tensor([-1.0, -1.0, -1.0, -1.0, 0.0, 0.0]))  # tokens take 2+ experts
        layer.experts.w2.mul_(torch.arange(1.0, 7.0).view(6, 1, 1))  # experts differ
    y, rec = layer(torch.randn(20, 6))
    assert int((rec.expert_indices >= 0).sum(-1).max()) > 1
    (y.pow(2).sum() + rec.aux_loss).backward()
    g_thr, g_w = layer.router.thresholds.grad, layer.router.weight.grad
    if alpha == 1.0:
        assert g_thr is None or float(g_thr.abs().max()) == 0.0
        assert g_w is None or float(g_w.abs().max()) == 0.0
    else:
        assert float(g_thr.abs().max()) > 0 and float(g_w.abs().max()) > 0


def test_frozen_fusion_keeps_m_and_restores_the_flag():
    from rmoe.fusion import frozen_fusion

    layer = build_moe_layer(6, 4, router="topany", initial_experts=3, max_experts=4, top_k=1,
                            fusion={"ema_decay": 0.5, "agg": "sum", "update_in_eval": True}).eval()
    x = torch.randn(10, 6)
    with frozen_fusion(layer):
        _, rec = layer(x)
    assert layer.fusion.m.abs().sum() == 0 and not layer.fusion.frozen
    assert torch.allclose(rec.fusion_pi, torch.full((4,), 0.25))  # weights still read m (all zero)
    layer(x)  # update_in_eval: an eval forward outside the block moves m
    assert layer.fusion.m.abs().sum() > 0
