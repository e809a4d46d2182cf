"""The MegaBlocks expert backend: our routing decision, MegaBlocks' permutation, grouped GEMM experts.

Our router decides everything (``indices [N, K]`` with ``-1`` for empty or capacity-dropped slots,
``weights [N, K]`` with Stateful Fusion folded in); this backend runs the experts the way
MegaBlocks' dropless grouped MLP does (``megablocks/layers/dmoe.py``: ``indices_and_bins`` +
``grouped_permute_and_compute``; ``megablocks/layers/mlp.py``: ``GroupedMLP``), with MegaBlocks'
own ops and ``grouped_gemm``:

1. ``sort(key, end_bit)`` (CUB radix sort, stable) of the flat slots by expert, where an empty
   slot gets the sentinel key ``E`` (MegaBlocks' ops assume every slot is valid: the sentinel
   bin sorts last and its rows are dropped before the GEMMs);
2. ``histogram(key, E + 1)`` and ``inclusive_cumsum`` for the bin bounds;
3. ``gather`` (Triton): the ``N*K`` expert-sorted rows (the sentinel's are never used);
4. ``gmm`` (``grouped_gemm.ops.gmm``) on the first ``m`` rows with our ``w1 [E, d, d_ff]`` as it
   is stored (no transposition, no re-layout), the per-expert bias ``b1`` added by each row's
   bin id, the activation with expert dropout (:meth:`rmoe.experts.Experts.hidden`), ``gmm`` with
   ``w2 [E, d_ff, d]``, ``b2``;
5. ``scatter`` (Triton): each sorted row times its slot's combine weight, summed per token; the
   sentinel rows are zeros, so an empty slot adds nothing and its weight gets a zero gradient.

Expert dropout keeps the torch backend's contract: the keep-mask ``[m, d_ff]`` of the sorted rows
is gathered from ``dropout_mask [N, K, d_ff]`` or drawn fresh (one draw of ``m`` rows after the
sort) by :func:`rmoe.experts._gathered_keep`. The stable sort orders the rows exactly as
:func:`rmoe.experts.sort_by_expert` does, so both backends drop the same units for the same RNG
state.

Precision: ``grouped_gemm`` 0.3.0 takes bfloat16 only, so the experts always compute in bf16 —
the autocast dtype under ``bf16-mixed``, and bf16 as well for an fp32 input or under fp16
autocast (a float32 input is cast to bf16; the output comes back in the input's dtype). fp32
expert weights are cast to bf16 once per forward (what autocast does for a linear layer); bf16
weights are used as stored. The combine weights stay fp32 (MegaBlocks' scatter scales in fp32).
Autocast is off inside the backend: every cast is explicit.

Host syncs: one per forward (the per-expert counts go to the CPU: ``gmm`` takes CPU
``batch_sizes``, and the number of kept rows sizes the GEMM input).

The ops object (the seam): :class:`MegaBlocksOps` by default, loaded on the first forward (after
:meth:`MegaBlocksBackend.check_available`). ``MegaBlocksBackend(ops=...)`` takes any object with
the same attributes and signatures — ``sort``, ``histogram``, ``inclusive_cumsum``, ``gather``,
``scatter`` (megablocks.ops) and ``gmm`` (grouped_gemm.ops) — and ``compute_dtype``;
``bench/megablocks_parity.py`` has torch reference implementations that the CPU tests run.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from .experts import Experts, _gathered_keep
from .registry import BACKENDS


class MegaBlocksOps:
    """MegaBlocks' CUDA ops and ``grouped_gemm``'s grouped GEMM (imported on construction)."""

    compute_dtype = torch.bfloat16  # grouped_gemm.ops.gmm: bfloat16 only

    def __init__(self) -> None:
        mb = importlib.import_module("megablocks.ops")
        gg = importlib.import_module("grouped_gemm.ops")
        self.sort, self.histogram, self.inclusive_cumsum = mb.sort, mb.histogram, mb.inclusive_cumsum
        self.gather, self.scatter, self.gmm = mb.gather, mb.scatter, gg.gmm


class MegaBlocksBackend(nn.Module):
    """Runs our routing decision through MegaBlocks' dropless grouped path (see the module doc).

    Same parameters and the same function as :class:`rmoe.experts.TorchDroplessBackend`
    (capacity drops and empty slots included); registered as ``backend=megablocks``, which needs
    CUDA and the packages ``make megablocks`` builds. MegaBlocks' router, its load-balancing loss
    and its module-level state are not used.
    """

    supports_capacity = True  # runs whatever the router kept (dropped and empty slots are -1)

    def __init__(self, ops: object | None = None) -> None:
        super().__init__()
        self.ops = ops

    @staticmethod
    def check_available() -> None:
        """Fail unless CUDA and the MegaBlocks packages are there (what ``backend=megablocks`` needs)."""
        if not torch.cuda.is_available():
            raise RuntimeError("backend='megablocks' needs a CUDA device; none is available. "
                               "Use backend=torch on CPU (same parameters, same results).")
        for name in ("megablocks.ops", "grouped_gemm.ops"):
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise RuntimeError(f"backend='megablocks' needs the packages that `make megablocks` builds "
                                   f"(megablocks, stanford-stk, grouped_gemm): import {name} failed: {exc}") from exc

    def __getstate__(self) -> dict:
        """Pickle/deepcopy without the loaded CUDA ops (loaded again on the first forward)."""
        state = self.__dict__.copy()
        if isinstance(state.get("ops"), MegaBlocksOps):
            state["ops"] = None
        return state

    def _ops(self):
        if self.ops is None:
            self.check_available()
            self.ops = MegaBlocksOps()
        return self.ops

    def forward(self, experts: Experts, x: Tensor, indices: Tensor, weights: Tensor,
                dropout_mask: Tensor | None = None) -> Tensor:
        """``out[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t])`` over non-empty slots."""
        ops = self._ops()
        cdt = ops.compute_dtype
        num_experts = experts.max_experts
        k = indices.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            flat = indices.reshape(-1)
            # empty slots go to the sentinel bin E: sorted last, counted, never computed
            key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts)).int()
            bin_ids, order = ops.sort(key, max(num_experts.bit_length(), 1))
            counts = ops.histogram(key, num_experts + 1)
            bins = ops.inclusive_cumsum(counts, 0)
            batch_sizes = counts.to("cpu", torch.int64)  # the forward's one host sync
            group_sizes = batch_sizes[:num_experts]
            m = int(group_sizes.sum())
            if m == 0:
                return torch.zeros_like(x)
            keep = _gathered_keep(experts, dropout_mask, order[:m].long(), indices, x.device)
            xs = ops.gather(x.to(cdt), order, bin_ids, bins, k)[:m]
            rows = bin_ids[:m].long() if experts.b1 is not None or experts.b2 is not None else None
            h = ops.gmm(xs, experts.w1.to(cdt), group_sizes)
            if experts.b1 is not None:
                h = h + experts.b1.to(cdt).index_select(0, rows)
            y = ops.gmm(experts.hidden(h, keep), experts.w2.to(cdt), group_sizes)
            if experts.b2 is not None:
                y = y + experts.b2.to(cdt).index_select(0, rows)
            if m < flat.numel():  # the sentinel rows: zeros, so empty slots add nothing
                y = torch.cat([y, y.new_zeros(flat.numel() - m, y.shape[1])])
            out = ops.scatter(y, order, bin_ids, weights.reshape(-1).float(), bins, k)
        return out.to(x.dtype)


BACKENDS.register("megablocks", MegaBlocksBackend)
