"""The MoE layer: router (+ Stateful Fusion) + experts on a backend."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .config import MoEConfig, renamed
from .experts import Experts
from .fusion import StatefulFusion
from .registry import BACKENDS, ROUTERS
from .routing import RoutingRecord, build_router


class MoELayer(nn.Module):
    """``y, record = layer(x, mask=None)`` with ``x [..., d_model]`` and ``mask [...]`` (True = real).

    Padding tokens (mask False) are not routed: they get a zero output and count nowhere (unless
    ``released.route_padding``: the released GLUE code routes every position).
    The last record is kept in ``self.last_routing`` for callbacks and losses. Routers whose
    ``forward`` takes ``seq_ids`` get each real token's sequence index: with ``x [..., L, d]`` the
    token at flat row ``i`` belongs to sequence ``i // L`` (a ``[N, d]`` input has no sequences:
    ``seq_ids=None``).
    """

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.d_model, self.d_ff = d_model, d_ff
        self.router = build_router(d_model, cfg)
        self.fusion = (StatefulFusion(cfg.max_experts, cfg.fusion, pad_clamp=cfg.released.fusion_pad_clamp)
                       if cfg.fusion is not None else None)
        self.experts = Experts(cfg.max_experts, d_model, d_ff, cfg.activation, cfg.bias,
                               cfg.expert_dropout, cfg.expert_dropout_position)
        backend = BACKENDS[cfg.backend]
        if hasattr(backend, "check_available"):  # e.g. megablocks: CUDA and the GPU extra
            backend.check_available()
        self.backend = backend()
        self.last_routing: RoutingRecord | None = None
        self._router_takes_seq_ids = "seq_ids" in inspect.signature(self.router.forward).parameters

    @property
    def max_experts(self) -> int:
        """Expert slots (``cfg.max_experts``; ``cfg.initial_experts`` is the experts active at the start)."""
        return self.cfg.max_experts

    @property
    def num_experts(self) -> int:
        """Deprecated name of :attr:`max_experts`, read until the next release."""
        renamed("MoELayer", "num_experts", "max_experts")
        return self.max_experts

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RoutingRecord]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects last dim {self.d_model}, got input of shape {tuple(x.shape)}")
        shape = x.shape
        xf = x.reshape(-1, self.d_model)
        keep = None
        if mask is not None and self.cfg.released.route_padding:
            mask = None  # released GLUE code: every position goes through the MoE layer (SPEC §9)
        if mask is not None:
            if mask.shape != shape[:-1]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match input {tuple(shape[:-1])}")
            keep = torch.nonzero(mask.reshape(-1).bool()).flatten()
            xr = xf.index_select(0, keep)
        else:
            xr = xf
        if self._router_takes_seq_ids:
            seq_ids = None
            if x.dim() >= 3 and shape[-2] > 0:
                seq_ids = torch.div(torch.arange(xf.shape[0], device=x.device), shape[-2], rounding_mode="floor")
                if keep is not None:
                    seq_ids = seq_ids.index_select(0, keep)
            rec = self.router(xr, seq_ids=seq_ids)
        else:
            rec = self.router(xr)
        if self.fusion is not None:
            rec = self.fusion(rec)
        yr = self.backend(self.experts, xr, rec.expert_indices, rec.expert_weights)
        if keep is not None:
            y = torch.zeros_like(xf).index_copy(0, keep, yr)
        else:
            y = yr
        self.last_routing = rec
        return y.reshape(shape), rec

    # --- initialisation from a dense FFN -------------------------------------------------------
    @torch.no_grad()
    def upcycle_from(self, fc1: nn.Linear, fc2: nn.Linear, noise: float | None = None) -> MoELayer:
        """Every expert slot becomes a copy of the dense FFN ``fc2(act(fc1(x)))`` (+ optional
        Gaussian noise of std ``noise * std(weight)``); ``released.upcycle_bias_split`` divides the copied
        second bias by ``E_max`` (top-any) or ``k``."""
        noise = self.cfg.upcycle_noise if noise is None else noise
        if fc1.weight.shape != (self.d_ff, self.d_model) or fc2.weight.shape != (self.d_model, self.d_ff):
            raise ValueError(f"cannot upcycle FFN {tuple(fc1.weight.shape)}/{tuple(fc2.weight.shape)} into "
                             f"experts of d_model={self.d_model}, d_ff={self.d_ff}")
        ex = self.experts
        ex.w1.copy_(fc1.weight.t().unsqueeze(0).expand_as(ex.w1))
        ex.w2.copy_(fc2.weight.t().unsqueeze(0).expand_as(ex.w2))
        self._copy_bias(ex.b1, fc1.bias)
        self._copy_bias(ex.b2, fc2.bias)
        if self.cfg.released.upcycle_bias_split and ex.b2 is not None:
            # released GLUE code (RMoE/Language/moe_utils.py): b2 / E_max for top-any, b2 / k otherwise (SPEC §9)
            ex.b2.div_(self.cfg.max_experts if ROUTERS[self.cfg.router].adaptive_pool else self.cfg.top_k)
        if noise > 0:
            for p in (ex.w1, ex.w2):
                p.add_(torch.randn_like(p) * noise * p.std())
        return self

    @torch.no_grad()
    def split_from(self, fc1: nn.Linear, fc2: nn.Linear) -> MoELayer:
        """EMoE-style: split the dense FFN's ``d_ff`` hidden units into ``E`` contiguous parts;
        expert ``e`` owns part ``e`` (of width ``d_ff_dense / E``) and the full output bias."""
        e_max, d_ff = self.max_experts, self.d_ff
        if fc1.weight.shape[0] != e_max * d_ff:
            raise ValueError(f"cannot split an FFN of width {fc1.weight.shape[0]} into {e_max} experts "
                             f"of width {d_ff}: build the layer with d_ff = {fc1.weight.shape[0]} // {e_max}")
        ex = self.experts
        ex.w1.copy_(fc1.weight.t().reshape(self.d_model, e_max, d_ff).permute(1, 0, 2))
        ex.w2.copy_(fc2.weight.t().reshape(e_max, d_ff, self.d_model))
        if ex.b1 is not None:
            ex.b1.copy_(fc1.bias.reshape(e_max, d_ff) if fc1.bias is not None else torch.zeros_like(ex.b1))
        self._copy_bias(ex.b2, fc2.bias)
        return self

    @staticmethod
    def _copy_bias(dst: Tensor | None, src: Tensor | None) -> None:
        if dst is None:
            return
        if src is None:
            dst.zero_()
        else:
            dst.copy_(src.unsqueeze(0).expand_as(dst))


def build_moe_layer(d_model: int, d_ff: int, **cfg: Any) -> MoELayer:
    """Build an MoE layer from keyword config (see :class:`rmoe.config.MoEConfig`)."""
    return MoELayer(d_model, d_ff, MoEConfig.from_dict(cfg))
