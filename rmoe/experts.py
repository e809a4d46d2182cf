"""Expert FFNs and the backends that run them on a routing decision.

Parameters (shared by every backend, so checkpoints move between them):
``w1 [E, d, d_ff]``, ``b1 [E, d_ff]``, ``w2 [E, d_ff, d]``, ``b2 [E, d]``;
expert ``e`` computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")

ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class Experts(nn.Module):
    """``E`` two-layer FFN experts held as 3-D weights."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.act = ACTIVATION_FNS[activation]
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b1 = nn.Parameter(torch.zeros(num_experts, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(d_ff))

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """One expert on ``x [n, d]`` (reference implementation, used by tests and loops)."""
        h = x @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        y = self.act(h) @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y


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
    """``d act(h) / dh * grad`` with the ATen backward kernels of the known activations."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, h, 0)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, h)
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
    floor's, for about 2% of time (one elementwise pass; measured by ``tasks/bench.py``).
    """

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, counts, act_name, act, rows, save_act):  # noqa: D401
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
            ab = act(hb)
            if a_all is not None:
                a_all[s:t] = ab
            if b2 is not None:
                torch.addmm(b2[e], ab, w2[e], out=y[s:t])
            else:
                torch.mm(ab, w2[e], out=y[s:t])
        ctx.save_for_backward(xs, h, w1, w2, a_all)
        ctx.blocks, ctx.act_name, ctx.act = blocks, act_name, act
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        xs, h, w1, w2, a_all = ctx.saved_tensors
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
                ab = ctx.act(hb) if a_all is None else a_all[s:t]
                if first:
                    torch.mm(ab.t(), gyb, out=gw2[e])
                else:
                    gw2[e].addmm_(ab.t(), gyb)
            if gb2 is not None:
                if first:
                    torch.sum(gyb, 0, out=gb2[e])
                else:
                    gb2[e] += gyb.sum(0)
            gh = _act_backward(ctx.act_name, ctx.act, gyb.mm(w2[e].t()), hb)
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
        return gxs, gw1, gb1, gw2, gb2, None, None, None, None, None


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

    All three compute the same function; ``tasks/bench.py`` times them side by side.
    """

    IMPLS = ("blocked", "grouped_mm", "autograd")

    def __init__(self, impl: str = "blocked", block_rows: int = 4096, save_act: bool = False):
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"invalid impl={impl!r}; allowed: {'|'.join(self.IMPLS)}")
        if not (isinstance(block_rows, int) and block_rows >= 1):
            raise ValueError(f"invalid block_rows={block_rows!r}; allowed: an integer >= 1")
        self.impl, self.block_rows, self.save_act = impl, block_rows, save_act

    def forward(self, experts: Experts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        if self.impl == "autograd":
            return self._forward_autograd(experts, x, indices, weights)
        slot_ids, token_ids, counts = sort_by_expert(indices, experts.num_experts)
        if slot_ids.numel() == 0:
            return torch.zeros_like(x)
        xs = x.index_select(0, token_ids)
        if self.impl == "grouped_mm" and _grouped_mm_ok(experts, x):
            ys = self._grouped_mm_ffn(experts, xs, counts)
        else:
            ys = _SortedExpertsFn.apply(xs, experts.w1, experts.b1, experts.w2, experts.b2, counts.tolist(),
                                        experts.activation, experts.act, self.block_rows,
                                        self.save_act)
        ys = ys * weights.reshape(-1).index_select(0, slot_ids).to(ys.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token_ids, ys)

    @staticmethod
    def _grouped_mm_ffn(experts: Experts, xs: Tensor, counts: Tensor) -> Tensor:
        offs = counts.cumsum(0, dtype=torch.int32)
        rows = None
        if experts.b1 is not None or experts.b2 is not None:
            rows = torch.repeat_interleave(torch.arange(experts.num_experts, device=xs.device), counts)
        h = F.grouped_mm(xs, experts.w1, offs=offs)
        if experts.b1 is not None:
            h = h + experts.b1.index_select(0, rows)
        y = F.grouped_mm(experts.act(h), experts.w2, offs=offs)
        if experts.b2 is not None:
            y = y + experts.b2.index_select(0, rows)
        return y

    @staticmethod
    def _forward_autograd(experts: Experts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """The plain sort-based path (per-group matmuls on ``unbind`` views, autograd backward)."""
        slot_ids, token_ids, counts = sort_by_expert(indices, experts.num_experts)
        xs = x.index_select(0, token_ids)
        w1s, w2s = experts.w1.unbind(0), experts.w2.unbind(0)
        b1s = experts.b1.unbind(0) if experts.b1 is not None else None
        b2s = experts.b2.unbind(0) if experts.b2 is not None else None
        outs = []
        for e, chunk in enumerate(torch.split(xs, counts.tolist())):
            if chunk.shape[0] == 0:
                continue
            h = torch.addmm(b1s[e], chunk, w1s[e]) if b1s is not None else chunk @ w1s[e]
            h = experts.act(h)
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

    def forward(self, experts: Experts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:  # pragma: no cover
        if self._mods is None:
            self._mods = self.check_available()
        _, gg = self._mods
        slot_ids, token_ids, counts = sort_by_expert(indices, experts.num_experts)
        xs = x.index_select(0, token_ids)
        batch_sizes = counts.cpu()
        h = gg.gmm(xs, experts.w1, batch_sizes)
        if experts.b1 is not None:
            h = h + experts.b1.repeat_interleave(counts, dim=0)
        y = gg.gmm(experts.act(h), experts.w2, batch_sizes)
        if experts.b2 is not None:
            y = y + experts.b2.repeat_interleave(counts, dim=0)
        y = y * weights.reshape(-1).index_select(0, slot_ids).to(y.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token_ids, y)


BACKENDS: dict[str, type[nn.Module]] = {"torch": TorchDroplessBackend, "megablocks": MegaBlocksBackend}
