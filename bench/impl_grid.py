"""The torch backend's implementations side by side over a grid of sizes, each against the floor.

``python -m bench.impl_grid`` times, for every ``(E, k, N)`` of the grid, one forward+backward of
the MoE layer (top-k router, d=384, d_ff=1536, the bench's section 1 set-up) with each
implementation of :class:`rmoe.experts.TorchDroplessBackend` and of the floor (``k`` dense FFNs on
the same ``N`` tokens), interleaved with the order rotated every repeat. Each cell is
``median (min)``: the median of the per-repeat ratios to the floor, and the ratio of the minimum
times (noise from other processes only ever adds time, so on a loaded machine the minima are the
steadier estimate). ``--clock cpu`` times this thread's CPU time instead of the wall clock
(1 thread), which leaves out the time other processes hold the core. This is the measurement
behind ``impl="auto"`` (:func:`rmoe.experts.choose_impl`); the last column names what it picks.

A variant is ``impl`` or ``impl+option=value+...`` with the backend's options, e.g.
``blocked+block_rows=1024`` or ``blocked+reuse_buffers=0``, or ``matmuls``: the layer's matmuls
alone (per expert group of this routing: the two forward and four backward products, into
preallocated buffers, no activation, no routing, no gather or scatter) against the floor's matmuls
alone (the same six per dense FFN), timed as a pair of their own. Its ratio is the part of the
layer's excess over the floor that lies in the matmul kernels themselves (fewer rows a call), which
no implementation running the expert FFNs on these kernels removes.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bench.__main__ import D_FF, D_MODEL, DenseFloor, LayerPair, interleaved_times
from rmoe.experts import TorchDroplessBackend, choose_impl

IMPLS = ("auto", "blocked", "grouped_mm", "autograd")


def backend_for(spec: str) -> nn.Module:
    """``"impl+option=value+..."`` -> the backend (values are ints; a bare option means True)."""
    impl, *opts = spec.split("+")
    kw: dict = {}
    for o in opts:
        name, _, val = o.partition("=")
        kw[name] = int(val) if val else True
    return TorchDroplessBackend(impl=impl, **kw)


def grid_row(e: int, k: int, n: int, reps: int, variants: tuple[str, ...],
             clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    pair = LayerPair(e, k, n)
    fns: dict[str, Callable[[], None]] = {"floor": pair.run_floor}
    for spec in variants:
        if spec == "matmuls":
            fns.update(matmul_fns(pair.moe, pair.floor, pair.x0))
        else:
            fns[spec] = pair.moe_fn(backend_for(spec))
    return interleaved_times(fns, reps, clock=clock)


def matmul_fns(moe: nn.Module, floor: DenseFloor, x0: torch.Tensor) -> dict[str, Callable[[], None]]:
    """``{"floor matmuls": ..., "matmuls": ...}``: the six products per dense FFN of the floor and
    per expert group of the layer (sizes from the layer's routing of ``x0``), on random operands
    of those shapes, every output written into a buffer allocated here once."""
    n = x0.shape[0]
    with torch.no_grad():
        idx = moe.router(x0).expert_indices
    counts = torch.bincount(idx[idx >= 0], minlength=moe.max_experts).tolist()
    m = sum(counts)
    ex = moe.experts
    w1s, w2s, b1s, b2s = ex.w1.detach().unbind(0), ex.w2.detach().unbind(0), ex.b1.detach(), ex.b2.detach()
    xs, gy = torch.randn(m, D_MODEL), torch.randn(m, D_MODEL)
    a, gh = torch.randn(m, D_FF), torch.randn(m, D_FF)
    h, ga, y, gx = torch.empty(m, D_FF), torch.empty(m, D_FF), torch.empty(m, D_MODEL), torch.empty(m, D_MODEL)
    gw1, gw2 = torch.empty_like(ex.w1), torch.empty_like(ex.w2)
    groups = [(e, s, s + c) for e, (s, c) in enumerate(zip([0, *itertools.accumulate(counts)], counts)) if c]

    def layer():
        for e, s, t in groups:
            torch.addmm(b1s[e], xs[s:t], w1s[e], out=h[s:t])
            torch.addmm(b2s[e], a[s:t], w2s[e], out=y[s:t])
            torch.mm(gy[s:t], w2s[e].t(), out=ga[s:t])
            torch.mm(a[s:t].t(), gy[s:t], out=gw2[e])
            torch.mm(gh[s:t], w1s[e].t(), out=gx[s:t])
            torch.mm(xs[s:t].t(), gh[s:t], out=gw1[e])
    fx, fgy = torch.randn(n, D_MODEL), torch.randn(n, D_MODEL)
    fa, fgh = torch.randn(n, D_FF), torch.randn(n, D_FF)
    fh, fga, fy, fgx = torch.empty(n, D_FF), torch.empty(n, D_FF), torch.empty(n, D_MODEL), torch.empty(n, D_MODEL)
    ffns = [(f[0].weight.detach(), f[0].bias.detach(), f[2].weight.detach(), f[2].bias.detach()) for f in floor.ffns]
    fgw = [(torch.empty_like(w1), torch.empty_like(w2)) for w1, _, w2, _ in ffns]

    def dense():
        for (w1, b1, w2, b2), (gw1_, gw2_) in zip(ffns, fgw):  # nn.Linear's products, weights [out, in]
            torch.addmm(b1, fx, w1.t(), out=fh)
            torch.addmm(b2, fa, w2.t(), out=fy)
            torch.mm(fgy, w2, out=fga)
            torch.mm(fgy.t(), fa, out=gw2_)
            torch.mm(fgh, w1, out=fgx)
            torch.mm(fgh.t(), fx, out=gw1_)
    return {"floor matmuls": dense, "matmuls": layer}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--E", default="8,16,64", help="numbers of experts")
    ap.add_argument("--k", default="1,2,8", help="top-k values (k <= E)")
    ap.add_argument("--N", default="256,512,1024,2048,4096", help="token counts")
    ap.add_argument("--impls", default=",".join(IMPLS), help="variants, comma-separated (see the module doc)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter, as the bench; cpu: this thread's CPU time (1 thread only)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu needs --threads 1")
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    variants = tuple(s for s in a.impls.split(",") if s)
    t0 = time.time()
    print(f"impl grid: torch {torch.__version__}, {torch.get_num_threads()} threads, d={D_MODEL} d_ff={D_FF}, "
          f"{a.clock} clock, {a.reps} interleaved repeats; x floor = median of the paired ratios "
          f"(ratio of the minima)" + ("; matmuls: against the floor's matmuls" if "matmuls" in variants else ""))
    w = max(15, *(len(v) for v in variants))
    print(f"  {'E':>3} {'k':>2} {'N':>5} {'rows/E':>7} {'floor ms':>9} " + " ".join(f"{v:>{w}}" for v in variants)
          + "  auto picks")
    for e in (int(s) for s in a.E.split(",")):
        for k in (int(s) for s in a.k.split(",")):
            if k > e:
                continue
            for n in (int(s) for s in a.N.split(",")):
                times = grid_row(e, k, n, a.reps, variants, clock)
                fl = times["floor"]
                cells = []
                for v in variants:
                    ref = times["floor matmuls"] if v == "matmuls" else fl
                    med = statistics.median(x / f for x, f in zip(times[v], ref))
                    cells.append(f"{f'{med:.3f} ({min(times[v]) / min(ref):.3f})':>{w}}")
                pick = choose_impl(k * n, e, D_MODEL, D_FF)
                print(f"  {e:>3} {k:>2} {n:>5} {k * n / e:>7.0f} {statistics.median(fl) * 1e3:>9.1f} "
                      + " ".join(cells) + f"  {pick}", flush=True)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
