"""Auxiliary losses against hand computations (SPEC §2)."""

import math

import pytest
import torch
from scipy.stats import norm

from rmoe.losses import (
    cv_squared,
    dynmoe_diverse_simple_loss,
    gshard_binary_loss,
    load_importance_loss,
    load_importance_loss_tutel,
    router_z_loss,
    switch_balance_loss,
)


def test_switch_balance_loss_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    top1 = torch.tensor([0, 1, 0])
    # f = (2/3, 1/3), P = (2/3, 1/3) -> 2 * (4/9 + 1/9)
    assert switch_balance_loss(probs, top1).item() == pytest.approx(10 / 9, rel=1e-6)
    balanced = torch.full((4, 4), 0.25)
    assert switch_balance_loss(balanced, torch.arange(4)).item() == pytest.approx(1.0)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse1 = math.log(math.e + math.e**2)
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + lse1**2) / 2, rel=1e-6)


def test_cv_squared_uses_unbiased_variance():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert cv_squared(x).item() == pytest.approx(1.0 / 4.0, rel=1e-5)  # var=1, mean=2


def _cv2(v):
    m = sum(v) / len(v)
    var = sum((a - m) ** 2 for a in v) / (len(v) - 1)
    return var / m**2


def test_load_importance_textbook_against_scipy():
    clean = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
    noisy = torch.tensor([[1.2, -0.1, -0.5], [0.3, 0.6, 0.0]])
    k, std = 1, 0.5
    imp = torch.softmax(clean, -1).sum(0).tolist()
    # Shazeer: for expert e the k-th largest noisy logit among the OTHER experts
    # token 0: e0 -> max(-0.1, -0.5) = -0.1; e1, e2 -> 1.2.  token 1: e0 -> 0.6, e1 -> 0.3, e2 -> 0.6
    thr = [[-0.1, 1.2, 1.2], [0.6, 0.3, 0.6]]
    load = [sum(norm.cdf((clean[t, e].item() - thr[t][e]) / std) for t in range(2)) for e in range(3)]
    expected = (_cv2(imp) + _cv2(load)) / 2
    assert load_importance_loss(clean, noisy, k, std).item() == pytest.approx(expected, rel=1e-5)
    # k = 2: the 2nd largest among the others; e in the top-2 -> the 3rd largest overall
    thr2 = [[-0.5, -0.5, -0.1], [0.0, 0.0, 0.3]]
    load2 = [sum(norm.cdf((clean[t, e].item() - thr2[t][e]) / std) for t in range(2)) for e in range(3)]
    assert load_importance_loss(clean, noisy, 2, std).item() == pytest.approx((_cv2(imp) + _cv2(load2)) / 2,
                                                                              rel=1e-5)
    with pytest.raises(ValueError):
        load_importance_loss(clean, noisy, k, 0.0)


def test_load_importance_tutel_form_against_scipy():
    clean = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
    noisy = torch.tensor([[1.2, -0.1, -0.5], [0.3, 0.6, 0.0]])
    std = 0.5
    p = torch.softmax(clean, -1)
    imp = p.sum(0).tolist()
    kth = [1.2, 0.6]  # the k-th (k=1) largest noisy logit over all experts
    # tutel passes the clean probabilities where the textbook has the clean logits
    load = [sum(norm.cdf((p[t, e].item() - kth[t]) / std) for t in range(2)) for e in range(3)]
    expected = (_cv2(imp) + _cv2(load)) / 2
    assert load_importance_loss_tutel(clean, noisy, 1, std).item() == pytest.approx(expected, rel=1e-5)
    assert load_importance_loss_tutel(clean, noisy, 1, std).item() != pytest.approx(
        load_importance_loss(clean, noisy, 1, std).item(), rel=1e-3)


def test_dynmoe_diverse_simple_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    both = torch.tensor([True, True])
    assert dynmoe_diverse_simple_loss(w, both).item() == pytest.approx(1.5)  # orthogonal; mean norm (1+2)/2
    w2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # unit columns (1,0), (1/√2,1/√2): off-diagonals 1/√2 -> Frobenius sqrt(2 * 1/2) = 1
    assert dynmoe_diverse_simple_loss(w2, both).item() == pytest.approx(1 + (1 + math.sqrt(2)) / 2, rel=1e-6)
    # one active expert: no pair is compared, but the simplicity mean still runs over all E_max columns
    assert dynmoe_diverse_simple_loss(w2, torch.tensor([True, False])).item() == pytest.approx(
        (1 + math.sqrt(2)) / 2, rel=1e-6)


def test_gshard_binary_by_hand():
    z = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    first_selected = torch.tensor([1, 1, -1])  # token 2 activated no expert
    active = torch.tensor([True, True, False])
    # mean z over N=3 = (1/3, 2/3, 0); f = (0, 2/3, 0) (token 2 counts in N only); E_act = 2
    assert gshard_binary_loss(z, first_selected, active).item() == pytest.approx(2 * (2 / 3) * (2 / 3))


def test_gshard_binary_through_the_router_counts_first_selected_experts():
    from rmoe import MoEConfig
    from rmoe.routing import TopAnyRouter

    cfg = MoEConfig(router="topany", initial_experts=2, max_experts=3, top_k=1, aux_loss="gshard_binary")
    r = TopAnyRouter(2, cfg).train()
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))
        r.thresholds.copy_(torch.tensor([2.0, 0.0, 0.0]))  # σ(2) = 0.88: expert 0 hard to reach
    # token 0: s = (σ(0.8), σ(0.6)) = (0.69, 0.65): only expert 1 passes its threshold although
    # expert 0 has the higher score -> f must count expert 1. token 1: s = (0.5, 0.27) -> none.
    x = torch.tensor([[0.8, 0.6], [0.0, -1.0]])
    rec = r(x)
    assert rec.expert_indices[:, 0].tolist() == [1, -1]
    # mean z = (0, 1/2, 0); f = (0, 1/2, 0); E_act = 2
    assert rec.aux_loss.item() == pytest.approx(2 * 0.5 * 0.5)


def test_expert_counts_is_bincount_of_the_non_empty_entries():
    """The sync-free count equals a Python count of the entries >= 0, any shape, empty included."""
    from rmoe.losses import expert_counts

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, 5, (40, 3), generator=g)
    want = [sum(1 for v in idx.reshape(-1).tolist() if v == e) for e in range(5)]
    assert expert_counts(idx, 5).tolist() == want
    assert expert_counts(idx, 5, torch.float64).dtype == torch.float64
    assert expert_counts(torch.full((4, 2), -1), 3).tolist() == [0, 0, 0]
    assert expert_counts(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]
