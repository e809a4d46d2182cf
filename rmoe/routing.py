"""Routers (SPEC §1): one small class per routing rule, all returning an immutable RoutingRecord.

Routing is computed in fp32 even under autocast. Routers see real tokens only, ``x: [N, d]``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses
from .config import MoEConfig, RouterOptions, renamed
from .losses import AuxInputs, GlobalBatchRunning
from .registry import AUX_LOSSES, ROUTERS
from .router_options import CosineOptions, LossFreeOptions


@dataclass(frozen=True)
class RoutingRecord:
    """What a router decided for ``N`` real tokens, with the losses that travel with it.

    expert_indices: ``[N, K]`` long, −1 where a slot is empty (or its token was dropped).
    expert_weights: ``[N, K]`` combine weights (0 on empty slots).
    gate_values:    ``[N, K]`` the router's own gate values (before Stateful Fusion).
    router_probs:   ``[N, E]`` softmax probabilities (topk/cosine) or masked sigmoid scores (topany).
    dispatch_scores: ``[N, E]`` what the router hands the dispatcher, the score Stateful Fusion
                    aggregates (SPEC §4.1): the probabilities for topk/cosine, the binarised
                    activations ``z`` for topany (in eval, tokens with no active expert hand over
                    their sigmoid scores ``s``, from which the dispatcher takes the top-1).
    router_logits:  ``[N, E]`` fp32 logits (cosine: scaled similarities; topany: pre-sigmoid).
    tokens_per_expert: ``[E]`` long, tokens each expert processes (after dropping).
    active_mask:    ``[E]`` bool, experts in the pool.
    aux_loss, z_loss: scalars. num_dropped: assignments dropped by capacity.
    selection_scores: ``[N, E]`` the scores the experts were selected by when they are not
                    ``router_probs`` (``lossfree``: the biased ``s + b``); None otherwise.
    """

    expert_indices: Tensor
    expert_weights: Tensor
    gate_values: Tensor
    router_probs: Tensor
    router_logits: Tensor
    tokens_per_expert: Tensor
    active_mask: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    num_dropped: Tensor
    dispatch_scores: Tensor | None = None
    fusion_pi: Tensor | None = None
    selection_scores: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_indices.shape[0]

    def replace(self, **kw) -> RoutingRecord:
        return replace(self, **kw)


def _no_autocast(x: Tensor):
    """Routing runs in fp32 even under bf16/fp16 autocast (SPEC §1)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def tokens_per_expert(indices: Tensor, num_experts: int) -> Tensor:
    return losses.expert_counts(indices, num_experts)


