"""Auxiliary MoE losses as pure functions of tensors (SPEC §2).

All inputs are over real tokens only (padding removed beforehand).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-10


def switch_balance_loss(router_probs: Tensor, top1: Tensor, active: Tensor | None = None) -> Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * P_e``.

    ``f_e``: fraction of tokens whose first choice is ``e``; ``P_e``: mean router probability of
    ``e``. ``E`` counts active experts when ``active`` (bool ``[E]``) is given. Minimum 1.
    """
    n, e = router_probs.shape
    num = int(active.sum()) if active is not None else e
    if n == 0:
        return router_probs.sum() * 0.0
    f = torch.bincount(top1, minlength=e).to(router_probs.dtype) / n
    p = router_probs.mean(0)
    return num * torch.sum(f * p)


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (unbiased variance, as Shazeer)."""
    x = x.float()
    if x.numel() <= 1:
        return x.sum() * 0.0
    return x.var() / (x.mean() ** 2 + _EPS)


def _load_importance(importance: Tensor, load: Tensor) -> Tensor:
    return (cv_squared(importance) + cv_squared(load)) / 2


def load_importance_loss(clean_logits: Tensor, noisy_logits: Tensor, k: int, noise_std: float) -> Tensor:
    """Shazeer et al. (textbook form): ``(CV²(importance) + CV²(load)) / 2``.

    ``importance_e = Σ_t softmax(clean)_te``;
    ``load_e = Σ_t Φ((clean_te − kth_excl_te) / noise_std)`` with ``kth_excl_te`` the k-th largest
    noisy logit of token t among the experts other than ``e`` (the (k+1)-th largest when ``e`` is in
    the token's noisy top-k, else the k-th; −∞ when there are only k experts) and
    ``noise_std = gate_noise / E``.
    """
    if noise_std <= 0:
        raise ValueError(f"load_importance_loss needs noise_std > 0, got {noise_std}")
    e = clean_logits.shape[-1]
    importance = torch.softmax(clean_logits, dim=-1).sum(0)
    top = noisy_logits.topk(min(k + 1, e), dim=-1).values
    kth = top[:, k - 1 : k]
    kth_next = top[:, k : k + 1] if k < e else torch.full_like(kth, float("-inf"))
    threshold = torch.where(noisy_logits >= kth, kth_next, kth)
    normal = torch.distributions.Normal(0.0, 1.0)
    load = normal.cdf((clean_logits - threshold) / noise_std).sum(0)
    return _load_importance(importance, load)


def load_importance_loss_tutel(clean_logits: Tensor, noisy_logits: Tensor, k: int, noise_std: float) -> Tensor:
    """tutel's load-importance loss (GMoE's cosine layers): ``(CV²(importance) + CV²(load)) / 2``.

    ``p = softmax(clean)``; ``importance_e = Σ_t p_te``; ``load_e = Σ_t Φ((p_te − kth_t) / noise_std)``
    with ``kth_t`` the k-th largest noisy logit of token t over all experts: tutel passes the clean
    *probabilities* where the textbook form has the clean logits, and does not exclude ``e``.
    """
    if noise_std <= 0:
        raise ValueError(f"load_importance_loss_tutel needs noise_std > 0, got {noise_std}")
    probs = torch.softmax(clean_logits, dim=-1)
    kth = noisy_logits.topk(k, dim=-1).values[:, k - 1 : k]
    normal = torch.distributions.Normal(0.0, 1.0)
    load = normal.cdf((probs - kth) / noise_std).sum(0)
    return _load_importance(probs.sum(0), load)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_e logits_te)^2``."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def dynmoe_diverse_simple_loss(w: Tensor, active: Tensor) -> Tensor:
    """DynMoE ``||(Ŵᵀ Ŵ − I) ⊙ (M Mᵀ)||_F + mean_e ||W_:,e||_2``.

    ``w``: ``[d, E_max]`` gate embeddings (one column per expert), ``active``: bool ``[E_max]``.
    The simplicity mean runs over all ``E_max`` columns, inactive ones included (DynMoE's code).
    """
    wn = F.normalize(w, dim=0)
    m = active.to(w.dtype)
    gram = wn.t() @ wn - torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    diverse = torch.linalg.matrix_norm(gram * torch.outer(m, m), ord="fro")
    return diverse + w.norm(dim=0).mean()


def gshard_binary_loss(gates: Tensor, first_selected: Tensor, active: Tensor) -> Tensor:
    """GShard form on top-any's binary gates (DynMoE vision): ``E_act * Σ_e mean_t(z_te) * f_e``.

    ``gates``: ``[N, E]`` binary activations (differentiable through the straight-through sign);
    ``first_selected``: ``[N]`` each token's first selected slot (−1 for a token with no expert:
    it counts in ``N`` but in no ``f_e``); ``f_e``: fraction of the ``N`` tokens whose first selected
    slot is ``e``; ``E_act``: active experts.
    """
    n, e = gates.shape
    if n == 0:
        return gates.sum() * 0.0
    chosen = first_selected[first_selected >= 0]
    f = torch.bincount(chosen, minlength=e).to(gates.dtype) / n
    return int(active.sum()) * torch.sum(gates.mean(0) * f)
