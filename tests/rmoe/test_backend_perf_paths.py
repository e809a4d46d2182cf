"""Every code path of the torch dropless backend equals a naive per-token loop (forward and all
gradients, 1e-5): the blocked autograd Function (several block sizes, act saved or recomputed,
with and without its buffer workspace — here on at every size), the grouped_mm path, the plain
autograd path, impl="auto"; empty experts, all tokens on one expert, empty slots (−1), a token
with no expert, no assignment at all, every activation, no bias, fp32/fp64."""

from __future__ import annotations

import pytest
import torch

from rmoe import build_moe_layer
from rmoe import experts as experts_mod
from rmoe.experts import Experts, TorchDroplessBackend

ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True)
def _workspace_at_any_size(monkeypatch):
    monkeypatch.setattr(experts_mod._Workspace, "MIN_BYTES", 0)

IMPLS = [
    pytest.param({"impl": "blocked"}, id="blocked"),
    pytest.param({"impl": "blocked", "block_rows": 3}, id="blocked-rows3"),
    pytest.param({"impl": "blocked", "block_rows": 1}, id="blocked-rows1"),
    pytest.param({"impl": "blocked", "save_act": True}, id="blocked-save-act"),
    pytest.param({"impl": "grouped_mm"}, id="grouped_mm"),
    pytest.param({"impl": "autograd"}, id="autograd"),
    pytest.param({"impl": "auto"}, id="auto"),
    pytest.param({"impl": "blocked", "reuse_buffers": False}, id="blocked-no-reuse"),
]


