"""Stability metric maths against hand computations (SPEC §6)."""

import math

import pytest
import torch

from rmoe import metrics as M
from rmoe.routing import RoutingRecord


def test_load_statistics_by_hand():
    n = torch.tensor([2, 4, 6, 0])
    active = torch.tensor([True, True, True, False])
    # active counts (2, 4, 6): mean 4, population std sqrt(8/3)
    assert M.load_cv(n, active) == pytest.approx(math.sqrt(8 / 3) / 4)
    assert M.max_violation(n, active) == pytest.approx(6 / 4 - 1)
    f = [2 / 12, 4 / 12, 6 / 12]
    assert M.normalized_load_entropy(n, active) == pytest.approx(-sum(p * math.log(p) for p in f) / math.log(3))
    assert M.dead_experts(n, active) == 0
    assert M.dead_experts(n) == 1
    assert M.normalized_load_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)


def test_router_entropy_and_confidence():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert M.router_entropy(p) == pytest.approx(math.log(2) / 2)
    assert M.top1_confidence(p) == pytest.approx(0.75)


def test_fluctuation_by_hand():
    prev = torch.tensor([0, 1, 2, 3])
    cur = torch.tensor([0, 2, 2, 1])
    assert M.top1_flip_rate(prev, cur) == 0.5
    a = torch.tensor([[0, 1], [2, -1], [-1, -1], [0, 3]])
    b = torch.tensor([[1, 0], [2, 3], [-1, -1], [1, 2]])
    # J: {0,1}/{0,1}=1; {2}/{2,3}=1/2; empty/empty=1; {0,3}/{1,2}=0 -> churn 1 - 2.5/4
    assert M.jaccard_churn(a, b, 4) == pytest.approx(1 - 2.5 / 4)


def test_fusion_drift_entropy_and_js():
    assert M.fusion_drift(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.4, 0.4, 0.2])) == pytest.approx(0.2)
    assert M.entropy(torch.tensor([0.5, 0.5])) == pytest.approx(math.log(2))
    # JS of disjoint distributions = log 2; of identical = 0
    assert M.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(math.log(2))
    assert M.js_divergence(torch.tensor([3.0, 1.0]), torch.tensor([6.0, 2.0])) == pytest.approx(0.0)
    p, q = [0.75, 0.25], [0.25, 0.75]
    m = [0.5, 0.5]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    js = (kl(p, m) + kl(q, m)) / 2
    loads = torch.tensor([[3.0, 1.0], [1.0, 3.0], [3.0, 1.0]])
    assert M.mean_pairwise_js(loads) == pytest.approx((js + 0 + js) / 3)


def test_record_metrics_top_any_and_dropped():
    idx = torch.tensor([[0, 1], [2, -1], [-1, -1], [1, -1]])
    z = torch.zeros(())
    rec = RoutingRecord(idx, torch.zeros(4, 2), torch.zeros(4, 2), torch.full((4, 3), 1 / 3), torch.zeros(4, 3),
                        torch.tensor([1, 2, 1]), torch.tensor([True, True, True]), z, z, torch.tensor(2))
    m = M.record_metrics(rec, top_k=2)
    assert m["experts_per_token"] == pytest.approx(4 / 4)
    assert m["no_expert_share"] == pytest.approx(1 / 4)
    assert m["dropped_rate"] == pytest.approx(2 / 8)
    assert m["router_confidence"] == pytest.approx(1 / 3)
    assert m["active_experts"] == 3.0
