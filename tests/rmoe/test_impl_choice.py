"""``impl="auto"`` of the torch backend: which implementation it runs in each measured regime, that
the result equals a per-token reference whichever it runs, and that the blocked path's buffer
workspace never hands out memory that is still in use.

The regimes are the ones measured with ``python -m bench.impl_grid`` (d=384, d_ff=1536, 1 thread):
with E=8, grouped_mm was ahead at 1,024 (token, expert) assignments, level at 2,048 (blocked is
chosen: less memory) and behind from 4,096 up; with E=64 blocked was ahead at every size, and E=16's
weight gradient (36 MiB) is past the size where every step page-faults it afresh. The reference
below is written from the layer's definition, ``out[t] = sum_j w[t, j] * (act(x[t] W1[e] + b1[e]) W2[e] + b2[e])`` with
``e = indices[t, j]``, one token and one slot at a time (weights taken through ``unbind`` views,
so autograd gives one gradient per expert).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rmoe import experts as experts_mod
from rmoe.experts import Experts, TorchDroplessBackend, choose_impl

ATOL = RTOL = 1e-5
D, D_FF = 384, 1536  # the bench's sizes


def reference(ex: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w1, w2 = ex.w1.unbind(0), ex.w2.unbind(0)
    b1 = ex.b1.unbind(0) if ex.b1 is not None else None
    b2 = ex.b2.unbind(0) if ex.b2 is not None else None
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros_like(x[t])
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            if e < 0:
                continue
            h = x[t] @ w1[e] + (b1[e] if b1 is not None else 0)
            y = F.gelu(h) @ w2[e] + (b2[e] if b2 is not None else 0)
            out = out + weights[t, j] * y
        rows.append(out)
    return torch.stack(rows)


def _experts(e: int, d: int, f: int, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    ex = Experts(e, d, f, activation="gelu")
    with torch.no_grad():
        ex.b1.normal_(std=0.5)
        ex.b2.normal_(std=0.5)
    return ex


def _routing(n: int, k: int, e: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    idx[1, 0] = -1  # an empty slot
    w = torch.rand(n, k, generator=gen)
    return idx, w


def _grads(fn, ex: Experts, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(xx, ww)
    return y, torch.autograd.grad((y * g).sum(), [xx, ww, *ex.parameters()])


def _check_against_reference(backend: TorchDroplessBackend, ex: Experts, n: int, k: int, seed: int = 0,
                             tol: float = ATOL) -> None:
    idx, w = _routing(n, k, ex.max_experts, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, ex.d_model, generator=gen)
    g = torch.randn(n, ex.d_model, generator=gen)
    y0, g0 = _grads(lambda a, b: reference(ex, a, idx, b), ex, x, w, g)
    y1, g1 = _grads(lambda a, b: backend(ex, a, idx, b), ex, x, w, g)
    torch.testing.assert_close(y1, y0, atol=tol, rtol=tol)
    names = ["x", "weights"] + [nm for nm, _ in ex.named_parameters()]
    for name, a, b in zip(names, g1, g0):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, name=name: f"grad {name}: {m}")


# --- the rule, at the sizes it was measured at ---------------------------------------------------
@pytest.mark.parametrize(("e", "k", "n", "want"), [
    (8, 1, 256, "grouped_mm"), (8, 1, 512, "grouped_mm"), (8, 1, 1024, "grouped_mm"),
    (8, 2, 256, "grouped_mm"), (8, 2, 512, "grouped_mm"), (8, 8, 128, "grouped_mm"),
    (8, 1, 2048, "blocked"), (8, 2, 1024, "blocked"), (8, 8, 256, "blocked"),
    (8, 1, 4096, "blocked"), (8, 2, 2048, "blocked"), (8, 2, 4096, "blocked"),
    (8, 8, 512, "blocked"), (8, 8, 4096, "blocked"),
    (16, 1, 256, "blocked"), (16, 2, 1024, "blocked"), (16, 8, 4096, "blocked"),
    (64, 1, 256, "blocked"), (64, 8, 2048, "blocked"), (64, 2, 4096, "blocked"),
])
def test_choose_impl_in_the_measured_regimes(e, k, n, want):
    assert choose_impl(k * n, e, D, D_FF) == want


def test_choose_impl_without_grouped_mm_or_in_float64():
    assert choose_impl(2048, 8, D, D_FF, grouped_mm_ok=False) == "blocked"
    # float64 doubles both buffers: the E=8 weight gradient (37.7 MB) is over the limit
    assert choose_impl(512, 8, D, D_FF, itemsize=8) == "blocked"


# --- auto runs the chosen implementation and matches the reference ------------------------------
@pytest.mark.parametrize(("e", "want"), [(8, "grouped_mm"), (16, "blocked")])
def test_auto_at_the_bench_sizes_matches_reference(e, want):
    """d=384, d_ff=1536 as measured: E=8 runs grouped_mm, E=16 blocked; both equal the reference."""
    if want == "grouped_mm" and not hasattr(F, "grouped_mm"):
        pytest.skip("torch without grouped_mm")
    backend = TorchDroplessBackend()
    _check_against_reference(backend, _experts(e, D, D_FF), n=24, k=2, tol=1e-4)
    assert backend.last_impl == want


@pytest.mark.parametrize(("e", "n", "want"), [
    (4, 10, "grouped_mm"),  # 19 assignments, small weights
    (4, 40, "blocked"),     # 79 assignments: the activation is over the limit
    (6, 10, "blocked"),     # the weight gradient is over the limit
])
def test_auto_in_each_regime_matches_reference(monkeypatch, e, n, want):
    """The same rule at small sizes (limits lowered to 2 KiB each: weight gradient E*8*12*4 bytes,
    activation assignments*12*4 bytes), so every regime is cheap to check against the reference."""
    if want == "grouped_mm" and not hasattr(F, "grouped_mm"):
        pytest.skip("torch without grouped_mm")
    monkeypatch.setattr(experts_mod, "AUTO_GROUPED_MM_MAX_WEIGHT_BYTES", 2048)
    monkeypatch.setattr(experts_mod, "AUTO_GROUPED_MM_MAX_ACT_BYTES", 2048)
    monkeypatch.setattr(experts_mod._Workspace, "MIN_BYTES", 0)  # the workspace on, at any size
    backend = TorchDroplessBackend()
    _check_against_reference(backend, _experts(e, 8, 12), n=n, k=2)
    assert backend.last_impl == want


def test_explicit_impls_are_kept():
    ex = _experts(4, 8, 12)
    idx, w = _routing(6, 2, 4)
    for impl in ("blocked", "grouped_mm", "autograd"):
        b = TorchDroplessBackend(impl=impl)
        b(ex, torch.randn(6, 8), idx, w)
        assert b.last_impl == (impl if impl != "grouped_mm" or hasattr(F, "grouped_mm") else "blocked")
    b = TorchDroplessBackend(impl="grouped_mm")
    b(_experts(4, 6, 7), torch.randn(6, 6), idx, w)  # widths grouped_mm cannot take: blocked
    assert b.last_impl == "blocked"


# --- the blocked path's workspace ----------------------------------------------------------------
@pytest.fixture
def small_workspace(monkeypatch):
    monkeypatch.setattr(experts_mod._Workspace, "MIN_BYTES", 0)


def _step(layer_ex, backend, x, idx, w, g):
    y = backend(layer_ex, x, idx, w)
    (y * g).sum().backward()
    return y


def test_workspace_reuses_weight_gradient_memory_across_steps(small_workspace):
    ex = _experts(4, 8, 12)
    backend = TorchDroplessBackend(impl="blocked")
    idx, w = _routing(9, 2, 4)
    x, g = torch.randn(9, 8), torch.randn(9, 8)
    _step(ex, backend, x, idx, w, g)
    ptr = ex.w1.grad.data_ptr()
    first = [p.grad.clone() for p in ex.parameters()]
    for p in ex.parameters():
        p.grad = None
    _step(ex, backend, x, idx, w, g)
    assert ex.w1.grad.data_ptr() == ptr  # the same memory again, no new allocation
    for p, want in zip(ex.parameters(), first):
        torch.testing.assert_close(p.grad, want)


def test_workspace_never_overwrites_a_live_gradient(small_workspace):
    """Gradient accumulation (grads not cleared) and a gradient kept by the user both stay intact."""
    ex = _experts(4, 8, 12)
    backend = TorchDroplessBackend(impl="blocked")
    idx, w = _routing(9, 2, 4)
    x1, x2, g = torch.randn(9, 8), torch.randn(9, 8), torch.randn(9, 8)
    want = []
    for x in (x1, x2):
        y = reference(ex, x, idx, w)
        want.append(torch.autograd.grad((y * g).sum(), list(ex.parameters())))
    _step(ex, backend, x1, idx, w, g)
    _step(ex, backend, x2, idx, w, g)  # accumulates into the existing .grad
    for p, a, b in zip(ex.parameters(), *want):
        torch.testing.assert_close(p.grad, a + b, atol=ATOL, rtol=RTOL)
    kept = ex.w1.grad
    kept_value = kept.clone()
    for p in ex.parameters():
        p.grad = None
    _step(ex, backend, x2, idx, w, g)
    assert ex.w1.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, kept_value)


def test_workspace_two_forwards_before_backward(small_workspace):
    """Two graphs alive at once (their saved activations must not share memory)."""
    ex = _experts(4, 8, 12)
    backend = TorchDroplessBackend(impl="blocked")
    idx, w = _routing(9, 2, 4)
    x1, x2 = torch.randn(9, 8, requires_grad=True), torch.randn(9, 8, requires_grad=True)
    y1, y2 = backend(ex, x1, idx, w), backend(ex, x2, idx, w)
    g1 = torch.autograd.grad(y1.sum(), [x1, ex.w1])
    g2 = torch.autograd.grad(y2.sum(), [x2, ex.w1])
    r1, r2 = reference(ex, x1, idx, w), reference(ex, x2, idx, w)
    torch.testing.assert_close(y1, r1, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y2, r2, atol=ATOL, rtol=RTOL)
    for got, r, x in ((g1, r1, x1), (g2, r2, x2)):
        for a, b in zip(got, torch.autograd.grad(r.sum(), [x, ex.w1])):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_workspace_copies_and_release(small_workspace):
    ex = _experts(4, 8, 12)
    backend = TorchDroplessBackend(impl="blocked")
    idx, w = _routing(9, 2, 4)
    _step(ex, backend, torch.randn(9, 8), idx, w, torch.randn(9, 8))
    assert backend._ws.storages
    assert copy.deepcopy(backend)._ws.storages == {}
    backend.release_buffers()
    assert backend._ws.storages == {}
    off = TorchDroplessBackend(impl="blocked", reuse_buffers=False)
    _step(ex, off, torch.randn(9, 8), idx, w, torch.randn(9, 8))
    assert off._ws.storages == {}
