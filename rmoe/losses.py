"""Auxiliary MoE losses as pure functions of tensors (SPEC §2), and their registry.

All inputs are over real tokens only (padding removed beforehand). A router computes its aux loss
as ``AUX_LOSSES[cfg.aux_loss](inputs)`` with ``inputs`` an :class:`AuxInputs`; each registered
:class:`AuxLoss` names the router families it fits (``softmax``: topk/cosine, ``topany``), which
:class:`rmoe.config.MoEConfig` checks. Adding an aux loss is one :func:`register_aux_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import AUX_LOSSES

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


# --- registry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuxInputs:
    """What a router hands its aux loss (fp32, ``N`` real tokens, ``E`` expert slots).

    logits: ``[N, E]`` clean router logits. noisy_logits: ``[N, E]`` the logits the choice was made
    on (== logits without gate noise). probs: ``[N, E]`` softmax probabilities (softmax family) or
    masked sigmoid scores (top-any). gates: ``[N, E]`` the top-any binary activations ``z``
    (straight-through; softmax family: ``probs``). first_choice: ``[N]`` each token's first choice
    before capacity (softmax family) or first selected slot, −1 for none (top-any). active: ``[E]``
    bool pool. top_k, noise_std (``gate_noise / E``). gate_weight: ``[d, E]`` gate embeddings
    (top-any), else None.
    """

    logits: Tensor
    noisy_logits: Tensor
    probs: Tensor
    gates: Tensor
    first_choice: Tensor
    active: Tensor
    top_k: int = 1
    noise_std: float = 0.0
    gate_weight: Tensor | None = None


AuxFn = Callable[[AuxInputs], Tensor]


@dataclass(frozen=True)
class AuxLoss:
    """A registered aux loss: ``fn(inputs) -> scalar``; ``families``: the router families it fits
    (None: every router); ``needs_noise``: it needs ``gate_noise > 0``."""

    name: str
    fn: AuxFn
    families: tuple[str, ...] | None = None
    needs_noise: bool = False

    def __call__(self, inputs: AuxInputs) -> Tensor:
        return self.fn(inputs)

    def fits(self, family: str) -> bool:
        return self.families is None or family in self.families


def register_aux_loss(name: str, families: Sequence[str] | None = None, needs_noise: bool = False,
                      replace: bool = False) -> Callable[[AuxFn], AuxFn]:
    """Decorator: register ``fn(inputs: AuxInputs) -> Tensor`` as aux loss ``name``."""

    def add(fn: AuxFn) -> AuxFn:
        AUX_LOSSES.register(name, AuxLoss(name, fn, tuple(families) if families is not None else None,
                                          needs_noise), replace=replace)
        return fn

    return add


@register_aux_loss("switch", families=("softmax",))
def _switch(a: AuxInputs) -> Tensor:
    return switch_balance_loss(a.probs, a.first_choice)


@register_aux_loss("load_importance", families=("softmax",), needs_noise=True)
def _load_importance_textbook(a: AuxInputs) -> Tensor:
    return load_importance_loss(a.logits, a.noisy_logits, a.top_k, a.noise_std)


@register_aux_loss("load_importance_tutel", families=("softmax",), needs_noise=True)
def _load_importance_tutel(a: AuxInputs) -> Tensor:
    return load_importance_loss_tutel(a.logits, a.noisy_logits, a.top_k, a.noise_std)


@register_aux_loss("dynmoe", families=("topany",))
def _dynmoe(a: AuxInputs) -> Tensor:
    return dynmoe_diverse_simple_loss(a.gate_weight, a.active)


@register_aux_loss("gshard_binary", families=("topany",))
def _gshard_binary(a: AuxInputs) -> Tensor:
    return gshard_binary_loss(a.gates, a.first_choice, a.active)


@register_aux_loss("none")
def _no_aux(a: AuxInputs) -> Tensor:
    return a.logits.sum() * 0.0
