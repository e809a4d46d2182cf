"""Expert dropout inside the MoE experts (inverted dropout on the hidden units, training only).

``pre_act`` (DynMoE/RMoE GLUE experts): ``y = act(drop(x w1 + b1)) w2 + b2``;
``post_act`` (GMoE vision experts): ``y = drop(act(x w1 + b1)) w2 + b2``;
``drop(u) = u * keep / (1 - p)``. Every expectation here is computed independently of the code
under test: a per-token, per-slot loop with plain autograd on cloned parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rmoe import build_moe_layer
from rmoe.experts import Experts, TorchDroplessBackend

ATOL = RTOL = 1e-5

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
POSITIONS = ["pre_act", "post_act"]
ACTS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"),
    "relu": torch.relu,
    "silu": F.silu,
}


def reference(params: dict, activation: str, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
              keep: torch.Tensor | None, p: float, position: str) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * (hid @ w2[e] + b2[e])`` with ``e = idx[t, j]`` (slots ``-1``
    skipped), ``h = x[t] @ w1[e] + b1[e]``, ``hid = act(h * m)`` (pre_act) or ``act(h) * m``
    (post_act), ``m = keep[t, j] / (1 - p)``; ``hid = act(h)`` when ``keep is None``."""
    act = ACTS[activation]
    rows = []
    for t in range(x.shape[0]):
        out = torch.zeros_like(x[t])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < 0:
                continue
            h = x[t] @ params["w1"][e]
            if "b1" in params:
                h = h + params["b1"][e]
            if keep is None:
                a = act(h)
            else:
                m = keep[t, j].to(x.dtype) / (1.0 - p)
                a = act(h * m) if position == "pre_act" else act(h) * m
            y = a @ params["w2"][e]
            if "b2" in params:
                y = y + params["b2"][e]
            out = out + w[t, j] * y
        rows.append(out)
    return torch.stack(rows)


def _experts(p=0.3, position="pre_act", e=5, d=8, f=12, activation="gelu", bias=True, dtype=torch.float32,
             seed=0) -> Experts:
    torch.manual_seed(seed)
    ex = Experts(e, d, f, activation=activation, bias=bias, dropout=p, dropout_position=position).to(dtype)
    if bias:
        with torch.no_grad():
            ex.b1.normal_(std=0.5)
            ex.b2.normal_(std=0.5)
    return ex.train()


def _routing(n, k, e, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=gen, dtype=dtype)
    return idx, w


def _mask(n, k, f, p, seed=11):
    return torch.rand(n, k, f, generator=torch.Generator().manual_seed(seed)) >= p


def _compare(ex: Experts, x, idx, w, keep_ref, run, x_grad=True) -> None:
    """``run(xx, ww)`` (the code under test) against :func:`reference` with mask ``keep_ref``:
    output and the gradients of ``sum(y * g)`` w.r.t. x, weights, w1, b1, w2, b2."""
    g = torch.randn(x.shape[0], ex.d_model, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in ex.named_parameters()]
    params = {n: q.detach().clone().requires_grad_() for n, q in ex.named_parameters()}
    xr, wr = x.clone().requires_grad_(x_grad), w.clone().requires_grad_()
    y0 = reference(params, ex.activation, xr, idx, wr, keep_ref, ex.dropout, ex.dropout_position)
    leaves0 = ([xr] if x_grad else []) + [wr] + [params[n] for n in names]
    g0 = torch.autograd.grad((y0 * g).sum(), leaves0)

    xx, ww = x.clone().requires_grad_(x_grad), w.clone().requires_grad_()
    y1 = run(xx, ww)
    leaves1 = ([xx] if x_grad else []) + [ww] + list(ex.parameters())
    g1 = torch.autograd.grad((y1 * g).sum(), leaves1, allow_unused=True)

    torch.testing.assert_close(y1, y0, atol=ATOL, rtol=RTOL)
    labels = (["x"] if x_grad else []) + ["weights"] + names
    for name, a, b in zip(labels, g1, g0):
        a = torch.zeros_like(b) if a is None else a
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"grad {name}: {m}")


# --- a fixed (explicit) mask: forward and every gradient equal the formula --------------------------

@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kw", IMPLS)
def test_fixed_mask_matches_reference(kw, position):
    ex = _experts(p=0.3, position=position)
    idx, w = _routing(23, 2, 5)
    x = torch.randn(23, 8)
    keep = _mask(23, 2, 12, 0.3)
    assert 0 < int(keep.sum()) < keep.numel()
    _compare(ex, x, idx, w, keep, lambda a, b: TorchDroplessBackend(**kw)(ex, a, idx, b, dropout_mask=keep))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("kw", IMPLS)
