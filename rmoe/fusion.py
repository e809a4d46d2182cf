"""Stateful Fusion of expert weights (RMoE mechanism 2, SPEC §4)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .config import FusionConfig
from .routing import RoutingRecord


def fusion_pi(m: Tensor) -> Tensor:
    """``pi_e = (1 + m_e) / sum_j (1 + m_j)``."""
    w = 1.0 + m
    return w / w.sum()


def fused_weights(pi: Tensor, indices: Tensor) -> Tensor:
    """``w_te = pi_e / sum_{j in S_t} pi_j`` over each token's selected (non-empty) slots."""
    valid = indices >= 0
    p = pi[indices.clamp_min(0)] * valid
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def clamp_empty_slots(indices: Tensor, num_experts: int) -> Tensor:
    """The released code's clamp (SPEC §9): every empty slot (``-1``) becomes the last slot ``E_max - 1``."""
    return torch.where(indices >= 0, indices, torch.full_like(indices, num_experts - 1))


def fused_weights_clamped(pi: Tensor, indices: Tensor) -> Tensor:
    """The released fusion weights: ``pi`` gathered at the clamped indices, L1-normalised over all ``K`` slots
    (so a padded slot's ``pi_{E_max-1}`` enters every short token's normalisation)."""
    p = pi[clamp_empty_slots(indices, pi.shape[0])]
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


class StatefulFusion(nn.Module):
    """Keeps ``m`` (a buffer, saved in checkpoints) and re-weights each token's selected experts.

    Each training forward (and eval forward when ``update_in_eval``):
    ``a_e = agg_t score_te`` (detached; summed over data-parallel ranks), ``m <- d m + (1-d) a`` (``d = ema_decay``),
    where ``score`` is the router's dispatch score (``RoutingRecord.dispatch_scores``: the binary
    activations ``z`` for top-any, so with ``agg=sum`` ``a_e`` counts the tokens that activated
    ``e``; the probabilities for softmax routers).
    Weights: ``w = alpha * pi_e / sum_{S_t} pi + (1 - alpha) * g_t``.
    """

    def __init__(self, num_experts: int, cfg: FusionConfig, pad_clamp: bool = False):
        super().__init__()
        self.cfg = cfg
        self.pad_clamp = pad_clamp  # the released code's clamp of empty slots (SPEC §9; ReleasedConfig)
        self.register_buffer("m", torch.zeros(num_experts, dtype=torch.float32))
        self.frozen = False  # set by frozen_fusion(): forwards that must not move m (e.g. a sanity check)

    @torch.no_grad()
    def update(self, scores: Tensor) -> None:
        a = scores.detach().float().sum(0)
        n = torch.tensor(float(scores.shape[0]), device=a.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(a)
            torch.distributed.all_reduce(n)
        if self.cfg.agg == "mean":
            a = a / n.clamp_min(1.0)
        self.m.mul_(self.cfg.ema_decay).add_((1.0 - self.cfg.ema_decay) * a)

    @property
    def pi(self) -> Tensor:
        return fusion_pi(self.m)

    def forward(self, rec: RoutingRecord) -> RoutingRecord:
        if (self.training or self.cfg.update_in_eval) and not self.frozen:
            self.update(rec.dispatch_scores)
        pi = self.pi
        alpha = self.cfg.mix_alpha
        if self.pad_clamp:
            # released: empty slots are clamped to E_max - 1, weighted by its pi and dispatched to it
            w_state = fused_weights_clamped(pi, rec.expert_indices)
            weights = w_state if alpha == 1.0 else alpha * w_state + (1.0 - alpha) * rec.gate_values
            return rec.replace(expert_indices=clamp_empty_slots(rec.expert_indices, pi.shape[0]),
                               expert_weights=weights, fusion_pi=pi.detach().clone())
        w_state = fused_weights(pi, rec.expert_indices)
        weights = w_state if alpha == 1.0 else alpha * w_state + (1.0 - alpha) * rec.gate_values
        weights = weights * (rec.expert_indices >= 0)
        return rec.replace(expert_weights=weights, fusion_pi=pi.detach().clone())


@contextlib.contextmanager
def frozen_fusion(model: nn.Module) -> Iterator[None]:
    """Within the block no :class:`StatefulFusion` of ``model`` updates ``m`` (weights still use it):
    for forwards that are not part of the method, such as a trainer's sanity-check validation, which
    would otherwise move ``m`` under ``update_in_eval`` (and differently in a resumed run)."""
    layers = [m for m in model.modules() if isinstance(m, StatefulFusion)]
    before = [f.frozen for f in layers]
    for f in layers:
        f.frozen = True
    try:
        yield
    finally:
        for f, b in zip(layers, before):
            f.frozen = b
