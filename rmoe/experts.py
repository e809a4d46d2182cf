"""Expert FFNs and the backends that run them on a routing decision.

Parameters (shared by every backend, so checkpoints move between them):
``w1 [E, d, d_ff]``, ``b1 [E, d_ff]``, ``w2 [E, d_ff, d]``, ``b2 [E, d]``;
expert ``e`` computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``.

Expert dropout (``Experts.dropout = p``, training mode only) is inverted dropout on the hidden
units, ``drop(u) = u * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)`` per (row, hidden unit):

* ``pre_act`` (DynMoE/RMoE GLUE experts, tutel ``gelu(dropout(x))``):
  ``y = act(drop(x @ w1 + b1)) @ w2 + b2``;
* ``post_act`` (GMoE vision experts): ``y = drop(act(x @ w1 + b1)) @ w2 + b2``.

Eval mode or ``p == 0``: no mask is drawn and every path is the plain FFN.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .registry import ACTIVATIONS, BACKENDS

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")

@dataclass(frozen=True)
class Activation:
    """An expert activation ``fn(h)``; ``backward(grad, h) = d fn(h)/dh * grad`` when a fused kernel
    exists (otherwise the sorted path recomputes ``fn`` under autograd)."""

    fn: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor] | None = None


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS.register("gelu", Activation(F.gelu, torch.ops.aten.gelu_backward))
ACTIVATIONS.register("gelu_tanh", Activation(
    _gelu_tanh, lambda grad, h: torch.ops.aten.gelu_backward(grad, h, approximate="tanh")))
ACTIVATIONS.register("relu", Activation(F.relu, lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0)))
ACTIVATIONS.register("silu", Activation(F.silu, torch.ops.aten.silu_backward))


DROPOUT_POSITIONS = ("pre_act", "post_act")


class Experts(nn.Module):
    """``E`` two-layer FFN experts held as 3-D weights.

    Expert ``e`` on a row ``x``: ``act(drop(x @ w1[e] + b1[e])) @ w2[e] + b2[e]``
    (``dropout_position="pre_act"``) or ``drop(act(x @ w1[e] + b1[e])) @ w2[e] + b2[e]``
    (``"post_act"``), ``drop(u) = u * keep / (1 - dropout)`` in training, identity in eval.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True,
                 dropout: float = 0.0, dropout_position: str = "pre_act"):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        # dropout on the hidden units, in training only: before (pre_act) or after (post_act) act
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"invalid dropout={dropout!r}; allowed: a number in [0, 1)")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"invalid dropout_position={dropout_position!r}; allowed: "
                             + "|".join(DROPOUT_POSITIONS))
        self.dropout, self.dropout_position = float(dropout), dropout_position
        self.act = ACTIVATIONS[activation].fn
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b1 = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(d_ff))

    @property
    def dropout_active(self) -> bool:
        """True when the hidden units are dropped: training mode and ``dropout > 0``."""
        return self.training and self.dropout > 0

    def draw_keep(self, rows: int, device: torch.device | str | None = None) -> Tensor | None:
        """Keep-mask ``[rows, d_ff]`` (bool, each unit kept with probability ``1 - dropout``) for
        ``rows`` expert rows, or ``None`` (nothing drawn, no RNG used) when dropout is not active."""
        if not self.dropout_active:
            return None
        return torch.empty(rows, self.d_ff, dtype=torch.bool, device=device).bernoulli_(1.0 - self.dropout)

    def drop(self, u: Tensor, keep: Tensor | None) -> Tensor:
        """Inverted dropout ``u * keep / (1 - dropout)``; ``u`` itself when ``keep is None``."""
        return u if keep is None else u * keep * (1.0 / (1.0 - self.dropout))

    def hidden(self, h: Tensor, keep: Tensor | None) -> Tensor:
        """The hidden activations fed to ``w2`` from the pre-activation ``h = x @ w1 + b1``:
        ``act(drop(h))`` (pre_act) or ``drop(act(h))`` (post_act); ``act(h)`` when ``keep is None``."""
        if keep is None:
            return self.act(h)
        if self.dropout_position == "pre_act":
            return self.act(self.drop(h, keep))
        return self.drop(self.act(h), keep)

    def expert_forward(self, e: int, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """One expert on ``x [n, d]`` (reference implementation, used by tests and loops):
        ``hidden(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``. With dropout active, ``keep [n, d_ff]`` is
        the keep-mask (drawn here when not given); passing one while dropout is not active is
        an error."""
        h = x @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        if keep is None:
            keep = self.draw_keep(x.shape[0], x.device)
        else:
            _check_keep(self, keep, (x.shape[0], self.d_ff))
        y = self.hidden(h, keep) @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y


def _check_keep(experts: Experts, keep: Tensor, shape: tuple[int, ...]) -> None:
    """An explicit keep-mask must be bool of ``shape`` and only given while dropout is active."""
    if not experts.dropout_active:
        raise ValueError("a dropout keep-mask was given but expert dropout is not active "
                         f"(training={experts.training}, dropout={experts.dropout})")
    if keep.dtype != torch.bool or tuple(keep.shape) != tuple(shape):
        raise ValueError(f"dropout keep-mask must be bool of shape {tuple(shape)}, "
                         f"got {keep.dtype} {tuple(keep.shape)}")


def _gathered_keep(experts: Experts, dropout_mask: Tensor | None, slot_ids: Tensor, indices: Tensor,
                   device: torch.device) -> Tensor | None:
    """The keep-mask of the expert-sorted rows ``[m, d_ff]``: drawn fresh (one draw of ``m`` rows,
    identical across impls for the same RNG state), or gathered by ``slot_ids`` from an explicit
    ``dropout_mask [N, K, d_ff]`` in (token, slot) layout. ``None`` when dropout is not active."""
    if dropout_mask is None:
        return experts.draw_keep(slot_ids.numel(), device)
    _check_keep(experts, dropout_mask, (*indices.shape, experts.d_ff))
    return dropout_mask.reshape(-1, experts.d_ff).index_select(0, slot_ids)


def sort_by_expert(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Order the non-empty (token, slot) assignments by expert.

    Returns ``slot_ids`` (flat positions into ``[N*K]``, grouped by expert, token order inside a
    group), ``token_ids`` (``slot_ids // K``) and ``counts [E]``.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    # empty slots (−1) sort to the end under key E; one stable sort, no N×E tensor
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)
    n_valid = int(flat.numel() - counts[num_experts])
    slot_ids = order[:n_valid]
    return slot_ids, torch.div(slot_ids, k, rounding_mode="floor"), counts[:num_experts]


def _grouped_mm_ok(experts: Experts, x: Tensor) -> bool:
    """``grouped_mm`` runs fp32 on CPU and needs every row stride to be a multiple of 16 bytes."""
    return (_HAS_GROUPED_MM and x.device.type == "cpu"
            and all(t.dtype == torch.float32 for t in (x, experts.w1, experts.w2))
            and experts.d_model % 4 == 0 and experts.d_ff % 4 == 0)


def _chunks(counts: list[int], rows: int) -> list[tuple[int, int, int]]:
    """``(expert, start, stop)`` row blocks of at most ``rows`` rows covering every non-empty
    expert group of the expert-sorted order."""
    out, start = [], 0
    for e, c in enumerate(counts):
        for s in range(start, start + c, rows):
            out.append((e, s, min(s + rows, start + c)))
        start += c
    return out


def _act_backward(name: str, act: Callable[[Tensor], Tensor], grad: Tensor, h: Tensor) -> Tensor:
    """``d act(h) / dh * grad``: the registered activation's backward kernel when it has one."""
    entry = ACTIVATIONS.get(name)
    if entry is not None and entry.backward is not None:
        return entry.backward(grad, h)
    with torch.enable_grad():  # any other activation: autograd on a recomputed block
        hh = h.detach().requires_grad_(True)
        return torch.autograd.grad(act(hh), hh, grad)[0]


class _SortedExpertsFn(torch.autograd.Function):
    """The expert FFNs on tokens already sorted by expert, with a hand-written backward.

    Each expert group is processed in row blocks of at most ``rows`` rows: ``addmm -> act ->
    addmm`` forward, ``mm -> act' -> mm`` plus the weight-gradient matmuls backward, so the
    per-block temporaries (activation, its gradient) stay small. Weight gradients are written
    straight into ``[E, ...]`` buffers (``mm(out=)`` for a group's first block, ``addmm_`` for the
    next ones): no per-expert full-size gradients, no unbind/stack, no concatenation. Saved for
    backward: ``xs`` and the pre-activation ``h`` only; ``act(h)`` is recomputed block by block
    (``save_act=True`` keeps it instead). That puts the layer's activation memory below the dense
    floor's, for about 2% of time (one elementwise pass; measured by ``bench/__main__.py``).

    Expert dropout: ``keep [m, d_ff]`` (bool, or ``None`` for none) and ``scale = 1 / (1 - p)``.
    ``post=False`` (pre_act): ``a = act(z)``, ``z = h * keep * scale`` — the dropped ``z`` is what
    is saved in place of ``h``, and backward is ``gh = act'(z) * (gy @ w2^T) * keep * scale``.
    ``post=True`` (post_act): ``a = act(h) * keep * scale``, ``gh = act'(h) * (gy @ w2^T) * keep
    * scale``. In both, ``gw2 = a^T gy`` uses the dropped activations. ``keep`` is saved too
    (1 byte per hidden unit).
    """

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, counts, act_name, act, rows, save_act,  # noqa: D401
                keep=None, scale=1.0, post=False):
        blocks = _chunks(counts, rows)
        m = xs.shape[0]
        h = xs.new_empty(m, w1.shape[2])
        a_all = torch.empty_like(h) if save_act else None
        y = xs.new_empty(m, w2.shape[2])
        for e, s, t in blocks:
            hb = h[s:t]
            if b1 is not None:
                torch.addmm(b1[e], xs[s:t], w1[e], out=hb)
            else:
                torch.mm(xs[s:t], w1[e], out=hb)
            if keep is not None and not post:
                hb.mul_(keep[s:t]).mul_(scale)  # h := z = drop(h), in place
            ab = act(hb)
            if keep is not None and post:  # act() returns a new tensor: drop it in place
                ab.mul_(keep[s:t]).mul_(scale)
            if a_all is not None:
                a_all[s:t] = ab
            if b2 is not None:
                torch.addmm(b2[e], ab, w2[e], out=y[s:t])
            else:
                torch.mm(ab, w2[e], out=y[s:t])
        ctx.save_for_backward(xs, h, w1, w2, a_all, keep)
        ctx.blocks, ctx.act_name, ctx.act = blocks, act_name, act
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.scale, ctx.post = scale, post
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        xs, h, w1, w2, a_all, keep = ctx.saved_tensors
        post = keep is not None and ctx.post
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        gy = gy.contiguous()
        blocks = ctx.blocks
        hit = {e for e, _, _ in blocks}
        empty = [e for e in range(w1.shape[0]) if e not in hit]

        def buf(shape):  # written block by block; experts without tokens get zeros
            t = gy.new_empty(shape)
            if empty:
                t[empty] = 0
            return t
        gw1 = buf(w1.shape) if need_w1 else None
        gw2 = buf(w2.shape) if need_w2 else None
        gb1 = buf((w1.shape[0], w1.shape[2])) if (need_b1 and ctx.has_b1) else None
        gb2 = buf((w2.shape[0], w2.shape[2])) if (need_b2 and ctx.has_b2) else None
        gxs = torch.empty_like(xs) if need_x else None
        prev = -1
        for e, s, t in blocks:
            first, prev = e != prev, e
            gyb, hb = gy[s:t], h[s:t]
            if gw2 is not None:
                if a_all is not None:
                    ab = a_all[s:t]
                else:
                    ab = ctx.act(hb)
                    if post:  # the dropped activations were multiplied into w2
                        ab = ab.mul_(keep[s:t]).mul_(ctx.scale)
                if first:
                    torch.mm(ab.t(), gyb, out=gw2[e])
                else:
                    gw2[e].addmm_(ab.t(), gyb)
            if gb2 is not None:
                if first:
                    torch.sum(gyb, 0, out=gb2[e])
                else:
                    gb2[e] += gyb.sum(0)
            ga = gyb.mm(w2[e].t())
            if post:  # d drop(a) / da, before act'
                ga.mul_(keep[s:t]).mul_(ctx.scale)
            gh = _act_backward(ctx.act_name, ctx.act, ga, hb)
            if keep is not None and not post:  # d drop(h) / dh, after act'
                gh.mul_(keep[s:t]).mul_(ctx.scale)
            if gw1 is not None:
                if first:
                    torch.mm(xs[s:t].t(), gh, out=gw1[e])
                else:
                    gw1[e].addmm_(xs[s:t].t(), gh)
            if gb1 is not None:
                if first:
                    torch.sum(gh, 0, out=gb1[e])
                else:
                    gb1[e] += gh.sum(0)
            if gxs is not None:
                torch.mm(gh, w1[e].t(), out=gxs[s:t])
        return gxs, gw1, gb1, gw2, gb2, None, None, None, None, None, None, None, None


class TorchDroplessBackend(nn.Module):
    """Dropless experts in plain PyTorch: tokens are sorted by expert (one stable sort, no N×E
    tensor), gathered once, run through their expert, scaled by their combine weight and
    scatter-added back (``index_add``). No per-token Python.

    ``impl``:

    * ``"blocked"`` (default): the expert FFN is one autograd node (:class:`_SortedExpertsFn`)
      that walks each expert group in blocks of at most ``block_rows`` rows, writes weight
      gradients straight into ``[E, ...]`` buffers and saves only the gathered input and the
      pre-activation for backward (smaller blocks were not faster on the 2-core CPU measured);
    * ``"grouped_mm"``: ``torch.nn.functional.grouped_mm`` for both matmuls (fp32, ``d_model``
      and ``d_ff`` multiples of 4; otherwise falls back to ``"blocked"``), autograd backward;
    * ``"autograd"``: the plain sort-based path (per-group matmuls on ``unbind`` views).

    All three compute the same function; ``bench/__main__.py`` times them side by side. Expert
    dropout (see :class:`Experts`) draws one keep-mask ``[m, d_ff]`` for the ``m`` expert-sorted
    rows right after the sort, so the three impls drop the same units for the same RNG state;
    ``forward(..., dropout_mask=keep)`` takes an explicit bool keep-mask ``[N, K, d_ff]`` in
    (token, slot) layout instead (for tests; only while dropout is active).
    """

    supports_capacity = True  # runs whatever the router kept (dropped slots are −1)
    IMPLS = ("blocked", "grouped_mm", "autograd")

    def __init__(self, impl: str = "blocked", block_rows: int = 4096, save_act: bool = False):
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"invalid impl={impl!r}; allowed: {'|'.join(self.IMPLS)}")
        if not (isinstance(block_rows, int) and block_rows >= 1):
            raise ValueError(f"invalid block_rows={block_rows!r}; allowed: an integer >= 1")
        self.impl, self.block_rows, self.save_act = impl, block_rows, save_act

    def forward(self, experts: Experts, x: Tensor, indices: Tensor, weights: Tensor,
                dropout_mask: Tensor | None = None) -> Tensor:
        """``out[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t])`` over non-empty slots,
        each expert with its dropout (keep-mask of slot ``(t, j)``) when active."""
        if self.impl == "autograd":
            return self._forward_autograd(experts, x, indices, weights, dropout_mask)
        slot_ids, token_ids, counts = sort_by_expert(indices, experts.num_experts)
        if slot_ids.numel() == 0:
            return torch.zeros_like(x)
        keep = _gathered_keep(experts, dropout_mask, slot_ids, indices, x.device)
        xs = x.index_select(0, token_ids)
        if self.impl == "grouped_mm" and _grouped_mm_ok(experts, x):
            ys = self._grouped_mm_ffn(experts, xs, counts, keep)
        elif keep is None:
            ys = _SortedExpertsFn.apply(xs, experts.w1, experts.b1, experts.w2, experts.b2, counts.tolist(),
                                        experts.activation, experts.act, self.block_rows,
                                        self.save_act)
        else:
            ys = _SortedExpertsFn.apply(xs, experts.w1, experts.b1, experts.w2, experts.b2, counts.tolist(),
                                        experts.activation, experts.act, self.block_rows,
                                        self.save_act, keep, 1.0 / (1.0 - experts.dropout),
                                        experts.dropout_position == "post_act")
        ys = ys * weights.reshape(-1).index_select(0, slot_ids).to(ys.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token_ids, ys)

    @staticmethod
    def _grouped_mm_ffn(experts: Experts, xs: Tensor, counts: Tensor, keep: Tensor | None = None) -> Tensor:
        offs = counts.cumsum(0, dtype=torch.int32)
        rows = None
        if experts.b1 is not None or experts.b2 is not None:
            rows = torch.repeat_interleave(torch.arange(experts.num_experts, device=xs.device), counts)
        h = F.grouped_mm(xs, experts.w1, offs=offs)
        if experts.b1 is not None:
            h = h + experts.b1.index_select(0, rows)
        y = F.grouped_mm(experts.hidden(h, keep), experts.w2, offs=offs)
        if experts.b2 is not None:
            y = y + experts.b2.index_select(0, rows)
        return y

    @staticmethod
    def _forward_autograd(experts: Experts, x: Tensor, indices: Tensor, weights: Tensor,
                          dropout_mask: Tensor | None = None) -> Tensor:
        """The plain sort-based path (per-group matmuls on ``unbind`` views, autograd backward)."""
        slot_ids, token_ids, counts = sort_by_expert(indices, experts.num_experts)
        if slot_ids.numel() == 0:
            return torch.zeros_like(x)
        keep = _gathered_keep(experts, dropout_mask, slot_ids, indices, x.device)
        keeps = torch.split(keep, counts.tolist()) if keep is not None else None
        xs = x.index_select(0, token_ids)
        w1s, w2s = experts.w1.unbind(0), experts.w2.unbind(0)
        b1s = experts.b1.unbind(0) if experts.b1 is not None else None
        b2s = experts.b2.unbind(0) if experts.b2 is not None else None
        outs = []
        for e, chunk in enumerate(torch.split(xs, counts.tolist())):
            if chunk.shape[0] == 0:
                continue
            h = torch.addmm(b1s[e], chunk, w1s[e]) if b1s is not None else chunk @ w1s[e]
            h = experts.hidden(h, keeps[e] if keeps is not None else None)
            outs.append(torch.addmm(b2s[e], h, w2s[e]) if b2s is not None else h @ w2s[e])
        out = torch.zeros_like(x)
        if not outs:
            return out
        ys = torch.cat(outs) * weights.reshape(-1).index_select(0, slot_ids).to(x.dtype).unsqueeze(-1)
        return out.index_add(0, token_ids, ys)


