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

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .config import renamed
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

    def __init__(self, max_experts: int, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True,
                 dropout: float = 0.0, dropout_position: str = "pre_act"):
        super().__init__()
        self.max_experts, self.d_model, self.d_ff = max_experts, d_model, d_ff  # expert slots
        self.activation = activation
        # dropout on the hidden units, in training only: before (pre_act) or after (post_act) act
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"invalid dropout={dropout!r}; allowed: a number in [0, 1)")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"invalid dropout_position={dropout_position!r}; allowed: "
                             + "|".join(DROPOUT_POSITIONS))
        self.dropout, self.dropout_position = float(dropout), dropout_position
        self.act = ACTIVATIONS[activation].fn
        self.w1 = nn.Parameter(torch.empty(max_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(max_experts, d_ff, d_model))
        self.b1 = nn.Parameter(torch.zeros(max_experts, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(max_experts, d_model)) if bias else None
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(d_ff))

    @property
    def num_experts(self) -> int:
        """Deprecated name of :attr:`max_experts`, read until the next release."""
        renamed("Experts", "num_experts", "max_experts")
        return self.max_experts

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


def sort_by_expert(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Order the non-empty (token, slot) assignments by expert.

    Returns ``slot_ids`` (flat positions into ``[N*K]``, grouped by expert, token order inside a
    group), ``token_ids`` (``slot_ids // K``), ``counts [E]`` and the same counts on the host
    (one device-to-host copy: the only sync, needed for the data-dependent ``slot_ids`` length).
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    # empty slots (−1) sort to the end under key E; one stable sort, no N×E tensor
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).index_add_(0, key, torch.ones_like(key))
    host = counts.tolist()
    slot_ids = order[:flat.numel() - host[num_experts]]
    return slot_ids, torch.div(slot_ids, k, rounding_mode="floor"), counts[:num_experts], host[:num_experts]


def compute_dtype(x: Tensor, experts: Experts) -> torch.dtype:
    """The dtype the experts compute in: the autocast dtype of ``x``'s device when autocast is on
    there (``bf16-mixed`` / ``16-mixed``), else the expert weights' dtype. Routing is not
    affected (routers run in fp32 under autocast), nor is any routing state."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return experts.w1.dtype


@dataclass(frozen=True)
class _Params:
    """The expert parameters in the compute dtype: the parameters themselves when they already
    have it, else autograd-tracked casts (as autocast casts an ``nn.Linear``'s weight)."""

    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None

    @classmethod
    def of(cls, experts: Experts, dtype: torch.dtype) -> _Params:
        def cast(t: Tensor | None) -> Tensor | None:
            return t if t is None or t.dtype == dtype else t.to(dtype)
        return cls(cast(experts.w1), cast(experts.b1), cast(experts.w2), cast(experts.b2))


def _cuda_grouped_mm_capable(device: torch.device) -> bool:
    """``grouped_mm``'s CUDA kernel (no host sync) runs bf16 on SM 9.x/10.x; other GPUs from SM 8.0
    get torch's fallback, a loop over the groups after one copy of the offsets to the host."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def _grouped_mm_ok(experts: Experts, x: Tensor) -> bool:
    """Whether ``grouped_mm`` can run ``x`` (already in the compute dtype) on ``experts``: fp32 on
    CPU, bf16 on CUDA (SM >= 8.0), every row stride a multiple of 16 bytes (``d_model`` and ``d_ff``
    multiples of ``16 / itemsize``); eager only (under ``torch.compile`` its fake-tensor kernel
    takes bf16/fp16 only)."""
    if not _HAS_GROUPED_MM or torch.compiler.is_compiling():
        return False
    if x.device.type == "cpu":
        dtype_ok = x.dtype == torch.float32
    elif x.device.type == "cuda":
        dtype_ok = x.dtype == torch.bfloat16 and _cuda_grouped_mm_capable(x.device)
    else:
        return False
    align = 16 // x.element_size()
    return dtype_ok and experts.d_model % align == 0 and experts.d_ff % align == 0


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


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Workspace:
    """Large CPU buffers of the blocked path kept from one step to the next.

    A CPU tensor of more than a few MB comes from a fresh ``mmap`` each time (glibc), so every
    step page-faults (and has the kernel zero) its weight gradients ``[E, d, d_ff]`` — ``E/k``
    times the floor's — and its activation buffers: about 10% of the layer's time at E=64, k=8.
    :meth:`empty` hands out the storage it kept for ``role`` again when nothing else holds it any
    more (its use count is 1: the gradient was set to ``None``, the saved activations were freed
    by backward), otherwise a new tensor whose storage it then keeps. So no buffer is ever shared
    with a live tensor, and peak memory is unchanged; between steps it keeps what the last step
    allocated (one set of weight gradients and activations per layer) until
    :meth:`TorchDroplessBackend.release_buffers`. CPU only (other devices have caching
    allocators), not under ``torch.compile``; ``deepcopy``/pickle give an empty workspace.
    """

    MIN_BYTES = 1 << 20  # smaller buffers come from malloc's heap anyway

    def __init__(self) -> None:
        self.storages: dict[tuple[str, torch.dtype], torch.UntypedStorage] = {}

    def __reduce__(self):
        return (_Workspace, ())

    def empty(self, role: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor of ``shape`` (``like``'s dtype and device)."""
        nbytes = math.prod(shape) * like.element_size()
        if (like.device.type != "cpu" or nbytes < self.MIN_BYTES or _storage_use_count is None
                or torch.compiler.is_compiling()):
            return like.new_empty(shape)
        key = (role, like.dtype)
        st = self.storages.get(key)
        if st is not None and st.nbytes() >= nbytes and _storage_use_count(st._cdata) == 1:
            return like.new_empty(0).set_(st, 0, shape)
        t = like.new_empty(shape)
        self.storages[key] = t.untyped_storage()
        return t


def _empty(ws: _Workspace | None, role: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return ws.empty(role, shape, like) if ws is not None else like.new_empty(shape)


def _unbind(t: Tensor | None) -> tuple[Tensor, ...] | None:
    return t.unbind(0) if t is not None else None


def _split(t: Tensor | None, sizes: list[int]) -> tuple[Tensor, ...] | None:
    return t.split(sizes) if t is not None else None


class _SortedExpertsFn(torch.autograd.Function):
    """Dispatch, expert FFNs and combine of the expert-sorted slots in one autograd node, with a
    hand-written backward: ``out[t] = sum_i wslot[i] * FFN_e(i)(x[t])`` over the sorted slots
    ``i`` of token ``t = token_ids[i]``, ``e(i)`` its expert.

    Each expert group is processed in row blocks of at most ``rows`` rows: gather the block's
    tokens, ``addmm -> act -> addmm``, scale by the combine weights and ``index_add_`` into the
    output; backward gathers the output gradient the same way, ``mm -> act' -> mm`` plus the
    weight-gradient matmuls, and ``index_add_``\\ s the input gradient. So every per-slot
    temporary (gathered rows, activation, scaled rows and their gradients) is one block, small
    and cache-resident; nothing of ``[m, d]`` is allocated besides the saved expert outputs.
    Weight gradients are written straight into ``[E, ...]`` buffers (``mm(out=)`` for a group's
    first block, ``addmm_`` for the next ones): no per-expert full-size gradients, no
    unbind/stack, no concatenation. Saved for backward: the input ``x`` (an input anyway),
    the pre-activation ``h [m, d_ff]`` and, when ``wslot`` needs a gradient, the unweighted
    expert outputs ``y [m, d]``; the gathered rows are gathered again and ``act(h)`` is
    recomputed block by block (``save_act=True`` keeps it instead). Large buffers come from the
    backend's :class:`_Workspace` (``ws``) when given.

    Expert dropout: ``keep [m, d_ff]`` (bool, or ``None`` for none) and ``scale = 1 / (1 - p)``.
    ``post=False`` (pre_act): ``a = act(z)``, ``z = h * keep * scale`` — the dropped ``z`` is what
    is saved in place of ``h``, and backward is ``gh = act'(z) * (gy @ w2^T) * keep * scale``.
    ``post=True`` (post_act): ``a = act(h) * keep * scale``, ``gh = act'(h) * (gy @ w2^T) * keep
    * scale``. In both, ``gw2 = a^T gy`` uses the dropped activations. ``keep`` is saved too
    (1 byte per hidden unit).
    """

    @staticmethod
    def forward(ctx, x, wslot, w1, b1, w2, b2, token_ids, counts, act_name, act, rows,  # noqa: D401
                save_act, keep=None, scale=1.0, post=False, ws=None):
        blocks = _chunks(counts, rows)  # consecutive: together they cover the m sorted rows
        sizes = [t - s for _, s, t in blocks]
        m = token_ids.shape[0]
        h = _empty(ws, "h", (m, w1.shape[2]), x)
        need_y = ctx.needs_input_grad[1]  # d out / d wslot[i] = <g[t], y[i]>
        y = _empty(ws, "y", (m, w2.shape[2]), x) if need_y else None
        a_all = torch.empty_like(h) if save_act else None
        out = torch.zeros_like(x)
        w1s, w2s = w1.unbind(0), w2.unbind(0)
        b1s, b2s = _unbind(b1), _unbind(b2)
        toks, hs, wcol = token_ids.split(sizes), h.split(sizes), wslot.unsqueeze(1).split(sizes)
        ys, keeps, a_s = _split(y, sizes), _split(keep, sizes), _split(a_all, sizes)
        for i, (e, _, _) in enumerate(blocks):
            xb, hb = x.index_select(0, toks[i]), hs[i]
            if b1s is not None:
                torch.addmm(b1s[e], xb, w1s[e], out=hb)
            else:
                torch.mm(xb, w1s[e], out=hb)
            if keeps is not None and not post:
                hb.mul_(keeps[i]).mul_(scale)  # h := z = drop(h), in place
            ab = act(hb)
            if keeps is not None and post:  # act() returns a new tensor: drop it in place
                ab.mul_(keeps[i]).mul_(scale)
            if a_s is not None:
                a_s[i].copy_(ab)
            if ys is not None:
                yb = ys[i]
                if b2s is not None:
                    torch.addmm(b2s[e], ab, w2s[e], out=yb)
                else:
                    torch.mm(ab, w2s[e], out=yb)
                out.index_add_(0, toks[i], yb * wcol[i])
            else:
                yb = torch.addmm(b2s[e], ab, w2s[e]) if b2s is not None else ab.mm(w2s[e])
                out.index_add_(0, toks[i], yb.mul_(wcol[i]))
        ctx.save_for_backward(x, wslot, token_ids, h, y, w1, w2, a_all, keep)
        ctx.blocks, ctx.sizes, ctx.act_name, ctx.act = blocks, sizes, act_name, act
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.scale, ctx.post, ctx.ws = scale, post, ws
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        x, wslot, token_ids, h, y, w1, w2, a_all, keep = ctx.saved_tensors
        post = keep is not None and ctx.post
        need_x, need_ws, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        gout = gout.contiguous()
        blocks, sizes, ws, scale = ctx.blocks, ctx.sizes, ctx.ws, ctx.scale
        hit = {e for e, _, _ in blocks}
        empty = [e for e in range(w1.shape[0]) if e not in hit]

        def buf(role, shape):  # written block by block; experts without tokens get zeros
            t = _empty(ws, role, shape, gout)
            if empty:
                t[empty] = 0
            return t
        gw1 = buf("gw1", w1.shape) if need_w1 else None
        gw2 = buf("gw2", w2.shape) if need_w2 else None
        gb1 = buf("gb1", (w1.shape[0], w1.shape[2])) if (need_b1 and ctx.has_b1) else None
        gb2 = buf("gb2", (w2.shape[0], w2.shape[2])) if (need_b2 and ctx.has_b2) else None
        gx = torch.zeros_like(x) if need_x else None
        gws = torch.empty_like(wslot) if need_ws else None
        w1s, w2s = w1.unbind(0), w2.unbind(0)
        gw1s, gw2s, gb1s, gb2s = _unbind(gw1), _unbind(gw2), _unbind(gb1), _unbind(gb2)
        toks, hs, wcol = token_ids.split(sizes), h.split(sizes), wslot.unsqueeze(1).split(sizes)
        ys = _split(y, sizes) if gws is not None else None
        gwss, keeps, a_s = _split(gws, sizes), _split(keep, sizes), _split(a_all, sizes)
        need_gh = gw1 is not None or gb1 is not None or gx is not None
        prev = -1
        for i, (e, _, _) in enumerate(blocks):
            first, prev = e != prev, e
            tok, hb = toks[i], hs[i]
            gyb = gout.index_select(0, tok)
            if gwss is not None:
                torch.sum(gyb * ys[i], 1, out=gwss[i])
            gyb.mul_(wcol[i])  # the gradient of the unweighted expert output
            if gw2s is not None:
                if a_s is not None:
                    ab = a_s[i]
                else:
                    ab = ctx.act(hb)
                    if post:  # the dropped activations were multiplied into w2
                        ab = ab.mul_(keeps[i]).mul_(scale)
                if first:
                    torch.mm(ab.t(), gyb, out=gw2s[e])
                else:
                    gw2s[e].addmm_(ab.t(), gyb)
            if gb2s is not None:
                if first:
                    torch.sum(gyb, 0, out=gb2s[e])
                else:
                    gb2s[e].add_(gyb.sum(0))
            if not need_gh:
                continue
            ga = gyb.mm(w2s[e].t())
            if post:  # d drop(a) / da, before act'
                ga.mul_(keeps[i]).mul_(scale)
            gh = _act_backward(ctx.act_name, ctx.act, ga, hb)
            if keeps is not None and not post:  # d drop(h) / dh, after act'
                gh.mul_(keeps[i]).mul_(scale)
            if gw1s is not None:
                xb = x.index_select(0, tok)
                if first:
                    torch.mm(xb.t(), gh, out=gw1s[e])
                else:
                    gw1s[e].addmm_(xb.t(), gh)
            if gb1s is not None:
                if first:
                    torch.sum(gh, 0, out=gb1s[e])
                else:
                    gb1s[e].add_(gh.sum(0))
            if gx is not None:
                gx.index_add_(0, tok, gh.mm(w1s[e].t()))
        return (gx, gws, gw1, gb1, gw2, gb2) + (None,) * 10


# impl="auto" runs grouped_mm only while both of its large per-step buffers are at most this big
# (bytes): one weight gradient [E, d, d_ff] (32 MiB is glibc's largest dynamic mmap threshold: a
# larger block is a fresh mmap, page faults included, every step; blocked keeps it in its
# workspace) and one activation [assignments, d_ff] (8 MiB: between the largest size where
# grouped_mm was ahead, 6 MiB, and the smallest where it was not, 12 MiB; see choose_impl)
AUTO_GROUPED_MM_MAX_WEIGHT_BYTES = 32 << 20
AUTO_GROUPED_MM_MAX_ACT_BYTES = 8 << 20


def choose_impl(slots: int, num_experts: int, d_model: int, d_ff: int, itemsize: int = 4,
                grouped_mm_ok: bool = True) -> str:
    """The implementation ``impl="auto"`` runs for ``slots`` (token, expert) assignments.

    ``"grouped_mm"`` when it can run (``grouped_mm_ok``), the weight gradient ``E·d·d_ff``
    is under :data:`AUTO_GROUPED_MM_MAX_WEIGHT_BYTES` and the activation ``slots·d_ff`` at most
    :data:`AUTO_GROUPED_MM_MAX_ACT_BYTES` (``itemsize`` bytes an element); ``"blocked"``
    otherwise. At d=384, d_ff=1536, fp32 that is grouped_mm for ``E <= 14`` and ``slots <= 1365``.

    Measured with ``python -m bench.impl_grid --clock cpu`` (1 thread, 2-core CPU; five runs in
    ``docs/bench/impl_grid_threads1.txt``), comparing the two implementations' median ratios to
    the floor cell by cell. At E=8 and 1,024 assignments (k=1, N=1,024 and k=2, N=512) grouped_mm
    was ahead in 5 of 6 comparisons, by up to 10%; at 2,048 (k=1, N=2,048 and k=2, N=1,024) in 3 of
    6, a tie, and a tie goes to blocked, which saves less for backward (the pre-activation and the
    expert outputs; grouped_mm the gathered input, the pre-activation and the activation): at E=8,
    k=2, N=1,024 0.63x the floor's saved activations against 1.38x (bench section 5), a saving
    that adds up over a model's MoE layers (one layer's peak is the same, 1.41x against 1.43x:
    the weight gradients, E/k = 4x the floor's, dominate it); from 4,096 up blocked was 6-33%
    faster (a tie at k=1, N=4,096). At E=64 blocked was faster at every size (N=512..4,096, k=1,
    2, 8). The plain ``"autograd"`` path is not chosen. Neither reaches 1.05x the floor at E=8,
    k=2, N=1,024 (blocked 1.12-1.15x in those runs): the layer's matmuls alone (256 rows an
    expert) take 1.07-1.10x the floor's matmuls (1,024 rows a weight)
    there (the ``matmuls`` column).
    """
    small_weights = num_experts * d_model * d_ff * itemsize < AUTO_GROUPED_MM_MAX_WEIGHT_BYTES
    small_acts = slots * d_ff * itemsize <= AUTO_GROUPED_MM_MAX_ACT_BYTES
    return "grouped_mm" if grouped_mm_ok and small_weights and small_acts else "blocked"


class TorchDroplessBackend(nn.Module):
    """Dropless experts in plain PyTorch: tokens are sorted by expert (one stable sort, no N×E
    tensor), run through their expert, scaled by their combine weight and scatter-added back
    (``index_add``). No per-token Python.

    ``impl``:

    * ``"auto"`` (default): :func:`choose_impl` picks ``"grouped_mm"`` or ``"blocked"`` on every
      call from the number of assignments, ``E``, ``d_model``, ``d_ff`` and the dtype (the last
      pick is in ``last_impl``);
    * ``"blocked"``: gather, expert FFNs and combine are one autograd node
      (:class:`_SortedExpertsFn`) that walks each expert group in blocks of at most
      ``block_rows`` rows, keeps every per-row temporary block-sized, writes weight gradients
      straight into ``[E, ...]`` buffers and saves only the pre-activation (and the unweighted
      expert outputs, for the combine weights' gradient) for backward. With ``reuse_buffers``
      (default) its large buffers — weight gradients, saved activations — come from a
      per-backend workspace that hands the same memory out again once the previous step is
      done with it (:class:`_Workspace`; CPU only; :meth:`release_buffers` frees it);
    * ``"grouped_mm"``: ``torch.nn.functional.grouped_mm`` for both matmuls (fp32 CPU,
      ``d_model`` and ``d_ff`` multiples of 4; otherwise falls back to ``"blocked"``), autograd
      backward (saves the gathered input, the pre-activation and the activation: more memory
      than blocked);
    * ``"autograd"``: the plain sort-based path (per-group matmuls on ``unbind`` views).

    All compute the same function; ``bench/__main__.py`` (section 1) and ``bench/impl_grid.py``
    time them side by side. Expert dropout (see :class:`Experts`) draws one keep-mask
    ``[m, d_ff]`` for the ``m`` expert-sorted rows right after the sort, so every impl drops the
    same units for the same RNG state; ``forward(..., dropout_mask=keep)`` takes an explicit
    bool keep-mask ``[N, K, d_ff]`` in (token, slot) layout instead (for tests; only while
    dropout is active).
    """

    supports_capacity = True  # runs whatever the router kept (dropped slots are −1)
    IMPLS = ("auto", "blocked", "grouped_mm", "autograd")

    def __init__(self, impl: str = "auto", block_rows: int = 4096, save_act: bool = False,
                 reuse_buffers: bool = True):
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"invalid impl={impl!r}; allowed: {'|'.join(self.IMPLS)}")
        if not (isinstance(block_rows, int) and block_rows >= 1):
            raise ValueError(f"invalid block_rows={block_rows!r}; allowed: an integer >= 1")
        self.impl, self.block_rows, self.save_act = impl, block_rows, save_act
        self.reuse_buffers = bool(reuse_buffers)
        self._ws = _Workspace()
        self.last_impl: str | None = None

    def release_buffers(self) -> None:
        """Drop the blocked path's kept buffers (memory in use elsewhere stays where it is)."""
        self._ws = _Workspace()

    def resolve_impl(self, experts: Experts, x: Tensor, slots: int) -> str:
        """The implementation that runs ``slots`` assignments of ``x`` (in the compute dtype) on
        ``experts``: on CUDA ``impl="auto"`` takes ``grouped_mm`` wherever it can run (one kernel,
        no host sync), elsewhere :func:`choose_impl` decides by size."""
        ok = _grouped_mm_ok(experts, x)
        if self.impl == "auto":
            if x.device.type == "cuda":
                return "grouped_mm" if ok else "blocked"
            return choose_impl(slots, experts.max_experts, experts.d_model, experts.d_ff, x.element_size(), ok)
        return "blocked" if self.impl == "grouped_mm" and not ok else self.impl

    def forward(self, experts: Experts, x: Tensor, indices: Tensor, weights: Tensor,
                dropout_mask: Tensor | None = None) -> Tensor:
        """``out[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t])`` over non-empty slots,
        each expert with its dropout (keep-mask of slot ``(t, j)``) when active.

        Mixed precision: the experts compute in :func:`compute_dtype` (the autocast dtype under
        ``bf16-mixed`` / ``16-mixed``) with autocast off inside, on casts of ``x``, the combine
        weights and the expert parameters (gradients flow back to the fp32 parameters in their own
        dtype, as for an ``nn.Linear`` under autocast); the output has ``x``'s dtype."""
        dtype = compute_dtype(x, experts)
        params = _Params.of(experts, dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = self._forward(experts, params, x.to(dtype), indices, weights, dropout_mask)
        return y.to(x.dtype)

    def _forward(self, experts: Experts, p: _Params, x: Tensor, indices: Tensor, weights: Tensor,
                 dropout_mask: Tensor | None) -> Tensor:
        if self.impl == "autograd":
            self.last_impl = "autograd"
            return self._forward_autograd(experts, p, x, indices, weights, dropout_mask)
        if x.device.type == "cuda" and self.resolve_impl(experts, x, indices.numel()) == "grouped_mm":
            self.last_impl = "grouped_mm"
            return self._grouped_mm_padded(experts, p, x, indices, weights, dropout_mask)
        slot_ids, token_ids, counts, sizes = sort_by_expert(indices, experts.max_experts)
        impl = self.last_impl = self.resolve_impl(experts, x, slot_ids.numel())
        if slot_ids.numel() == 0:
            return torch.zeros_like(x)
        keep = _gathered_keep(experts, dropout_mask, slot_ids, indices, x.device)
        wslot = weights.reshape(-1).index_select(0, slot_ids).to(x.dtype)
        if impl == "grouped_mm":
            rows = torch.repeat_interleave(torch.arange(experts.max_experts, device=x.device), counts)
            ys = self._grouped_mm_ffn(experts, p, x.index_select(0, token_ids), counts, rows, keep)
            return torch.zeros_like(x).index_add(0, token_ids, ys * wslot.unsqueeze(-1))
        if keep is None:
            drop = (None, 1.0, False)
        else:
            drop = (keep, 1.0 / (1.0 - experts.dropout), experts.dropout_position == "post_act")
        return _SortedExpertsFn.apply(x, wslot, p.w1, p.b1, p.w2, p.b2, token_ids,
                                      sizes, experts.activation, experts.act, self.block_rows,
                                      self.save_act, *drop, self._ws if self.reuse_buffers else None)

    @staticmethod
    def _grouped_mm_ffn(experts: Experts, p: _Params, xs: Tensor, counts: Tensor, rows: Tensor,
                        keep: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """Both matmuls as ``grouped_mm`` over the expert-sorted rows ``xs`` (``counts[e]`` rows
        for expert ``e``, then any rows past ``sum(counts)``, which grouped_mm leaves unset);
        ``rows[i]`` is the expert of row ``i`` (for the biases). ``valid [m, 1]`` zeroes the
        pre-activation of the rows past the groups, so no gradient flows back from them (into
        ``b1`` or the input); their output rows are the caller's to mask."""
        offs = counts.cumsum(0, dtype=torch.int32)
        h = F.grouped_mm(xs, p.w1, offs=offs)
        if p.b1 is not None:
            h = h + p.b1.index_select(0, rows)
        if valid is not None:
            h = torch.where(valid, h, 0)
        y = F.grouped_mm(experts.hidden(h, keep), p.w2, offs=offs)
        if p.b2 is not None:
            y = y + p.b2.index_select(0, rows)
        return y

    @classmethod
    def _grouped_mm_padded(cls, experts: Experts, p: _Params, x: Tensor, indices: Tensor, weights: Tensor,
                           dropout_mask: Tensor | None = None) -> Tensor:
        """``grouped_mm`` over all ``N*K`` slots without a host sync (the CUDA path): the slots are
        sorted by expert with the empty ones (−1) last, the group offsets end at the last valid
        slot, and the rows past it (whatever grouped_mm leaves there) are masked out of the input,
        the hidden activations and the output — so they reach neither the output nor any
        gradient. Expert dropout draws one keep-mask row per slot (empty slots included) or
        takes ``dropout_mask [N, K, d_ff]`` as given."""
        e, k = experts.max_experts, indices.shape[1]
        flat = indices.reshape(-1)
        key = torch.where(flat >= 0, flat, torch.full_like(flat, e))
        sorted_key, order = torch.sort(key, stable=True)
        counts = torch.zeros(e + 1, dtype=torch.long, device=x.device).index_add_(0, key, torch.ones_like(key))
        valid = (sorted_key < e).unsqueeze(1)
        token_ids = torch.div(order, k, rounding_mode="floor")
        xs = torch.where(valid, x.index_select(0, token_ids), 0)
        if dropout_mask is not None:
            _check_keep(experts, dropout_mask, (*indices.shape, experts.d_ff))
            keep = dropout_mask.reshape(-1, experts.d_ff).index_select(0, order)
        else:
            keep = experts.draw_keep(order.numel(), x.device)
        ys = cls._grouped_mm_ffn(experts, p, xs, counts[:e], sorted_key.clamp_max(e - 1), keep, valid)
        wslot = weights.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(1)
        return torch.zeros_like(x).index_add(0, token_ids, torch.where(valid, ys * wslot, 0))

    @staticmethod
    def _forward_autograd(experts: Experts, p: _Params, x: Tensor, indices: Tensor, weights: Tensor,
                          dropout_mask: Tensor | None = None) -> Tensor:
        """The plain sort-based path (per-group matmuls on ``unbind`` views, autograd backward)."""
        slot_ids, token_ids, _, sizes = sort_by_expert(indices, experts.max_experts)
        if slot_ids.numel() == 0:
            return torch.zeros_like(x)
        keep = _gathered_keep(experts, dropout_mask, slot_ids, indices, x.device)
        keeps = torch.split(keep, sizes) if keep is not None else None
        xs = x.index_select(0, token_ids)
        w1s, w2s, b1s, b2s = _unbind(p.w1), _unbind(p.w2), _unbind(p.b1), _unbind(p.b2)
        outs = []
        for e, chunk in enumerate(torch.split(xs, sizes)):
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


BACKENDS.register("torch", TorchDroplessBackend)
