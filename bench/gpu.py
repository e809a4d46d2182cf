"""GPU bench: one MoE layer's forward+backward against the dense floor, per expert implementation.

At each ``(E, k, N)`` of :data:`CONFIGS` (``d_model``, ``d_ff`` as given), on the same ``N`` random
tokens and one top-k layer's weights, under ``torch.autocast("cuda", bfloat16)`` with fp32
parameters (what ``trainer.precision=bf16-mixed`` runs):

* ``floor``: ``k`` dense FFNs (``Linear(d, d_ff)``, GELU, ``Linear(d_ff, d)``) on the same tokens,
  summed — the same FLOPs as the layer's experts, with no routing;
* ``torch blocked`` / ``torch grouped_mm``: our layer on :class:`rmoe.experts.TorchDroplessBackend`
  with that ``impl`` (the ``ran`` column says what ran: an impl that cannot run falls back);
* ``megablocks``: our layer on :class:`rmoe.megablocks.MegaBlocksBackend` (MegaBlocks' ops +
  grouped_gemm; needs ``make megablocks`` or the device kit's build);
* ``hf mixtral grouped_mm``: transformers' ``MixtralSparseMoeBlock`` with
  ``experts_implementation="grouped_mm"``, our router and expert weights copied in, gated experts of
  intermediate ``2 d_ff / 3`` rounded down to a multiple of 8 (FLOPs matched to within 1%;
  ``bench.__main__.hf_mixtral_block``).

Times: CUDA events around each step, median of ``--reps`` interleaved rounds after warm-up; ``x floor``
is the median ratio to the floor. ``syncs``: host synchronisations in one step, counted as the
warnings of ``torch.cuda.set_sync_debug_mode("warn")``. ``peak MiB``: ``max_memory_allocated`` over
one step. ``--dry`` (or no CUDA): one tiny configuration on CPU in fp32, wall-clock time, no sync
count, the CUDA-only rows reported as skipped — it checks the script runs.

    python -m bench.gpu [--dry] [--d 1024 --d-ff 4096] [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from bench.__main__ import DenseFloor, _zero, hf_mixtral_block
from rmoe import build_moe_layer
from rmoe.experts import TorchDroplessBackend
from rmoe.megablocks import MegaBlocksBackend

CONFIGS = ((8, 2, 4096), (8, 2, 16384), (64, 8, 16384))
DRY_CONFIGS = ((4, 2, 64),)


def _count_syncs(fn: Callable[[], None]) -> int:
    """Host synchronisations ``fn`` makes (CUDA), as counted by the sync debug mode's warnings."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _times(fns: dict[str, Callable[[], None]], reps: int, warmup: int, cuda: bool) -> dict[str, list[float]]:
    """Seconds of each of ``reps`` interleaved rounds per fn (CUDA events on CUDA)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    names, out = list(fns), {n: [] for n in fns}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                stop.record()
                stop.synchronize()
                out[n].append(start.elapsed_time(stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fns[n]()
                out[n].append(time.perf_counter() - t0)
    return out


def bench_config(e: int, k: int, n: int, d: int, d_ff: int, reps: int, cuda: bool) -> list[tuple]:
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    x0, g = torch.randn(n, d, device=dev), torch.randn(n, d, device=dev)
    floor = DenseFloor(k, d, d_ff).to(dev)
    moe = build_moe_layer(d, d_ff, router="topk", initial_experts=e, top_k=k).to(dev)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def layer_fn(mod: nn.Module, call: Callable) -> Callable[[], None]:
        def run():
            _zero(mod)
            x = x0.clone().requires_grad_()
            with autocast():
                y = call(x)
            y.float().backward(g)
        return run

    fns: dict[str, Callable[[], None]] = {"floor": layer_fn(floor, floor)}
    backends: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, impl in (("torch blocked", "blocked"), ("torch grouped_mm", "grouped_mm")):
        backends[name] = TorchDroplessBackend(impl=impl)
    if cuda:
        try:
            MegaBlocksBackend.check_available()
            backends["megablocks"] = MegaBlocksBackend()
        except RuntimeError as exc:
            skipped["megablocks"] = str(exc).split(":")[0]
    else:
        skipped["megablocks"] = "no CUDA"
    for name, b in backends.items():
        fns[name] = layer_fn(moe, lambda x, b=b: (setattr(moe, "backend", b), moe(x)[0])[1])
    try:
        blk = hf_mixtral_block(moe, 2 * d_ff // 3 // 8 * 8, "grouped_mm").to(dev)  # rows: 16-byte multiples
        fns["hf mixtral grouped_mm"] = layer_fn(blk, lambda x: blk(x.view(1, n, d)).view(n, d))
    except Exception as exc:  # noqa: BLE001 - an older transformers: reported, the rest runs
        skipped["hf mixtral grouped_mm"] = f"{type(exc).__name__}: {exc}"[:80]

    # one checked step each: an impl that fails is reported and left out of the timing
    failed: dict[str, str] = {}
    for name in list(fns):
        try:
            fns[name]()
        except Exception as exc:  # noqa: BLE001
            failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:100]
            del fns[name]
    syncs, peaks = {}, {}
    if cuda:
        for name, fn in fns.items():
            syncs[name] = _count_syncs(fn)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    times = _times(fns, reps, warmup=2 if cuda else 0, cuda=cuda) if "floor" in fns else {}  # + the checked step
    rows = []
    for name in ("floor", *backends, "hf mixtral grouped_mm", *skipped):
        if name in times:
            ratio = statistics.median(a / b for a, b in zip(times[name], times["floor"]))
            ran = backends[name].last_impl if isinstance(backends.get(name), TorchDroplessBackend) else ""
            rows.append((name, statistics.median(times[name]) * 1e3, ratio, syncs.get(name), peaks.get(name), ran))
        elif name in failed or name in skipped:
            rows.append((name, None, None, None, None, ("FAILED " + failed[name]) if name in failed
                         else "skipped: " + skipped[name]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="one tiny configuration on CPU (checks the script runs)")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry
    configs, d, d_ff = (CONFIGS, args.d, args.d_ff) if cuda else (DRY_CONFIGS, 32, 64)
    reps = args.reps if cuda else min(args.reps, 2)
    dev = torch.cuda.get_device_name(0) if cuda else "CPU (dry run: CUDA-only rows skipped)"
    print(f"bench.gpu on {dev}; torch {torch.__version__}; d={d} d_ff={d_ff}; "
          f"{'bf16 autocast, fp32 params, CUDA events' if cuda else 'fp32, wall clock'}; median of {reps}")
    for e, k, n in configs:
        print(f"\nE={e} k={k} N={n}")
        print(f"  {'impl':<24}{'ms':>9}{'x floor':>9}{'syncs':>7}{'peak MiB':>10}  ran")
        for name, ms, ratio, syncs, peak, ran in bench_config(e, k, n, d, d_ff, reps, cuda):
            def f(v, fmt):
                return format(v, fmt) if v is not None else format("-", ">" + fmt.rstrip("dfg").split(".")[0])
            print(f"  {name:<24}{f(ms, '9.2f')}{f(ratio, '9.2f')}{f(syncs, '7d')}{f(peak, '10.0f')}  {ran}")
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
