"""Auxiliary MoE losses as pure functions of tensors (SPEC §2), and their registry.

All inputs are over real tokens only (padding removed beforehand). A router computes its aux loss
as ``AUX_LOSSES[cfg.aux_loss](inputs)`` with ``inputs`` an :class:`AuxInputs`; each registered
:class:`AuxLoss` names the router families it fits (``softmax``: topk/cosine, ``topany``,
``lossfree``, ``expert_choice``), which :class:`rmoe.config.MoEConfig` checks. Adding an aux loss is
one :func:`register_aux_loss`. Every loss is computed by one layer from its own routing; layers are
summed only afterwards (SPEC §2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import AUX_LOSSES

_EPS = 1e-10


def expert_counts(indices: Tensor, num_experts: int, dtype: torch.dtype = torch.long) -> Tensor:
    """``[E]`` how often each expert appears in ``indices`` (any shape; −1 = empty, not counted).
    Same as ``bincount(indices[indices >= 0], minlength=E)`` without its two host syncs (the
    boolean filter's size and bincount's own maximum): a scatter-add of 0/1 weights."""
    flat = indices.reshape(-1)
    valid = flat >= 0
    return torch.zeros(num_experts, dtype=dtype, device=flat.device).index_add_(
        0, torch.where(valid, flat, 0), valid.to(dtype))


def switch_balance_loss(router_probs: Tensor, top1: Tensor, active: Tensor | None = None) -> Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * P_e``.

    ``f_e``: fraction of tokens whose first choice is ``e``; ``P_e``: mean router probability of
    ``e``. ``E`` counts active experts when ``active`` (bool ``[E]``) is given. Minimum 1.
    """
    n, e = router_probs.shape
    num = active.sum() if active is not None else e
    if n == 0:
        return router_probs.sum() * 0.0
    f = expert_counts(top1, e, router_probs.dtype) / n
    p = router_probs.mean(0)
    return num * torch.sum(f * p)


