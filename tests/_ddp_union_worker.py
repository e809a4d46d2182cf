"""Helper of ``tests/test_ddp_union.py``: the same MoE layers and batches, run either as one rank of a
2-process gloo group (``python tests/_ddp_union_worker.py <init_file> <out_dir>`` forks both; each rank
gets its half of every batch) or, through :func:`run` with ``world_size=1``, as one process over the union.

Nothing here trains: weights only change where DynMoE's ``adapt()`` switches a slot on, so every state
compared depends on the initial weights, the batches and rmoe's reductions over ranks only:

* Stateful Fusion ``m`` of every layer after every step (``rmoe/fusion.py``; agg ``sum`` and ``mean``,
  top-any and top-k routers), with ranks holding different numbers of real tokens (padding masks);
* DynMoE's pool (``rmoe/routing.py``): the recorded window of each rank, then ``adapt()``'s removed /
  added slots, the mask and the added slot's ``W`` column. On rank 1 expert 2 of each top-any layer
  never gets a token in the first window (it does on rank 0), and both ranks have unrouted tokens;
* the stability callback's reductions (``callbacks/stability.py``, the real callback with a real
  Lightning ``DDPStrategy`` for its ``strategy.reduce``): the per-step token counts it computes its load
  metrics from, its load history, and the per-domain validation loads.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

D, T, B = 16, 6, 4  # d_model, tokens per sequence, sequences per rank and step
STEPS = 3
WINDOWS = ((0, 1), (2,))  # DynMoE recording windows (steps); adapt() after the last step of each
NUM_VAL_DOMAINS = 2
LAYERS = {  # name -> build_moe_layer kwargs; fusion ema_decay 0.5 so every step's update weighs
    "topany_sum": dict(router="topany", initial_experts=3, max_experts=5, fusion=dict(ema_decay=0.5, agg="sum")),
    "topany_mean": dict(router="topany", initial_experts=3, max_experts=5, fusion=dict(ema_decay=0.5, agg="mean")),
    "topk_sum": dict(router="topk", initial_experts=4, top_k=2, fusion=dict(ema_decay=0.5, agg="sum")),
    "topk_mean": dict(router="topk", initial_experts=4, top_k=2, fusion=dict(ema_decay=0.5, agg="mean")),
}
WINDOW_BUFFERS = ("routed_count", "unrouted_sum", "unrouted_count")
SKIP_ON_RANK1 = 2  # top-any expert that rank 1's tokens never activate


def build_layers() -> dict:
    import rmoe

    torch.manual_seed(1234)
    return {name: rmoe.build_moe_layer(D, 32, **kw) for name, kw in LAYERS.items()}


def make_batches(layers: dict) -> dict:
    """The union batches: ``{"train": [step] -> {layer: (x [2B, T, D], mask [2B, T])}, "val": ...}``.
    Rows ``r*B .. (r+1)*B - 1`` are rank ``r``'s. Rank 0's sequences are longer than rank 1's (it has
    more real tokens), and rank 1's tokens have a negative cosine with column ``SKIP_ON_RANK1`` of
    every top-any router, so that expert gets tokens from rank 0 only."""
    g = torch.Generator().manual_seed(99)

    def batch(layer):
        x = torch.randn(2 * B, T, D, generator=g)
        lengths = torch.cat([torch.randint(4, T + 1, (B,), generator=g), torch.randint(1, 4, (B,), generator=g)])
        mask = torch.arange(T)[None, :] < lengths[:, None]
        if layer.router.family == "topany":
            w = torch.nn.functional.normalize(layer.router.weight.detach()[:, SKIP_ON_RANK1], dim=0)
            x1 = x[B:]
            x[B:] = x1 - (torch.relu(x1 @ w) + 0.2)[..., None] * w
        return x, mask

    train = [{n: batch(layer) for n, layer in layers.items()} for _ in range(STEPS)]
    val = [{n: batch(layer) for n, layer in layers.items()} for _ in range(NUM_VAL_DOMAINS)]
    return {"train": train, "val": val}


class _Trainer:
    """What ``RoutingStabilityCallback`` reads from a Lightning ``Trainer``; the reduction over ranks is
    Lightning's own ``DDPStrategy.reduce`` (the strategy ``trainer=ddp`` uses)."""

    def __init__(self, world_size: int, rank: int):
        from lightning.pytorch.strategies import DDPStrategy

        self.world_size, self.global_rank, self.is_global_zero = world_size, rank, rank == 0
        self.strategy = DDPStrategy() if world_size > 1 else None
        self.callbacks: list = []
        self.sanity_checking = False
        self.log_every_n_steps = 1
        self.global_step = 0


