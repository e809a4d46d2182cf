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


def test_load_importance_against_scipy():
    clean = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
    noisy = torch.tensor([[1.2, -0.1, -0.5], [0.3, 0.6, 0.0]])
    k, std = 1, 0.5
    imp = torch.softmax(clean, -1).sum(0).numpy()
    kth = [1.2, 0.6]
    load = [sum(norm.cdf((clean[t, e].item() - kth[t]) / std) for t in range(2)) for e in range(3)]

    def cv2(v):
        m = sum(v) / len(v)
        var = sum((a - m) ** 2 for a in v) / (len(v) - 1)
        return var / m**2

    expected = (cv2(list(imp)) + cv2(load)) / 2
    assert load_importance_loss(clean, noisy, k, std).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        load_importance_loss(clean, noisy, k, 0.0)


def test_dynmoe_diverse_simple_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    both = torch.tensor([True, True])
    assert dynmoe_diverse_simple_loss(w, both).item() == pytest.approx(1.5)  # orthogonal; mean norm (1+2)/2
    w2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # unit columns (1,0), (1/√2,1/√2): off-diagonals 1/√2 -> Frobenius sqrt(2 * 1/2) = 1
    assert dynmoe_diverse_simple_loss(w2, both).item() == pytest.approx(1 + (1 + math.sqrt(2)) / 2, rel=1e-6)
    assert dynmoe_diverse_simple_loss(w2, torch.tensor([True, False])).item() == pytest.approx(1.0)


def test_gshard_binary_by_hand():
    z = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    s = torch.tensor([[0.9, 0.6, 0.0], [0.2, 0.7, 0.0]])
    active = torch.tensor([True, True, False])
    # mean z = (0.5, 1, 0); top1 by s = (0, 1) -> f = (0.5, 0.5, 0); E_act = 2
    assert gshard_binary_loss(z, s, active).item() == pytest.approx(2 * (0.25 + 0.5))