def _dist_world() -> int:
    """The data-parallel world size when a process group is up, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@dataclass(frozen=True)
class GlobalBatchWindow:
    """``f_e`` of the ``global_batch`` loss for one micro-batch of a gradient-accumulation window, set on
    the router around that micro-batch's training forward (:mod:`rmoe.accumulation`).

    counts: ``[E]`` selection counts ``C_e`` (each token's ``k`` experts) over every micro-batch of the
    window and every rank; total: their tokens ``N``; scale: ``R · M`` (ranks × micro-batches in the
    window); expected: ``[E + 1]`` this rank's selection counts and token count of this micro-batch as the
    routing pre-pass routed it — the forward checks that it routes exactly these (None: no check).
    """

    counts: Tensor
    total: float
    scale: float
    expected: Tensor | None = None


@dataclass(frozen=True)
class GlobalBatchRunning:
    """Megatron-Core's ``global_aux_loss`` state (``global_batch_mode=megatron``): the router's buffers
    ``counts`` ``[E]`` (the global selection counts of the step's micro-batches so far, summed) and ``steps``
    (how many), which each training forward adds to in place and the router resets after the optimizer step."""

    counts: Tensor
    steps: Tensor


class GlobalBatchCounter:
    """Set on a router during the routing pre-pass: each training forward appends its ``[E + 1]``
    selection counts and token count to ``recorded`` and returns a zero loss (no all-reduce)."""

    def __init__(self) -> None:
        self.recorded: list[Tensor] = []


class _WindowRequired:
    """Sentinel: gradient accumulation is on, so a training forward must have a :class:`GlobalBatchWindow`."""

    def __repr__(self) -> str:
        return "WINDOW_REQUIRED"


WINDOW_REQUIRED = _WindowRequired()


def global_batch_balance_loss(router_probs: Tensor, selected: Tensor, reduce: bool = True,
                              window: GlobalBatchWindow | GlobalBatchCounter | GlobalBatchRunning | _WindowRequired
                              | None = None, top_k: int | None = None) -> Tensor:
    """Global-batch Switch loss (Qwen): ``E · Σ_e f_e P_e`` with ``f_e`` over the whole global batch of
    the optimizer step and ``P_e`` over this forward's tokens.

    ``selected``: ``[N, K]`` each token's selected experts before capacity (−1 empty; ``[N]``: one each),
    ``top_k``: ``k`` (None: ``K``). ``C_e`` counts every selection of ``e``, all ``k`` per token, and
    ``f_e = C_e / (k N)`` (Megatron-Core ``switch_load_balancing_loss_func``, Qiu et al. 2025), so
    ``Σ_e f_e = 1``. ``window`` None (one forward per rank and step): the counts and the token count are
    summed over ranks (``reduce`` and a process group up): ``C_e``, ``N`` global constants (no
    gradient). Rank ``r`` with ``n_r`` tokens returns ``E · Σ_e f_e · R · Σ_{t∈r} p_te / N``
    (``R`` ranks): the mean of these over ranks is the full-batch loss ``E Σ_e f_e P_e^{global}``, so
    DDP's gradient *averaging* yields exactly the full-batch gradient, for any ``R`` and unequal token
    counts. With one process it is :func:`switch_balance_loss`.

    ``window`` a :class:`GlobalBatchWindow` (gradient accumulation over ``M`` micro-batches): ``C_e`` and
    ``N`` come from the window (all micro-batches, all ranks) and the forward returns
    ``E · Σ_e f_e · (R·M) · Σ_{t∈(m,r)} p_te / N``. Divided by the accumulation count ``A`` and summed
    over the micro-batches, then averaged over ranks, this is ``(M/A) · E Σ_e f_e P_e`` of the whole
    window: the full-batch loss for a full window (``M = A``), and for the epoch's shorter last window
    the same ``M/A`` factor the trainer's division gives the task loss. The forward's own counts must
    equal ``window.expected`` (else RuntimeError). A :class:`GlobalBatchCounter` records the counts
    (routing pre-pass); :data:`WINDOW_REQUIRED` raises (accumulation without a window).

    ``window`` a :class:`GlobalBatchRunning` (Megatron-Core ``router.py`` ``_apply_global_aux_loss``): this
    forward's counts and tokens are summed over ranks (``reduce``), the counts added to the running sum, and
    ``f_e = (Σ_{i≤j} C_{i,e} / j) / (k T_j)`` with ``T_j`` this micro-batch's tokens over all ranks; the rank
    returns ``E · Σ_e f_e · Σ_{t∈r} p_te / T_j`` — no factor ``R``: the ranks' losses *sum* to the micro-batch's
    loss, so DDP's gradient mean is ``1/R`` of its gradient (Megatron-Core's ``switch_load_balancing_loss_func``
    per rank).
    """
    n, e = router_probs.shape
    if selected.dim() == 1:
        selected = selected.unsqueeze(1)
    k = int(top_k) if top_k is not None else selected.shape[1]
    flat = selected.reshape(-1)
    counts = expert_counts(flat, e, torch.float64)
    stats = torch.cat([counts, counts.new_tensor([float(n)])])
    if isinstance(window, GlobalBatchCounter):
        window.recorded.append(stats)
        return router_probs.sum() * 0.0
    if isinstance(window, GlobalBatchRunning):
        if reduce and _dist_world() > 1:
            torch.distributed.all_reduce(stats)
        total = float(stats[e])
        with torch.no_grad():
            window.counts.add_(stats[:e].to(window.counts))
            window.steps.add_(1)
        if total == 0:
            return router_probs.sum() * 0.0
        mean = window.counts.to(device=router_probs.device, dtype=torch.float64) / window.steps.to(torch.float64)
        f = (mean / (k * total)).to(router_probs.dtype)
        return e * torch.sum(f * router_probs.sum(0)) / total
    if isinstance(window, _WindowRequired):
        raise RuntimeError("moe.aux_loss='global_batch' under gradient accumulation: this training forward has "
                           "no accumulation window (its f_e would count one micro-batch only); the routing "
                           "pre-pass (rmoe.accumulation, callbacks.balancing.BalancingCallback) sets one around "
                           "every training micro-batch")
    if window is not None:
        if window.expected is not None and not torch.equal(stats, window.expected.to(stats)):
            raise RuntimeError(
                "global_batch accumulation window: this training forward routed selection counts and tokens "
                f"{stats.tolist()} but the routing pre-pass of the same micro-batch routed "
                f"{window.expected.tolist()}; f_e would not be the global batch's. The forward is not reproducible "
                "between the pre-pass and the training forward: non-deterministic kernels (on CUDA the experts' "
                "index_add; set trainer.deterministic=true), state changed between micro-batches (Stateful Fusion's "
                "m moved by a validation inside the window: validate at window ends), or random numbers drawn "
                "inside the forward from a generator other than torch's CPU and CUDA ones")
        if window.total == 0:
            return router_probs.sum() * 0.0
        f = (window.counts.to(device=router_probs.device, dtype=torch.float64) / (k * window.total)
             ).to(router_probs.dtype)
        return e * torch.sum(f * router_probs.sum(0)) * (window.scale / window.total)
    world = 1
    if reduce and _dist_world() > 1:
        torch.distributed.all_reduce(stats)
        world = _dist_world()
    total = float(stats[e])
    if total == 0:
        return router_probs.sum() * 0.0
    f = (stats[:e] / (k * total)).to(router_probs.dtype)
    return e * torch.sum(f * router_probs.sum(0)) * (world / total)


def seq_balance_loss(scores: Tensor, selected: Tensor, seq_ids: Tensor | None, k: int) -> Tensor:
    """Sequence-level balance loss (DeepSeek-V3): ``mean_s Σ_e f_{s,e} P_{s,e}``.

    ``f_{s,e} = E / (k · T_s) · #{t ∈ s : e ∈ selected_t}``, ``P_{s,e} = mean_{t ∈ s} scores_te`` with
    ``scores [N, E]`` normalised over experts (softmax probabilities, or sigmoid scores divided by
    their sum), ``selected [N, K]`` the chosen experts (−1 empty), ``T_s`` the real tokens of
    sequence ``s`` and ``seq_ids [N]`` each token's sequence (None: one sequence). 1 at balance.
    """
    n, e = scores.shape
    if n == 0:
        return scores.sum() * 0.0
    if seq_ids is None:
        seq = torch.zeros(n, dtype=torch.long, device=scores.device)
    else:
        seq = torch.unique(seq_ids, return_inverse=True)[1]
    s = int(seq.max()) + 1
    t_s = torch.bincount(seq, minlength=s).to(scores.dtype).unsqueeze(1)
    valid = selected >= 0
    rows = seq.unsqueeze(1).expand_as(selected)[valid]
    counts = torch.bincount(rows * e + selected[valid], minlength=s * e).reshape(s, e).to(scores.dtype)
    f = counts * (e / k) / t_s
    p = scores.new_zeros(s, e).index_add(0, seq, scores) / t_s
    return (f * p).sum(-1).mean()


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
    f = expert_counts(first_selected, e, gates.dtype) / n
    return active.sum() * torch.sum(gates.mean(0) * f)


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
    (top-any), else None. selected: ``[N, K]`` the experts each token chose before capacity (−1
    empty), when the router has such a choice. seq_ids: ``[N]`` each token's sequence (None: no
    sequence layout). training: the router is in training mode (losses that reduce over
    data-parallel ranks do so only then: every rank runs the same training forwards). For the
    ``lossfree`` router ``probs`` are its scores normalised over experts. global_batch_window: the
    router's ``global_batch_window`` (:func:`global_batch_balance_loss`; read in training only).
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
    selected: Tensor | None = None
    seq_ids: Tensor | None = None
    training: bool = False
    global_batch_window: object | None = None


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


@register_aux_loss("global_batch", families=("softmax",))
def _global_batch(a: AuxInputs) -> Tensor:
    selected = a.selected if a.selected is not None else a.first_choice.unsqueeze(1)
    return global_batch_balance_loss(a.probs, selected, reduce=a.training,
                                     window=a.global_batch_window if a.training else None,
                                     top_k=a.top_k if a.selected is not None else 1)


@register_aux_loss("seq_balance", families=("softmax", "lossfree"))
def _seq_balance(a: AuxInputs) -> Tensor:
    selected = a.selected if a.selected is not None else a.first_choice.unsqueeze(1)
    return seq_balance_loss(a.probs, selected, a.seq_ids, a.top_k if a.selected is not None else 1)


@register_aux_loss("none")
def _no_aux(a: AuxInputs) -> Tensor:
    return a.logits.sum() * 0.0