def test_fixed_mask_activations(kw, activation, position):
    """The hand-written backward uses a different act' kernel per activation."""
    ex = _experts(p=0.5, position=position, activation=activation)
    idx, w = _routing(15, 2, 5, seed=5)
    keep = _mask(15, 2, 12, 0.5, seed=3)
    _compare(ex, torch.randn(15, 8), idx, w, keep,
             lambda a, b: TorchDroplessBackend(**kw)(ex, a, idx, b, dropout_mask=keep))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kw", IMPLS)
def test_fixed_mask_empty_slots_experts_no_bias_fp64(kw, position):
    """Empty slots (−1), a token without expert, unused experts, no bias, float64."""
    ex = _experts(p=0.2, position=position, e=6, bias=False, dtype=torch.float64)
    idx, w = _routing(21, 3, 4, seed=3, dtype=torch.float64)  # experts 4, 5 never used
    idx[0, 1] = -1
    idx[4] = -1
    idx[9, 0] = -1
    w = torch.where(idx >= 0, w, torch.zeros_like(w))
    keep = _mask(21, 3, 12, 0.2, seed=4)
    _compare(ex, torch.randn(21, 8, dtype=torch.float64), idx, w, keep,
             lambda a, b: TorchDroplessBackend(**kw)(ex, a, idx, b, dropout_mask=keep))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kw", IMPLS)
def test_fixed_mask_input_without_grad(kw, position):
    """Only the parameters (and weights) need gradients."""
    ex = _experts(p=0.4, position=position)
    idx, w = _routing(12, 2, 5, seed=9)
    keep = _mask(12, 2, 12, 0.4, seed=6)
    _compare(ex, torch.randn(12, 8), idx, w, keep,
             lambda a, b: TorchDroplessBackend(**kw)(ex, a, idx, b, dropout_mask=keep), x_grad=False)


@pytest.mark.parametrize("position", POSITIONS)
def test_expert_forward_fixed_mask(position):
    ex = _experts(p=0.25, position=position)
    x = torch.randn(7, 8)
    keep = _mask(7, 1, 12, 0.25, seed=8)
    idx = torch.full((7, 1), 3)
    w = torch.ones(7, 1)
    _compare(ex, x, idx, w, keep, lambda a, b: ex.expert_forward(3, a, keep=keep[:, 0]) * b)


# --- the random draw: one mask [m, d_ff] for the expert-sorted rows, right after the sort ------------

def _replicated_keep(idx: torch.Tensor, f: int, p: float, seed: int) -> torch.Tensor:
    """The documented draw, rebuilt here: seed, one ``bernoulli(1 - p)`` bool draw of ``[m, f]``
    for the valid slots ordered by (expert, flat slot position), scattered to ``[N, K, f]``."""
    flat = idx.reshape(-1).tolist()
    order = sorted((s for s in range(len(flat)) if flat[s] >= 0), key=lambda s: (flat[s], s))
    torch.manual_seed(seed)
    drawn = torch.empty(len(order), f, dtype=torch.bool).bernoulli_(1.0 - p)
    keep = torch.zeros(*idx.shape, f, dtype=torch.bool)
    keep.view(-1, f)[torch.tensor(order)] = drawn
    return keep


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kw", IMPLS)
def test_random_draw_matches_reference(kw, position):
    """The training path (no explicit mask): same mask in every impl for the same seed, and the
    output and gradients equal the formula with that mask."""
    ex = _experts(p=0.5, position=position)
    idx, w = _routing(19, 2, 5, seed=2)
    idx[3, 1] = -1
    keep = _replicated_keep(idx, 12, 0.5, seed=123)

    def run(a, b):
        torch.manual_seed(123)
        return TorchDroplessBackend(**kw)(ex, a, idx, b)
    _compare(ex, torch.randn(19, 8), idx, w, keep, run)


# --- eval mode and p == 0: the plain FFN, exactly, and no mask drawn ---------------------------------

@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kw", IMPLS)
def test_eval_and_p0_equal_no_dropout_exactly(kw, position):
    plain = _experts(p=0.0, position=position).eval()
    idx, w = _routing(17, 2, 5, seed=1)
    x = torch.randn(17, 8)
    backend = TorchDroplessBackend(**kw)
    y_plain = backend(plain, x, idx, w)
    torch.testing.assert_close(y_plain, reference(dict(plain.named_parameters()), "gelu", x, idx, w, None, 0.0,
                                                  position), atol=ATOL, rtol=RTOL)
    for ex in (_experts(p=0.5, position=position).eval(), _experts(p=0.0, position=position).train()):
        rng = torch.get_rng_state()
        y = backend(ex, x, idx, w)
        assert torch.equal(torch.get_rng_state(), rng), "a mask was drawn although dropout is off"
        assert torch.equal(y, y_plain)
    ex = _experts(p=0.5, position=position).train()
    assert not torch.equal(backend(ex, x, idx, w), y_plain)