class _Module(torch.nn.Module):
    """Holds the MoE layers (found by ``find_moe_layers``) and records what the callback logs."""

    def __init__(self, layers: dict):
        super().__init__()
        self.moes = torch.nn.ModuleDict(layers)
        self.lambda_aux = 0.0
        self._trainer = None
        self.logged: list = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def log(self, key, value, **kw):
        self.logged.append((key, float(value)))


def run(rank: int, world_size: int) -> dict:
    """Run every step on this rank's share (the whole union batch when ``world_size == 1``) and return
    the states to compare. Call after ``init_process_group`` when ``world_size > 1``."""
    from callbacks.stability import RoutingStabilityCallback
    from rmoe import metrics as M

    layers = build_layers()
    data = make_batches(layers)
    rows = slice(0, 2 * B) if world_size == 1 else slice(rank * B, (rank + 1) * B)
    module, trainer = _Module(layers), _Trainer(world_size, rank)
    cb = RoutingStabilityCallback(log_every_n_steps=1, plots=False)
    names = [f"moe{i}" for i in range(len(layers))]  # the callback's layer names, in module order
    pairs = list(zip(names, layers.values()))
    topany = {n: layer.router for n, layer in layers.items() if layer.router.family == "topany"}

    counts_seen: list = []  # the token counts the callback computes its load metrics from
    record_metrics = M.record_metrics

    def spy(rec, top_k):
        counts_seen.append(rec.tokens_per_expert.detach().clone())
        return record_metrics(rec, top_k)

    out = {"world_size": world_size, "rank": rank, "m": [], "counts": [], "tokens": [], "windows": [],
           "adapt": []}
    M.record_metrics = spy
    try:
        module.train()
        for step in range(STEPS):
            if any(step == w[0] for w in WINDOWS):
                for r in topany.values():
                    r.start_recording()
            tokens = {}
            for name, layer in layers.items():
                x, mask = data["train"][step][name]
                layer(x[rows], mask[rows])
                tokens[name] = int(mask[rows].sum())
            trainer.global_step = step + 1
            counts_seen.clear()
            cb._log_stream(trainer, module, pairs, step + 1)
            out["counts"].append(dict(zip(layers, counts_seen)))
            out["tokens"].append(tokens)
            out["m"].append({n: layer.fusion.m.clone() for n, layer in layers.items()})
            if any(step == w[-1] for w in WINDOWS):
                out["windows"].append({n: {k: getattr(r, k).clone() for k in WINDOW_BUFFERS}
                                       for n, r in topany.items()})
                pool = {}
                for n, r in topany.items():
                    pool[n] = r.adapt()
                    pool[n].update(mask=r.expert_mask.clone(), weight=r.weight.detach().clone(),
                                   thresholds=r.thresholds.detach().clone())
                out["adapt"].append(pool)
        module.eval()
        cb.on_validation_epoch_start(trainer, module)
        with torch.no_grad():
            for d, batch in enumerate(data["val"]):
                for name, layer in layers.items():
                    x, mask = batch[name]
                    layer(x[rows], mask[rows])
                cb.on_validation_batch_end(trainer, module, None, None, 0, dataloader_idx=d)
        cb.on_validation_epoch_end(trainer, module)
    finally:
        M.record_metrics = record_metrics
    out["history"] = cb.history
    out["names"] = dict(zip(names, layers))
    return out


def main(argv: list[str]) -> None:
    """``<init_file> <out_dir>``: import once, then fork the two ranks (each writes ``<out_dir>/rank<r>.pt``)."""
    import lightning.pytorch.strategies  # noqa: F401
    from _gloo_ranks import fork_two_ranks

    import callbacks.stability  # noqa: F401  (imported before the fork: the ranks share the import time)

    init_file, out_dir = argv
    fork_two_ranks(run, init_file, out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
