"""MegaBlocks backend vs the torch backend on the same routing decision: output and every gradient.

Each case builds a real MoE layer (router + optional Stateful Fusion), routes one batch, and runs
the same ``(experts, x, indices, weights)`` through :class:`rmoe.experts.TorchDroplessBackend`
(fp32, the reference) and :class:`rmoe.megablocks.MegaBlocksBackend` with an ops object:

* ``reference``: :class:`TorchReferenceOps` below — torch implementations of the MegaBlocks /
  grouped_gemm ops the adapter calls, same signatures, fp32 (CPU or CUDA); the default suite's test;
* ``triton``: MegaBlocks' own Triton ``gather`` / ``scatter`` kernels (run on CPU under
  ``TRITON_INTERPRET=1``), the rest as ``reference``;
* ``megablocks``: MegaBlocks' CUDA ops and grouped_gemm (bf16; CUDA and ``make megablocks``).

Compared: the output, and the gradients of ``x``, the combine weights, ``w1``, ``b1``, ``w2``,
``b2`` of ``sum(out * g)`` for a random ``g``; the error is ``max|a - b| / max(max|b|, 1)``.
``python -m bench.megablocks_parity --ops megablocks --device cuda`` is the device check.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import Tensor

from rmoe import build_moe_layer
from rmoe.experts import TorchDroplessBackend
from rmoe.megablocks import MegaBlocksBackend, MegaBlocksOps


class TorchReferenceOps:
    """Torch implementations of the ops :class:`MegaBlocksBackend` calls, with MegaBlocks' and
    grouped_gemm's signatures and the same input checks (so an adapter bug that would fail on the
    GPU fails here): ``megablocks.ops.{sort, histogram, inclusive_cumsum, gather, scatter}`` and
    ``grouped_gemm.ops.gmm``. Differentiable through plain autograd (``index_select`` /
    ``index_copy`` / ``mm``), which computes what MegaBlocks' hand-written backwards compute."""

    def __init__(self, compute_dtype: torch.dtype = torch.float32):
        self.compute_dtype = compute_dtype

    @staticmethod
    def sort(x: Tensor, end_bit: int) -> tuple[Tensor, Tensor]:
        """Stable sort of the integer keys ``x`` (CUB radix sort on bits ``[0, end_bit)``):
        ``(sorted keys, positions)``, both in ``x``'s dtype."""
        assert x.dim() == 1 and x.dtype in (torch.int16, torch.int32, torch.int64)
        assert x.numel() == 0 or (int(x.min()) >= 0 and int(x.max()) < 2 ** end_bit), "key beyond end_bit"
        values, order = torch.sort(x, stable=True)
        return values, order.to(x.dtype)

    @staticmethod
    def histogram(x: Tensor, max_val: int) -> Tensor:
        """int32 counts of the values ``0 .. max_val - 1`` (others are not counted)."""
        assert x.dim() == 1 and x.dtype in (torch.int16, torch.int32, torch.int64)
        inside = x[(x >= 0) & (x < max_val)].long()
        return torch.bincount(inside, minlength=max_val).int()

    @staticmethod
    def inclusive_cumsum(x: Tensor, dim: int) -> Tensor:
        return torch.cumsum(x, dim).to(x.dtype)

    @staticmethod
    def gather(x: Tensor, indices: Tensor, bin_ids: Tensor, bins: Tensor, top_k: int) -> Tensor:
        """Row ``i`` of the output is ``x[indices[i] // top_k]`` (``indices``: sorted slot positions)."""
        assert x.dim() == 2 and indices.shape == bin_ids.shape == (x.shape[0] * top_k,)
        return x.index_select(0, torch.div(indices.long(), top_k, rounding_mode="floor"))

    @staticmethod
    def scatter(x: Tensor, indices: Tensor, bin_ids: Tensor, weights: Tensor, bins: Tensor, top_k: int) -> Tensor:
        """Slot ``indices[i]`` gets ``x[i] * weights[indices[i]]`` (scaled in fp32, stored in
        ``x``'s dtype); the output is the sum over each token's ``top_k`` slots."""
        assert x.dim() == 2 and indices.shape == bin_ids.shape == weights.shape == (x.shape[0],)
        idx = indices.long()
        scaled = (x.float() * weights.index_select(0, idx).float().unsqueeze(1)).to(x.dtype)
        slots = x.new_zeros(x.shape).index_copy(0, idx, scaled)
        return slots.view(-1, top_k, x.shape[1]).sum(1)

    @staticmethod
    def gmm(a: Tensor, b: Tensor, batch_sizes: Tensor, trans_b: bool = False) -> Tensor:
        """Group ``e`` (``batch_sizes[e]`` consecutive rows of ``a``) times ``b[e]``."""
        assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64, "batch_sizes: CPU int64"
        assert a.dim() == 2 and b.dim() == 3 and batch_sizes.shape == (b.shape[0],)
        assert a.dtype == b.dtype and a.is_contiguous() and b.is_contiguous()
        assert int(batch_sizes.sum()) == a.shape[0]
        parts = a.split(batch_sizes.tolist())
        return torch.cat([p @ (b[e].t() if trans_b else b[e]) for e, p in enumerate(parts)])