def test_explicit_mask_checks():
    idx, w = _routing(5, 2, 5)
    x = torch.randn(5, 8)
    ok = _mask(5, 2, 12, 0.5)
    with pytest.raises(ValueError, match="not active"):
        TorchDroplessBackend()(_experts(p=0.5).eval(), x, idx, w, dropout_mask=ok)
    with pytest.raises(ValueError, match="not active"):
        TorchDroplessBackend()(_experts(p=0.0), x, idx, w, dropout_mask=ok)
    with pytest.raises(ValueError, match="shape"):
        TorchDroplessBackend()(_experts(p=0.5), x, idx, w, dropout_mask=ok[:, :, :6])
    with pytest.raises(ValueError, match="bool"):
        TorchDroplessBackend()(_experts(p=0.5), x, idx, w, dropout_mask=ok.float())
    with pytest.raises(ValueError, match="dropout="):
        Experts(2, 8, 12, dropout=1.0)
    with pytest.raises(ValueError, match="dropout_position"):
        Experts(2, 8, 12, dropout=0.1, dropout_position="pre")


# --- statistics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kw", IMPLS)
def test_half_the_hidden_units_are_dropped(kw, position):
    """``w1 = 0, b1 = c > 0, act = relu, w2 = I, b2 = 0``: each output unit is one hidden unit,
    ``0`` when dropped and ``c / (1 - p) = 2c`` when kept (both positions), ``c`` in eval."""
    n, f, c = 256, 16, 0.7
    ex = _experts(p=0.5, position=position, e=2, d=f, f=f, activation="relu")
    with torch.no_grad():
        ex.w1.zero_()
        ex.b1.fill_(c)
        ex.w2.copy_(torch.eye(f).expand_as(ex.w2))
        ex.b2.zero_()
    idx = torch.randint(0, 2, (n, 1), generator=torch.Generator().manual_seed(0))
    w = torch.ones(n, 1)
    x = torch.randn(n, f)
    torch.manual_seed(5)
    with torch.no_grad():
        y = TorchDroplessBackend(**kw)(ex, x, idx, w)
    dropped, kept = torch.isclose(y, torch.zeros(())), torch.isclose(y, torch.full((), 2 * c))
    assert bool((dropped | kept).all())
    assert abs(float(dropped.float().mean()) - 0.5) < 0.05
    y_eval = TorchDroplessBackend(**kw)(ex.eval(), x, idx, w)
    torch.testing.assert_close(y_eval, torch.full_like(y_eval, c))


@pytest.mark.parametrize("position,activation", [("post_act", "gelu"), ("pre_act", "relu")])
@pytest.mark.parametrize("kw", IMPLS)
def test_mean_over_draws_approaches_eval(kw, position, activation):
    """``E[drop(u)] = u``, so the mean training output equals the eval output for post_act (any act)
    and for pre_act with a positively homogeneous act (relu: ``E[relu(h m)] = relu(h)``). Without the
    ``1 / (1 - p)`` scale the mean would be off by half."""
    ex = _experts(p=0.5, position=position, activation=activation, seed=4)
    idx, w = _routing(8, 2, 5, seed=4)
    x = torch.randn(8, 8)
    backend = TorchDroplessBackend(**kw)
    torch.manual_seed(0)
    with torch.no_grad():
        mean = sum(backend(ex, x, idx, w) for _ in range(500)) / 500
        y_eval = backend(ex.eval(), x, idx, w)
    err = float((mean - y_eval).abs().mean()) / float(y_eval.abs().mean())
    assert err < 0.1, err


# --- through MoELayer --------------------------------------------------------------------------------

def test_moe_layer_post_act_train_vs_eval():
    torch.manual_seed(0)
    layer = build_moe_layer(8, 16, router="topk", initial_experts=4, top_k=2, expert_dropout=0.1,
                            expert_dropout_position="post_act")
    assert (layer.experts.dropout, layer.experts.dropout_position) == (0.1, "post_act")
    plain = build_moe_layer(8, 16, router="topk", initial_experts=4, top_k=2)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 8)

    layer.train()
    y1, rec1 = layer(x)
    y2, _ = layer(x)
    y_plain, rec_plain = plain.train()(x)
    assert torch.equal(rec1.expert_indices, rec_plain.expert_indices)
    assert not torch.allclose(y1, y2)  # a fresh mask per forward
    assert not torch.allclose(y1, y_plain)
    (y1 ** 2).sum().backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in layer.experts.parameters())

    layer.eval()
    e1, _ = layer(x)
    e2, _ = layer(x)
    assert torch.equal(e1, e2)
    assert torch.equal(e1, plain.eval()(x)[0])
    assert torch.equal(e1, y_plain)  # p = 0 in training is the plain layer too