def naive(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per token, per slot: ``w * act(x W1 + b1) W2 + b2`` of the slot's expert, summed."""
    act = experts.act
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros_like(x[t])
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            if e < 0:
                continue
            h = x[t] @ experts.w1[e]
            if experts.b1 is not None:
                h = h + experts.b1[e]
            y = act(h) @ experts.w2[e]
            if experts.b2 is not None:
                y = y + experts.b2[e]
            out = out + weights[t, j] * y
        rows.append(out)
    return torch.stack(rows)


def _experts(e=5, d=8, f=12, activation="gelu", bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ex = Experts(e, d, f, activation=activation, bias=bias).to(dtype)
    if bias:
        with torch.no_grad():
            ex.b1.normal_(std=0.5)
            ex.b2.normal_(std=0.5)
    return ex


def _check(ex: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, backend_kw: dict) -> None:
    g = torch.randn(x.shape[0], ex.d_model, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    params = [p for p in ex.parameters()]
    outs = []
    for fn in (lambda a, b: naive(ex, a, idx, b), lambda a, b: TorchDroplessBackend(**backend_kw)(ex, a, idx, b)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww)
        grads = torch.autograd.grad((y * g).sum(), [xx, ww] + params, allow_unused=True)
        outs.append((y, grads))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, atol=ATOL, rtol=RTOL)
    names = ["x", "weights"] + [n for n, _ in ex.named_parameters()]
    for name, a, b in zip(names, g1, g0):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"grad {name}: {m}")


def _routing(n, k, e, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=gen, dtype=dtype)
    return idx, w


@pytest.mark.parametrize("kw", IMPLS)
def test_random_routing_matches_naive(kw):
    ex = _experts()
    idx, w = _routing(23, 2, 5)
    x = torch.randn(23, 8)
    _check(ex, x, idx, w, kw)


@pytest.mark.parametrize("kw", IMPLS)
def test_empty_experts(kw):
    ex = _experts(e=6)
    idx, w = _routing(17, 2, 3)  # experts 3, 4, 5 get nothing
    idx = torch.where(idx == 1, torch.full_like(idx, 4), idx)  # expert 1 empty too, 4 used
    _check(ex, torch.randn(17, 8), idx, w, kw)


@pytest.mark.parametrize("kw", IMPLS)
def test_all_tokens_on_one_expert(kw):
    ex = _experts(e=4)
    idx = torch.full((19, 1), 2)
    w = torch.rand(19, 1)
    _check(ex, torch.randn(19, 8), idx, w, kw)


@pytest.mark.parametrize("kw", IMPLS)
def test_empty_slots_and_token_without_expert(kw):
    ex = _experts(e=5)
    idx, w = _routing(21, 3, 5, seed=3)
    idx[0, 1] = -1
    idx[4] = -1  # token 4 has no expert: output 0
    idx[7, 2] = -1
    idx[9, 0] = -1
    w = torch.where(idx >= 0, w, torch.zeros_like(w))
    _check(ex, torch.randn(21, 8), idx, w, kw)


@pytest.mark.parametrize("kw", IMPLS)
def test_no_assignment_at_all(kw):
    ex = _experts()
    idx = torch.full((6, 2), -1)
    w = torch.zeros(6, 2)
    x = torch.randn(6, 8)
    y = TorchDroplessBackend(**kw)(ex, x, idx, w)
    assert torch.equal(y, torch.zeros_like(x))


@pytest.mark.parametrize("kw", IMPLS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_activations(kw, activation):
    ex = _experts(activation=activation)
    idx, w = _routing(15, 2, 5, seed=5)
    _check(ex, torch.randn(15, 8), idx, w, kw)


@pytest.mark.parametrize("kw", IMPLS)
def test_no_bias(kw):
    ex = _experts(bias=False)
    idx, w = _routing(15, 2, 5, seed=6)
    _check(ex, torch.randn(15, 8), idx, w, kw)


@pytest.mark.parametrize("kw", IMPLS)
def test_float64(kw):
    ex = _experts(dtype=torch.float64)
    idx, w = _routing(13, 2, 5, seed=7, dtype=torch.float64)
    _check(ex, torch.randn(13, 8, dtype=torch.float64), idx, w, kw)


@pytest.mark.parametrize("kw", IMPLS)
def test_odd_widths_fall_back(kw):
    """grouped_mm needs 16-byte row strides; other widths must still be right (loop fallback)."""
    ex = _experts(d=6, f=7)
    idx, w = _routing(11, 2, 5, seed=8)
    _check(ex, torch.randn(11, 6), idx, w, kw)


def test_grouped_mm_path_is_taken():
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("torch without grouped_mm")
    ex = _experts()
    idx, w = _routing(9, 2, 5)
    calls = []
    orig = torch.nn.functional.grouped_mm

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)
    torch.nn.functional.grouped_mm = spy
    try:
        TorchDroplessBackend(impl="grouped_mm")(ex, torch.randn(9, 8), idx, w)
    finally:
        torch.nn.functional.grouped_mm = orig
    assert calls


@pytest.mark.parametrize("kw", IMPLS)
def test_weight_gradients_only_through_parameters(kw):
    """x and weights without grad (e.g. fusion weights are detached): parameters still get grads."""
    ex = _experts()
    idx, w = _routing(12, 2, 5, seed=9)
    x = torch.randn(12, 8)
    y = TorchDroplessBackend(**kw)(ex, x, idx, w)
    grads = torch.autograd.grad(y.sum(), list(ex.parameters()))
    y0 = naive(ex, x, idx, w)
    grads0 = torch.autograd.grad(y0.sum(), list(ex.parameters()))
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kw", IMPLS)
def test_layer_with_mask_matches_naive(kw):
    """The whole layer (router + backend, padding mask) against the naive loop on its routing."""
    torch.manual_seed(0)
    layer = build_moe_layer(8, 12, router="topk", initial_experts=4, top_k=2)
    layer.backend = TorchDroplessBackend(**kw)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y, rec = layer(x, mask=mask)
    y_ref = torch.zeros(10, 8)
    y_ref[mask.reshape(-1)] = naive(layer.experts, x.reshape(-1, 8)[mask.reshape(-1)], rec.expert_indices,
                                    rec.expert_weights)
    torch.testing.assert_close(y.reshape(-1, 8), y_ref, atol=ATOL, rtol=RTOL)


def test_invalid_options():
    with pytest.raises(ValueError, match="impl"):
        TorchDroplessBackend(impl="fast")
    with pytest.raises(ValueError, match="block_rows"):
        TorchDroplessBackend(block_rows=0)