class TritonInterpretOps(TorchReferenceOps):
    """MegaBlocks' Triton ``gather`` / ``scatter`` (``megablocks.backend.kernels``, on CPU
    tensors under ``TRITON_INTERPRET=1``); sort, histogram and cumsum (CUDA C++) and gmm as
    :class:`TorchReferenceOps`. The kernels' autotuners are cut to their first config (the
    interpreter cannot time configs)."""

    def __init__(self, compute_dtype: torch.dtype = torch.float32):
        super().__init__(compute_dtype)
        from megablocks.backend import kernels
        from megablocks.ops import gather, scatter

        for kernel in (kernels._padded_copy, kernels._padded_copy_wgrad):
            kernel.configs = kernel.configs[:1]
        self.gather, self.scatter = gather, scatter


# name -> build_moe_layer keywords, and what routing the case must show
CASES = {
    "topk_k2": dict(router="topk", initial_experts=4, top_k=2),
    "capacity_drops": dict(router="topk", initial_experts=4, top_k=2, capacity_factor=0.5),
    "topany_fusion": dict(router="topany", initial_experts=4, max_experts=8, fusion={"ema_decay": 0.9}),
    "expert_dropout": dict(router="topk", initial_experts=4, top_k=2, expert_dropout=0.3),
    "lossfree": dict(router="lossfree", initial_experts=4, top_k=2),
}
GRADS = ("x", "weights", "w1", "b1", "w2", "b2")


def _run(backend, layer, x, indices, weights, g, mask):
    x = x.detach().clone().requires_grad_(True)
    w = weights.detach().clone().requires_grad_(True)
    ex = layer.experts
    for p in ex.parameters():
        p.grad = None
    out = backend(ex, x, indices, w, dropout_mask=mask)
    (out.float() * g).sum().backward()
    grads = {"x": x.grad, "weights": w.grad, "w1": ex.w1.grad, "b1": ex.b1.grad, "w2": ex.w2.grad, "b2": ex.b2.grad}
    return out.detach().float(), {k: v.detach().float() for k, v in grads.items()}


def run_case(name: str, ops: object, device: str = "cpu", n: int = 48, d: int = 16, d_ff: int = 32,
             seed: int = 0) -> dict[str, float]:
    """Errors (``max|a - b| / max(max|b|, 1)``) of the MegaBlocks backend with ``ops`` against the
    torch backend, for the output and each gradient, on case ``name`` of :data:`CASES`."""
    torch.manual_seed(seed)
    layer = build_moe_layer(d, d_ff, **CASES[name]).to(device)
    x = torch.randn(n, d, device=device)
    with torch.no_grad():
        rec = layer.router(x)
        if layer.fusion is not None:
            rec = layer.fusion(rec)
    indices, weights = rec.expert_indices, rec.expert_weights.float()
    if name in ("capacity_drops", "topany_fusion") and not bool((indices < 0).any()):
        raise AssertionError(f"case {name}: the routing has no empty slot")
    mask = None
    if layer.experts.dropout > 0:
        layer.train()
        mask = torch.rand(*indices.shape, d_ff, device=device) >= layer.experts.dropout
    g = torch.randn(n, d, device=device)
    ref_out, ref_grads = _run(TorchDroplessBackend(), layer, x, indices, weights, g, mask)
    out, grads = _run(MegaBlocksBackend(ops=ops), layer, x, indices, weights, g, mask)

    def err(a: Tensor, b: Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))

    errors = {"out": err(out, ref_out)}
    errors.update({k: err(grads[k], ref_grads[k]) for k in GRADS})
    return errors


def make_ops(kind: str) -> object:
    if kind == "reference":
        return TorchReferenceOps()
    if kind == "triton":
        return TritonInterpretOps()
    if kind == "megablocks":
        MegaBlocksBackend.check_available()
        return MegaBlocksOps()
    raise ValueError(f"invalid ops={kind!r}; allowed: reference|triton|megablocks")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="reference", choices=("reference", "triton", "megablocks"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=None,
                    help="largest error allowed (default 1e-5 for fp32 ops, 3e-2 for bf16 megablocks)")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--d-ff", type=int, default=32)
    ap.add_argument("--json", default=None, help="write the errors here")
    args = ap.parse_args(argv)
    ops = make_ops(args.ops)
    tol = args.tol if args.tol is not None else (1e-5 if ops.compute_dtype == torch.float32 else 3e-2)
    results, worst = {}, 0.0
    print(f"ops={args.ops} ({ops.compute_dtype}) device={args.device} n={args.n} d={args.d} d_ff={args.d_ff} "
          f"tol={tol:g}; error = max|mb - torch| / max(max|torch|, 1)")
    print(f"{'case':16s}" + "".join(f"{k:>10s}" for k in ("out", *GRADS)))
    for name in CASES:
        errors = run_case(name, ops, args.device, args.n, args.d, args.d_ff)
        results[name] = errors
        worst = max(worst, *errors.values())
        print(f"{name:16s}" + "".join(f"{errors[k]:10.2e}" for k in ("out", *GRADS)))
    ok = worst <= tol
    print(f"worst {worst:.2e}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ops": args.ops, "device": args.device, "tol": tol, "worst": worst, "pass": ok,
                       "cases": results}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