class MegaBlocksBackend(nn.Module):
    """Feeds our routing decision to MegaBlocks' dropless grouped path (GPU only).

    Uses ``megablocks.ops`` to permute tokens by expert and ``grouped_gemm`` for the expert
    matmuls, on our own parameters (same layout as the torch backend). MegaBlocks' router and its
    module-level load-balancing lists are not used.
    """

    supports_capacity = False  # dropless: MegaBlocks has no finite expert capacity

    def __init__(self) -> None:
        super().__init__()
        self._mods = None

    @staticmethod
    def check_available() -> tuple:
        if not torch.cuda.is_available():
            raise RuntimeError("backend='megablocks' needs a CUDA device; none is available. "
                               "Use backend=torch on CPU (same parameters, same results).")
        try:
            ops = importlib.import_module("megablocks.ops")
            gg = importlib.import_module("grouped_gemm.ops")
        except ImportError as exc:  # pragma: no cover - depends on the GPU extra
            raise RuntimeError("backend='megablocks' needs the optional GPU extra: "
                               "pip install -e '.[megablocks]' (megablocks, grouped_gemm) — "
                               f"import failed: {exc}") from exc
        return ops, gg

    def forward(self, experts: Experts, x: Tensor, indices: Tensor, weights: Tensor,  # pragma: no cover
                dropout_mask: Tensor | None = None) -> Tensor:
        """Same function as :class:`TorchDroplessBackend` (expert dropout included: one keep-mask
        ``[m, d_ff]`` for the sorted rows, or ``dropout_mask [N, K, d_ff]`` given explicitly)."""
        if self._mods is None:
            self._mods = self.check_available()
        _, gg = self._mods
        slot_ids, token_ids, counts = sort_by_expert(indices, experts.num_experts)
        keep = _gathered_keep(experts, dropout_mask, slot_ids, indices, x.device)
        xs = x.index_select(0, token_ids)
        batch_sizes = counts.cpu()
        h = gg.gmm(xs, experts.w1, batch_sizes)
        if experts.b1 is not None:
            h = h + experts.b1.repeat_interleave(counts, dim=0)
        y = gg.gmm(experts.hidden(h, keep), experts.w2, batch_sizes)
        if experts.b2 is not None:
            y = y + experts.b2.repeat_interleave(counts, dim=0)
        y = y * weights.reshape(-1).index_select(0, slot_ids).to(y.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token_ids, y)


BACKENDS.register("torch", TorchDroplessBackend)
BACKENDS.register("megablocks", MegaBlocksBackend)
