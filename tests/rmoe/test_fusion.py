"""Stateful Fusion update and weights by hand (SPEC §4)."""

import pytest
import torch

from rmoe import FusionConfig, StatefulFusion
from rmoe.routing import RoutingRecord


def _rec(probs, idx, gates):
    probs, idx, gates = torch.tensor(probs), torch.tensor(idx), torch.tensor(gates)
    z = torch.zeros(())
    return RoutingRecord(idx, gates.clone(), gates, probs, probs.log(), torch.zeros(probs.shape[1]),
                         torch.ones(probs.shape[1], dtype=torch.bool), z, z, torch.zeros((), dtype=torch.long))


def test_sum_update_pi_and_weights_by_hand():
    f = StatefulFusion(3, FusionConfig(beta=0.5, agg="sum")).train()
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
    f = StatefulFusion(2, FusionConfig(beta=0.0, agg="mean", mix_alpha=0.25)).train()
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
    frozen = StatefulFusion(2, FusionConfig(beta=0.9)).eval()
    frozen(rec)
    assert frozen.m.tolist() == [0.0, 0.0]
    live = StatefulFusion(2, FusionConfig(beta=0.9, update_in_eval=True)).eval()
    live(rec)
    assert live.m.tolist() == pytest.approx([0.05, 0.05])


def test_state_is_a_buffer_in_state_dict():
    f = StatefulFusion(4, FusionConfig())
    assert "m" in f.state_dict()