def apply_capacity(indices: Tensor, num_experts: int, capacity: int,
                   priority: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Drop assignments beyond ``capacity`` per expert.

    All first choices claim places before all second choices, ... (GShard/Tutel). Within a rank,
    tokens go in token order, or, with ``priority [N]`` (batch-prioritized routing: each token's
    top-1 probability), in descending priority, so the least confident tokens are dropped first.
    Returns the indices with dropped slots set to −1 and the number dropped.
    """
    if priority is not None:
        order = torch.sort(priority, descending=True, stable=True).indices
        kept_sorted, dropped = apply_capacity(indices.index_select(0, order), num_experts, capacity)
        return torch.empty_like(kept_sorted).index_copy_(0, order, kept_sorted), dropped
    n, k = indices.shape
    by_rank = indices.t().reshape(-1)  # [K*N], rank-major
    onehot = F.one_hot(by_rank.clamp_min(0), num_experts) * (by_rank >= 0).unsqueeze(-1)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # position of each slot in its expert
    keep = (position < capacity) & (by_rank >= 0)
    kept = torch.where(keep, by_rank, torch.full_like(by_rank, -1)).reshape(k, n).t()
    dropped = ((by_rank >= 0) & ~keep).sum()
    return kept.contiguous(), dropped


@dataclass(frozen=True)
class Route:
    """What a router's :meth:`Router.route` decides for ``N`` real tokens; :meth:`Router.forward` assembles the
    :class:`RoutingRecord` (and the aux loss's inputs) from it.

    indices, weights: ``[N, K]`` the record's ``expert_indices`` / ``expert_weights`` (−1 / 0 on empty slots).
    probs:           ``[N, E]`` the record's ``router_probs``.
    gates:           ``[N, K]`` the record's ``gate_values`` (None: ``weights``).
    dispatch_scores: ``[N, E]`` (None: ``probs``). num_dropped: scalar long (None: 0).
    selection_scores: as the record's.
    aux_probs, aux_gates: the aux inputs' ``probs`` / ``gates`` (None: ``probs`` / ``aux_probs``).
    aux_selected:    ``[N, K']`` the aux inputs' ``selected``, its first column their ``first_choice`` and its
                     width their ``top_k`` (None: ``indices``). gate_weight: the aux inputs' ``gate_weight``.
    """

    indices: Tensor
    weights: Tensor
    probs: Tensor
    gates: Tensor | None = None
    dispatch_scores: Tensor | None = None
    num_dropped: Tensor | None = None
    selection_scores: Tensor | None = None
    aux_probs: Tensor | None = None
    aux_gates: Tensor | None = None
    aux_selected: Tensor | None = None
    gate_weight: Tensor | None = None


class Router(nn.Module):
    """Base class: one routing step for every router, ``forward(x [N, d], seq_ids=None) -> RoutingRecord``
    (as flaxformer's ``routing.Router.__call__``, google/flaxformer ``flaxformer/architectures/moe/routing.py``):

    1. fp32: autocast off, ``x`` cast to float32 (SPEC §1);
    2. ``logits = self.logits(x)`` (the router's scoring network);
    3. gate noise in training: ``logits + gate_noise · ε / E``, ``ε ~ N(0, 1)`` (routers that take no noise refuse
       ``gate_noise > 0`` in ``check_config``);
    4. ``self.route(x, noisy_logits) -> Route`` -- the one method a router overrides: its scores and dispatch;
    5. the aux loss (looked up once, by name, in :data:`rmoe.registry.AUX_LOSSES`) on inputs assembled from the
       route, the router z-loss on the clean logits of the active experts, and the :class:`RoutingRecord`.

    A new router is a subclass registered with ``@ROUTERS.register(name)`` that defines ``logits`` and ``route``
    (README, "Add a method"); its class attributes tell config validation what fits it:

    * ``family``: which aux losses fit (an aux loss lists the families it supports);
    * ``default_aux_loss``: the aux loss when ``aux_loss`` is null;
    * ``adaptive_pool``: ``max_experts`` may exceed ``initial_experts`` (slots switched on later);
    * ``dropless``: no finite capacity and no batch-prioritized routing;
    * ``uses_top_k``: ``top_k`` is read (and must be <= ``initial_experts``);
    * ``Options``: the router's own settings (a :class:`rmoe.config.RouterOptions` dataclass, validated there),
      read from ``router_options`` as ``self.options``.

    A router may define ``check_config(cfg, fail)`` (a classmethod) for checks of its own; it calls
    ``fail(key, value, allowed)``. ``seq_ids`` (``[N]``, each real token's sequence) go to the aux loss.
    ``global_batch_window`` (not saved) is what the ``global_batch`` loss takes ``f_e`` from under
    gradient accumulation (:mod:`rmoe.accumulation`); None: from the forward itself. With
    ``aux_loss=global_batch`` and ``global_batch_mode=megatron`` the router keeps Megatron-Core's running counts
    (buffers ``global_batch_counts`` / ``global_batch_steps``, cleared by :meth:`reset_global_batch_counts`).
    """

    family: str = ""
    default_aux_loss: str = "none"
    adaptive_pool: bool = False
    dropless: bool = False
    uses_top_k: bool = True
    Options: type[RouterOptions] = RouterOptions

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        self.options = cfg.router_options
        self.max_experts = cfg.max_experts  # expert slots (cfg.initial_experts: those active at the start)
        self.aux_loss_fn = AUX_LOSSES[cfg.aux_loss]
        self.global_batch_window: object | None = None
        self.megatron_global_batch = cfg.aux_loss == "global_batch" and cfg.global_batch_mode == "megatron"
        if self.megatron_global_batch:  # Megatron-Core's running counts (SPEC §2), reset after each optimizer step
            self.register_buffer("global_batch_counts", torch.zeros(cfg.max_experts, dtype=torch.float64))
            self.register_buffer("global_batch_steps", torch.zeros((), dtype=torch.float64))

    @property
    def active_mask(self) -> Tensor:
        """The experts in the pool, ``[E]`` bool: every slot (a router with an adaptive pool keeps a mask), on the
        router's device (CPU for a router without parameters or buffers)."""
        held = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.ones(self.max_experts, dtype=torch.bool, device=None if held is None else held.device)

    @property
    def num_experts(self) -> int:
        """Deprecated name of :attr:`max_experts` (the slot count; ``cfg.initial_experts`` is the active experts at
        the start), read until the next release."""
        renamed(type(self).__name__, "num_experts", "max_experts")
        return self.max_experts

    def logits(self, x: Tensor) -> Tensor:
        """``[N, E]`` fp32 logits of ``x [N, d]`` (fp32)."""
        raise NotImplementedError

    def route(self, x: Tensor, logits: Tensor) -> Route:
        """The router's own decision from ``x [N, d]`` and the (noisy, in training) fp32 ``logits [N, E]``."""
        raise NotImplementedError

    def reset_global_batch_counts(self) -> None:
        """``global_batch_mode=megatron``: clear the running counts (after every optimizer step, as Megatron-Core's
        ``reset_global_aux_loss_tracker`` in ``finalize_model_grads``; ``callbacks.balancing`` calls it)."""
        if self.megatron_global_batch:
            self.global_batch_counts.zero_()
            self.global_batch_steps.zero_()

    def forward(self, x: Tensor, seq_ids: Tensor | None = None) -> RoutingRecord:
        with _no_autocast(x):
            return self._step(x.float(), seq_ids)

    def _step(self, x: Tensor, seq_ids: Tensor | None) -> RoutingRecord:
        e, noise = self.max_experts, self.cfg.gate_noise
        clean = self.logits(x)
        noisy = clean + noise * torch.randn_like(clean) / e if (self.training and noise > 0) else clean
        r = self.route(x, noisy)
        active = self.active_mask.to(x.device)
        window = self.global_batch_window
        if self.megatron_global_batch and self.training:
            window = GlobalBatchRunning(self.global_batch_counts, self.global_batch_steps)
        aux_probs = r.probs if r.aux_probs is None else r.aux_probs
        selected = r.indices if r.aux_selected is None else r.aux_selected
        aux = self.aux_loss_fn(AuxInputs(
            logits=clean, noisy_logits=noisy, probs=aux_probs, gates=aux_probs if r.aux_gates is None else r.aux_gates,
            first_choice=selected[:, 0], active=active, top_k=selected.shape[1], noise_std=noise / e,
            gate_weight=r.gate_weight, selected=selected, seq_ids=seq_ids, training=self.training,
            global_batch_window=window))
        return RoutingRecord(
            expert_indices=r.indices,
            expert_weights=r.weights,
            gate_values=r.weights if r.gates is None else r.gates,
            router_probs=r.probs,
            router_logits=clean,
            tokens_per_expert=tokens_per_expert(r.indices, e),
            active_mask=active.clone(),
            aux_loss=aux,
            z_loss=losses.router_z_loss(clean.masked_fill(~active, float("-inf"))),
            num_dropped=torch.zeros((), dtype=torch.long, device=x.device) if r.num_dropped is None else r.num_dropped,
            dispatch_scores=r.probs if r.dispatch_scores is None else r.dispatch_scores,
            selection_scores=r.selection_scores,
        )


class SoftmaxTopKRouter(Router):
    """Top-k over ``softmax(logits + noise)`` with optional capacity; subclasses define logits."""

    family = "softmax"
    default_aux_loss = "switch"

    def route(self, x: Tensor, logits: Tensor) -> Route:
        cfg, e = self.cfg, self.max_experts
        probs = torch.softmax(logits, dim=-1)
        k = cfg.top_k
        top_p, top_i = probs.topk(k, dim=-1)
        gate = top_p / top_p.sum(-1, keepdim=True) if (cfg.normalize_gate and k > 1) else top_p
        dropped, idx = None, top_i
        if cfg.capacity_factor > 0:
            capacity = k * int(math.floor(cfg.capacity_factor * math.ceil(x.shape[0] / e)))
            priority = top_p[:, 0].detach() if cfg.batch_prioritized_routing else None
            idx, dropped = apply_capacity(top_i, e, capacity, priority)
        weights = torch.where(idx >= 0, gate, torch.zeros_like(gate))
        # the aux loss sees each token's choice before capacity
        return Route(indices=idx, weights=weights, probs=probs, gates=gate, num_dropped=dropped, aux_selected=top_i)


@ROUTERS.register("topk")
class TopKRouter(SoftmaxTopKRouter):
    """Switch / GShard: ``logits = W x`` (no bias)."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.weight = nn.Parameter(torch.empty(self.max_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.float())


@ROUTERS.register("cosine")
class CosineRouter(SoftmaxTopKRouter):
    """GMoE: ``logits = normalize(P x) · normalize_cols(W) * exp(min(tau, log 100))``."""

    Options = CosineOptions

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.proj = nn.Linear(d_model, self.options.proj_dim)
        self.sim = nn.Parameter(torch.empty(self.options.proj_dim, self.max_experts))
        nn.init.normal_(self.sim, std=0.01)
        self.log_temp = nn.Parameter(torch.tensor(math.log(1.0 / self.options.init_temperature)))

    def logits(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.proj.weight.float(), self.proj.bias.float())
        scale = torch.exp(torch.clamp(self.log_temp.float(), max=math.log(100.0)))
        return F.normalize(h, dim=-1) @ F.normalize(self.sim.float(), dim=0) * scale


class _StraightThroughSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:  # noqa: D401
        return torch.sign(v)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def ste_sign(v: Tensor) -> Tensor:
    """``sign(v)`` forward, identity gradient backward."""
    return _StraightThroughSign.apply(v)


@ROUTERS.register("topany")
class TopAnyRouter(Router):
    """DynMoE top-any gating with trainable thresholds and an adaptive expert pool.

    ``s = sigmoid(normalize(x) · normalize_cols(W)) ⊙ M``; training ``z = STE_sign(relu(s − σ(G)))``;
    eval falls back to the top-1 of ``s`` for tokens with no active expert. Gates ``z / k_t`` with
    the differentiable ``k_t = Σ_e z_te`` (DynMoE divides by it without detaching), applied only
    when some token has more than one expert; otherwise the gates are ``z``.
    """

    family = "topany"
    default_aux_loss = "dynmoe"
    adaptive_pool = True
    dropless = True
    uses_top_k = False

    @classmethod
    def check_config(cls, cfg: MoEConfig, fail) -> None:
        if cfg.gate_noise > 0:
            fail("gate_noise", cfg.gate_noise, "0 for router 'topany' (DynMoE's gate has no noise)")

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        e = self.max_experts
        w = torch.empty(d_model, e)
        nn.init.orthogonal_(w)
        self.weight = nn.Parameter(w)
        self.thresholds = nn.Parameter(torch.zeros(e))
        mask = torch.zeros(e, dtype=torch.bool)
        mask[: cfg.initial_experts] = True
        self.register_buffer("expert_mask", mask)
        # recording window of the adaptive pool (persisted for exact resume)
        self.register_buffer("recording", torch.zeros((), dtype=torch.bool))
        self.register_buffer("routed_count", torch.zeros(e, dtype=torch.float64))
        self.register_buffer("unrouted_sum", torch.zeros(d_model, dtype=torch.float64))
        self.register_buffer("unrouted_count", torch.zeros((), dtype=torch.float64))

    @property
    def active_mask(self) -> Tensor:
        return self.expert_mask

    def logits(self, x: Tensor) -> Tensor:
        xn = F.normalize(x.float(), dim=-1)
        return xn @ F.normalize(self.weight.float(), dim=0)

    def route(self, x: Tensor, logits: Tensor) -> Route:
        mask = self.expert_mask
        s = torch.sigmoid(logits) * mask
        z = ste_sign(F.relu(s - torch.sigmoid(self.thresholds.float())))
        z = z * mask  # inactive experts are never chosen (keeps s=0 >= σ(G) ties out)
        none = z.detach().sum(-1) == 0
        dispatch = z
        released = self.cfg.released
        fell_back = None
        if self.training:
            if bool(self.recording) and not released.pool_reads_clamped:
                self._record(x, z.detach(), none)
        elif bool(none.any()):
            top1 = s.detach().masked_fill(~mask, float("-inf")).argmax(-1)
            fallback = F.one_hot(top1, self.max_experts).to(z.dtype)
            dispatch = torch.where(none.unsqueeze(-1), s, z)
            z = torch.where(none.unsqueeze(-1), fallback, z)
            fell_back = none
        k_t = z.sum(-1, keepdim=True)  # differentiable, as DynMoE's normaliser
        n = x.shape[0]
        kmax = max(int(k_t.detach().max()) if n else 1, 1)
        # where(k > 0, k, 1) rather than clamp_min(k, 1): the clamp has zero gradient at k == 1
        gates_dense = z / torch.where(k_t > 0, k_t, torch.ones_like(k_t)) if kmax > 1 else z
        if released.eval_fallback_gate and fell_back is not None and kmax == 1:
            # released: gates are normalised only when some token has > 1 expert, so a fallback token keeps s_top1
            gates_dense = torch.where(fell_back.unsqueeze(-1), z * s, gates_dense)
        order = torch.sort(z.detach() + s.detach() * 1e-3, dim=-1, descending=True, stable=True).indices
        idx = order[:, :kmax]
        valid = torch.gather(z.detach(), 1, idx) > 0
        idx = torch.where(valid, idx, torch.full_like(idx, -1))
        if self.training and bool(self.recording) and released.pool_reads_clamped:
            self._record_clamped(idx)
        gate = torch.gather(gates_dense, 1, idx.clamp_min(0)) * valid
        return Route(indices=idx, weights=gate, probs=s, dispatch_scores=dispatch, aux_gates=z,
                     gate_weight=self.weight.float())

    # --- adaptive expert pool -------------------------------------------------------------
    @torch.no_grad()
    def _record(self, x: Tensor, z: Tensor, none: Tensor) -> None:
        self.routed_count += z.sum(0).double()
        self.unrouted_sum += x[none].double().sum(0)
        self.unrouted_count += none.sum().double()

    @torch.no_grad()
    def _record_clamped(self, idx: Tensor) -> None:
        """The released recorder under Stateful Fusion (SPEC §9): it counts every slot of the clamped indices
        (an empty slot counts for ``E_max - 1``) and so never sees a token without an expert."""
        e = self.max_experts
        clamped = torch.where(idx >= 0, idx, torch.full_like(idx, e - 1))
        self.routed_count += torch.bincount(clamped.reshape(-1), minlength=e).double()

    def start_recording(self) -> None:
        """Open a recording window: reset counts and sum, then count every training forward."""
        self.reset_recording()
        self.recording.fill_(True)

    def reset_recording(self) -> None:
        self.routed_count.zero_()
        self.unrouted_sum.zero_()
        self.unrouted_count.zero_()
        self.recording.fill_(False)

    @torch.no_grad()
    def adapt(self) -> dict:
        """Apply the pool update of SPEC §1 from the recorded window, then reset it.

        Removes every active expert that received zero tokens; if any token found no expert,
        switches on the first free slot ``j`` with ``W[:, j] = normalize(Σ unrouted x)``,
        ``G_j = 0``. Counts are summed over data-parallel ranks first. The last active expert is
        never removed. Returns ``{"removed": [...], "added": [...]}``.
        """
        counts, usum, ucount = self.routed_count.clone(), self.unrouted_sum.clone(), self.unrouted_count.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (counts, usum, ucount):
                torch.distributed.all_reduce(t)
        mask = self.expert_mask
        removed = [int(i) for i in torch.nonzero(mask & (counts == 0)).flatten()]
        if len(removed) == int(mask.sum()):
            removed = removed[1:]
        for i in removed:
            mask[i] = False
        added = []
        if float(ucount) > 0:
            free = torch.nonzero(~mask).flatten()
            if free.numel() > 0:
                j = int(free[0])
                mask[j] = True
                self.weight.data[:, j] = F.normalize(usum, dim=0).to(self.weight.dtype)
                self.thresholds.data[j] = 0.0
                added.append(j)
        self.reset_recording()
        return {"removed": removed, "added": added}


def _all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over data-parallel ranks (in place) when a process group is up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


@ROUTERS.register("lossfree")
class LossFreeRouter(Router):
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias steers top-k *selection* only.

    ``logits = W x`` (no bias term); scores ``s = softmax(logits)`` or ``sigmoid(logits)``
    (``score_fn``). Selection: the top-``k`` of ``s + b`` with ``b`` the buffer ``bias``. Gates from
    the unbiased scores of the selected experts: sigmoid ``s_e / Σ_{j∈S_t} s_j`` for any ``k`` (DeepSeek-V3;
    1 at ``k = 1``) when ``normalize_gate``, else ``s_e``; softmax as the top-k router (renormalised for
    ``k > 1`` when ``normalize_gate``). ``router_probs``, ``dispatch_scores`` and the aux inputs'
    ``probs``: the scores normalised over experts; the aux inputs' ``selected`` / ``first_choice``: the
    top-k of the unbiased scores (SPEC §2, sequence-level loss), not the biased selection.

    Every training forward adds its selections per expert, summed over data-parallel ranks, to the
    buffer ``load_counts`` — so the counts of all micro-batches of an optimizer step accumulate and
    every rank holds the same counts at any time (also DDP's buffer broadcast from rank 0 changes
    nothing, and a checkpoint written mid-accumulation holds the global partial counts).
    :meth:`update_bias`, called once after each optimizer step (``callbacks.balancing``), applies
    ``b_e += u · sign(mean_e load − load_e)`` with ``u = bias_update_rate`` and resets the counts.
    Both buffers are persistent (saved in checkpoints). Dropless; no gate noise.
    """

    family = "lossfree"
    default_aux_loss = "none"
    dropless = True
    Options = LossFreeOptions

    @classmethod
    def check_config(cls, cfg: MoEConfig, fail) -> None:
        if cfg.gate_noise > 0:
            fail("gate_noise", cfg.gate_noise, "0 for router 'lossfree' (the bias steers selection; no noise)")

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        e = self.max_experts
        self.weight = nn.Parameter(torch.empty(e, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("bias", torch.zeros(e, dtype=torch.float32))
        self.register_buffer("load_counts", torch.zeros(e, dtype=torch.long))

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.float())

    def route(self, x: Tensor, logits: Tensor) -> Route:
        cfg, opts, e, k = self.cfg, self.options, self.max_experts, self.cfg.top_k
        tiny = torch.finfo(logits.dtype).tiny
        if opts.score_fn == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True).clamp_min(tiny)
        else:
            scores = probs = torch.softmax(logits, dim=-1)
        selection = scores.detach() + self.bias.float()
        top_i = selection.topk(k, dim=-1).indices
        top_s = scores.gather(1, top_i)
        # sigmoid: the selected scores normalised for any k (DeepSeek-V3 Gate; torchtitan route_norm), 1 at k = 1;
        # softmax: as the top-k router (renormalised for k > 1)
        norm = cfg.normalize_gate and (k > 1 or opts.score_fn == "sigmoid")
        gate = top_s / top_s.sum(-1, keepdim=True).clamp_min(tiny) if norm else top_s
        if self.training:
            self._count(tokens_per_expert(top_i, e))
        # the balance loss counts f over the top-k of the *unbiased* scores (DeepSeek-V3 eq. 18; Megatron-Core
        # compute_routing_scores_for_aux_loss): the bias steers the dispatch, not what the loss measures
        aux_i = probs.detach().topk(k, dim=-1).indices
        return Route(indices=top_i, weights=gate, probs=probs, selection_scores=selection, aux_selected=aux_i)

    @torch.no_grad()
    def _count(self, counts: Tensor) -> None:
        self.load_counts += _all_reduce_sum(counts.clone())

    @torch.no_grad()
    def update_bias(self) -> Tensor:
        """``b_e += u · sign(mean_e load − load_e)`` from the counts accumulated since the last call
        (already summed over ranks), then reset them. Returns the load used (``[E]`` long)."""
        load = self.load_counts.clone()
        lf = load.double()
        self.bias += (self.options.bias_update_rate * torch.sign(lf.mean() - lf)).to(self.bias.dtype)
        self.load_counts.zero_()
        return load


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022), for encoders.

    ``p = softmax(W x)`` over experts; each expert takes the ``c`` tokens with its highest ``p``,
    ``c = min(N, max(round(capacity_factor · N / E), 4))`` with Python's ``round`` (half to even) and the
    minimum capacity 4, as flaxformer's ``MoeLayer`` (the capacity factor is about the mean number of
    experts per token; the ``min(N, ·)`` stands where flaxformer's top-k would fail), so a token gets 0..E
    experts. The ``N`` real tokens of the rank's batch are one routing group (SPEC §1). Combine weights: the
    token's probabilities of the experts that chose it. The record is ``[N, K]`` with ``K`` = the most experts
    any token got, each token's experts in descending probability, −1 padded. A token's routing depends on the
    other tokens of the batch, later ones included: not for causal models (``causal=true`` is refused). Every
    expert gets exactly ``c`` tokens, so there is no balance loss (``aux_loss`` default ``none``).
    """

    family = "expert_choice"
    default_aux_loss = "none"
    uses_top_k = False

    @classmethod
    def check_config(cls, cfg: MoEConfig, fail) -> None:
        if cfg.causal:
            fail("causal", cfg.causal, "false for router 'expert_choice' (each expert picks its top tokens from the "
                 "whole batch, so a token's experts depend on later tokens: not causal)")
        if cfg.capacity_factor <= 0:
            fail("capacity_factor", cfg.capacity_factor, "> 0 for router 'expert_choice' (each expert takes "
                 "max(round(capacity_factor * N / E), 4) tokens)")
        if cfg.batch_prioritized_routing:
            fail("batch_prioritized_routing", True, "false for router 'expert_choice' (experts choose tokens)")
        if cfg.gate_noise > 0:
            fail("gate_noise", cfg.gate_noise, "0 for router 'expert_choice'")

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.weight = nn.Parameter(torch.empty(self.max_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    min_capacity = 4  # flaxformer MoeLayer.min_expert_capacity (its default)

    def capacity(self, n: int) -> int:
        """Tokens per expert: ``min(n, max(round(capacity_factor · n / E), 4))`` (flaxformer
        ``moe_layers.py``: ``int(round(capacity_factor * tokens_per_group / num_experts))``, then
        ``max(·, min_expert_capacity)``)."""
        return min(n, max(int(round(self.cfg.capacity_factor * n / self.max_experts)), self.min_capacity))

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.float())

    def route(self, x: Tensor, logits: Tensor) -> Route:
        n, e = x.shape[0], self.max_experts
        probs = torch.softmax(logits, dim=-1)
        c = self.capacity(n)
        top_p, top_t = probs.t().topk(c, dim=-1)  # [E, c]: each expert's tokens
        tok, w = top_t.reshape(-1), top_p.reshape(-1)
        ex = torch.arange(e, device=x.device).repeat_interleave(c)
        per_token = torch.bincount(tok, minlength=n)
        kmax = max(int(per_token.max()) if n else 1, 1)
        # group the assignments by token, each token's experts in descending probability
        by_p = torch.sort(w.detach(), descending=True, stable=True).indices
        order = by_p[torch.sort(tok[by_p], stable=True).indices]
        tok_s, ex_s, w_s = tok[order], ex[order], w[order]
        pos = torch.arange(tok_s.numel(), device=x.device) - (per_token.cumsum(0) - per_token)[tok_s]
        idx = torch.full((n, kmax), -1, dtype=torch.long, device=x.device)
        idx[tok_s, pos] = ex_s
        weights = probs.new_zeros(n, kmax).index_put((tok_s, pos), w_s)
        return Route(indices=idx, weights=weights, probs=probs)


def build_router(d_model: int, cfg: MoEConfig) -> Router:
    return ROUTERS[cfg.router](d_model, cfg)
