"""Routing-stability metric maths (SPEC §6), pure functions over counts and routing records.

``counts``: tokens per expert ``[E]``; ``active``: bool ``[E]`` (defaults to all experts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .routing import RoutingRecord


def _active(counts: Tensor, active: Tensor | None) -> Tensor:
    return torch.ones_like(counts, dtype=torch.bool) if active is None else active.bool()


def load_cv(counts: Tensor, active: Tensor | None = None) -> float:
    """``std(n) / mean(n)`` over active experts (population std)."""
    n = counts[_active(counts, active)].double()
    if n.numel() == 0 or float(n.mean()) == 0:
        return 0.0
    return float(n.std(unbiased=False) / n.mean())


def max_violation(counts: Tensor, active: Tensor | None = None) -> float:
    """MaxVio ``max_e n_e / mean(n) − 1`` over active experts."""
    n = counts[_active(counts, active)].double()
    if n.numel() == 0 or float(n.mean()) == 0:
        return 0.0
    return float(n.max() / n.mean() - 1.0)


def normalized_load_entropy(counts: Tensor, active: Tensor | None = None) -> float:
    """``H(f) / log E_active`` with ``f = n / sum(n)`` (1 = perfectly balanced)."""
    n = counts[_active(counts, active)].double()
    e = n.numel()
    if e <= 1 or float(n.sum()) == 0:
        return 1.0 if e == 1 else 0.0
    f = n / n.sum()
    h = -(f[f > 0] * f[f > 0].log()).sum()
    return float(h / math.log(e))


def dead_experts(counts: Tensor, active: Tensor | None = None) -> int:
    """Active experts that received no token."""
    return int(((counts == 0) & _active(counts, active)).sum())


def active_experts(active: Tensor) -> int:
    return int(active.bool().sum())


def experts_per_token(rec: RoutingRecord) -> float:
    """Mean number of experts a token uses (non-empty slots)."""
    if rec.num_tokens == 0:
        return 0.0
    return float((rec.expert_indices >= 0).sum(-1).double().mean())


def share_without_expert(rec: RoutingRecord) -> float:
    """Share of tokens that no expert processed (top-any's empty set, or all slots dropped)."""
    if rec.num_tokens == 0:
        return 0.0
    return float(((rec.expert_indices >= 0).sum(-1) == 0).double().mean())


def dropped_rate(rec: RoutingRecord, top_k: int) -> float:
    """Dropped assignments over all ``N * k`` assignments."""
    total = rec.num_tokens * top_k
    return float(rec.num_dropped) / total if total else 0.0


def router_entropy(probs: Tensor) -> float:
    """Mean per-token entropy of the router distribution (rows renormalised to sum 1)."""
    if probs.shape[0] == 0:
        return 0.0
    p = probs.detach().double()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return float(h.mean())


def top1_confidence(probs: Tensor) -> float:
    """Mean over tokens of the largest (row-normalised) router probability."""
    if probs.shape[0] == 0:
        return 0.0
    p = probs.detach().double()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return float(p.max(-1).values.mean())


def top1_flip_rate(prev_top1: Tensor, cur_top1: Tensor) -> float:
    """Fraction of probe tokens whose top-1 expert changed."""
    if prev_top1.numel() == 0:
        return 0.0
    return float((prev_top1 != cur_top1).double().mean())


def jaccard_churn(prev_sets: Tensor, cur_sets: Tensor, num_experts: int) -> float:
    """``1 − mean_t J(S_t, S'_t)`` over probe tokens; sets as ``[N, K]`` indices with −1 empty.
    Two empty sets count as identical (J = 1)."""
    if prev_sets.shape[0] == 0:
        return 0.0

    def onehot(s: Tensor) -> Tensor:
        oh = torch.zeros(s.shape[0], num_experts + 1, dtype=torch.bool, device=s.device)
        oh.scatter_(1, torch.where(s >= 0, s, torch.full_like(s, num_experts)), True)
        return oh[:, :num_experts]

    a, b = onehot(prev_sets), onehot(cur_sets)
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    j = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return float(1.0 - j.mean())


def fusion_drift(pi_now: Tensor, pi_prev: Tensor) -> float:
    """``||pi_now − pi_prev||_1``."""
    return float((pi_now.double() - pi_prev.double()).abs().sum())


def router_saturation(top1_by_step: dict[int, Tensor], reference_step: int | None = None) -> dict[int, float]:
    """OLMoE's router saturation: for every saved step ``τ``, the share of probe tokens whose top-1
    expert at ``τ`` equals their top-1 at the reference step (default: the last saved step, the
    final checkpoint). ``top1_by_step``: step -> ``[N]`` expert ids (−1: no expert, compared as an id)."""
    if not top1_by_step:
        return {}
    ref = max(top1_by_step) if reference_step is None else reference_step
    final = top1_by_step[ref]
    out = {}
    for step in sorted(top1_by_step):
        t = top1_by_step[step]
        if t.shape != final.shape:
            raise ValueError(f"router_saturation: step {step} has {tuple(t.shape)} probe tokens, "
                             f"the reference step {ref} {tuple(final.shape)}")
        out[step] = float((t == final).double().mean()) if t.numel() else 1.0
    return out


def entropy(p: Tensor) -> float:
    """Shannon entropy (nats) of a distribution."""
    q = p.double()
    q = q[q > 0]
    return float(-(q * q.log()).sum())


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen–Shannon divergence (nats) between two distributions (normalised first)."""
    p = p.double() / p.double().sum()
    q = q.double() / q.double().sum()
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        nz = a > 0
        return (a[nz] * (a[nz] / b[nz]).log()).sum()

    return float((kl(p, m) + kl(q, m)) / 2)


def mean_pairwise_js(loads: Tensor) -> float:
    """Mean JS divergence over all pairs of rows of ``loads [D, E]`` (per-domain expert loads)."""
    d = loads.shape[0]
    vals = [js_divergence(loads[i], loads[j]) for i in range(d) for j in range(i + 1, d)]
    return sum(vals) / len(vals) if vals else 0.0


def record_metrics(rec: RoutingRecord, top_k: int) -> dict[str, float]:
    """Every per-batch metric of one routing record, keyed by its standard name."""
    counts, active = rec.tokens_per_expert, rec.active_mask
    out = {
        "load_cv": load_cv(counts, active),
        "max_vio": max_violation(counts, active),
        "load_entropy": normalized_load_entropy(counts, active),
        "dead_experts": float(dead_experts(counts, active)),
        "active_experts": float(active_experts(active)),
        "experts_per_token": experts_per_token(rec),
        "no_expert_share": share_without_expert(rec),
        "dropped_rate": dropped_rate(rec, top_k),
        "router_entropy": router_entropy(rec.router_probs),
        "router_confidence": top1_confidence(rec.router_probs),
        "aux_loss": float(rec.aux_loss.detach()),
        "z_loss": float(rec.z_loss.detach()),
    }
    if rec.fusion_pi is not None:
        out["fusion_entropy"] = entropy(rec.fusion_pi)
    return out
