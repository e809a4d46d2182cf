"""Helper of ``tests/test_ddp_balancing.py``: the same MoE layers and batches, run either as one rank of a
2-process gloo group, each layer wrapped in ``torch.nn.parallel.DistributedDataParallel`` (buffers
broadcast from rank 0 at every forward, gradients averaged), or, through :func:`run` with
``world_size=1``, as one process over the union of both ranks' rows.

* ``global_batch``: one step, the loss is the layer's aux loss alone; returned: the loss value and the
  router weight's gradient after DDP's averaging.
* ``global_batch`` with ``global_batch_mode=megatron`` on the same rows: the loss and the gradient.
* ``global_batch`` under gradient accumulation: one step of ``MICRO`` micro-batches in one
  ``rmoe.accumulation`` window (the first under ``no_sync``); one process: a single forward over all rows of
  all micro-batches; returned: the router weight's gradient and the window's token count.
* ``lossfree``: ``STEPS`` optimizer steps of 2 micro-batches each (the first under ``no_sync``, as
  gradient accumulation does), ``update_bias()`` after each; returned: the accumulated counts before
  each update and the bias after it.

Rank 0's rows hold more real tokens than rank 1's (padding masks), so equal token counts are not
what makes the results agree.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

D, T, B = 8, 5, 3  # d_model, tokens per sequence, sequences per rank and micro-batch
STEPS, MICRO = 2, 2


class Wrap(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, mask):
        y, rec = self.layer(x, mask)
        return y, rec.aux_loss


def build():
    import rmoe

    torch.manual_seed(7)
    gb = rmoe.build_moe_layer(D, 16, router="topk", initial_experts=4, top_k=2, aux_loss="global_batch")
    lf = rmoe.build_moe_layer(D, 16, router="lossfree", initial_experts=4, top_k=2,
                              router_options={"bias_update_rate": 0.125})
    with torch.no_grad():  # a router that prefers expert 0, so the bias has work to do
        lf.router.weight.add_(torch.randn(4, D) * 0.5)
        lf.router.weight[0] += 1.0
    return gb, lf


def batch(g: torch.Generator):
    """Union rows ``[2B, T, D]``; rows ``r*B .. (r+1)*B - 1`` are rank ``r``'s; rank 0's are longer."""
    x = torch.randn(2 * B, T, D, generator=g) + 0.3
    lengths = torch.cat([torch.randint(4, T + 1, (B,), generator=g), torch.randint(1, 3, (B,), generator=g)])
    return x, torch.arange(T)[None, :] < lengths[:, None]


def run(rank: int, world_size: int) -> dict:
    gb, lf = build()
    g = torch.Generator().manual_seed(11)
    rows = slice(0, 2 * B) if world_size == 1 else slice(rank * B, (rank + 1) * B)
    if world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel
        gb_m = ddp(Wrap(gb), find_unused_parameters=True)
        lf_m = ddp(Wrap(lf), find_unused_parameters=True)
    else:
        gb_m, lf_m = Wrap(gb), Wrap(lf)
    out = {"tokens": [], "counts": [], "bias": []}
    gb_m.train()
    x, mask = batch(g)
    _, aux = gb_m(x[rows], mask[rows])
    aux.backward()
    out["gb_loss"] = float(aux.detach())
    out["gb_grad"] = gb.router.weight.grad.detach().clone()
    out["gb_tokens"] = int(mask[rows].sum())
    # the same layer with Megatron-Core's rule (global_batch_mode=megatron) on the same rows
    import rmoe

    gbm = rmoe.build_moe_layer(D, 16, router="topk", initial_experts=4, top_k=2, aux_loss="global_batch",
                               global_batch_mode="megatron")
    gbm.load_state_dict(build()[0].state_dict(), strict=False)
    gbm_m = torch.nn.parallel.DistributedDataParallel(Wrap(gbm), find_unused_parameters=True) if world_size > 1 \
        else Wrap(gbm)
    _, aux = gbm_m.train()(x[rows], mask[rows])
    aux.backward()
    out["gbm_loss"] = float(aux.detach())
    out["gbm_grad"] = gbm.router.weight.grad.detach().clone()
    # global_batch under gradient accumulation: 2 micro-batches per rank in one window (rmoe.accumulation's
    # pre-pass all-reduces the window's counts); one process: one forward over all rows of both micro-batches
    gba = build()[0]
    xs = [batch(g) for _ in range(MICRO)]
    if world_size > 1:
        from rmoe.accumulation import open_window

        gba_m = torch.nn.parallel.DistributedDataParallel(Wrap(gba), find_unused_parameters=True).train()
        window = open_window(gba, [lambda x=x, m=m: gba(x[rows], m[rows]) for x, m in xs])
        out["gba_window_tokens"] = [float(c[-1]) for c in window.counts]
        for j, (x, m) in enumerate(xs):
            sync = gba_m.no_sync() if j < MICRO - 1 else contextlib.nullcontext()
            with sync, window.micro_batch(j):
                _, aux = gba_m(x[rows], m[rows])
                (aux / MICRO).backward()
    else:
        gba.train()
        _, rec = gba(torch.cat([x for x, _ in xs]), torch.cat([m for _, m in xs]))
        rec.aux_loss.backward()
        out["gba_window_tokens"] = [float(sum(int(m.sum()) for _, m in xs))]
    out["gba_grad"] = gba.router.weight.grad.detach().clone()
    lf_m.train()
    for _ in range(STEPS):
        for i in range(MICRO):
            x, mask = batch(g)
            sync = lf_m.no_sync() if (world_size > 1 and i < MICRO - 1) else contextlib.nullcontext()
            with sync:
                y, _ = lf_m(x[rows], mask[rows])
                y.pow(2).mean().backward()
            out["tokens"].append(int(mask[rows].sum()))
        out["counts"].append(lf.router.load_counts.clone())
        lf.router.update_bias()
        out["bias"].append(lf.router.bias.clone())
    return out


def main(argv: list[str]) -> None:
    """``<init_file> <out_dir>``: fork the two ranks (each writes ``<out_dir>/rank<r>.pt``)."""
    from _gloo_ranks import fork_two_ranks

    import rmoe  # noqa: F401  (imported before the fork)

    init_file, out_dir = argv
    fork_two_ranks(run, init_file, out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
