"""Dropless backend vs a naive per-token loop; upcycling and splitting; masks; MegaBlocks guard."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmoe import build_moe_layer
from rmoe.experts import Experts, TorchDroplessBackend


def naive_moe(experts: Experts, x, indices, weights):
    """Per-token, per-slot Python loop: the reference."""
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=x.dtype)
        for s in range(indices.shape[1]):
            e = int(indices[t, s])
            if e < 0:
                continue
            h = x[t] @ experts.w1[e] + experts.b1[e]
            acc = acc + weights[t, s] * (experts.act(h) @ experts.w2[e] + experts.b2[e])
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("e, k", [(4, 2), (6, 3), (3, 1)])
def test_dropless_backend_equals_naive_loop_forward_and_grad(e, k):
    torch.manual_seed(1)
    ex = Experts(e, 8, 12, "gelu")
    with torch.no_grad():
        ex.b1.normal_()
        ex.b2.normal_()
    x = torch.randn(20, 8, requires_grad=True)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(20)])
    idx[3, -1] = -1  # an empty slot
    idx[7] = -1  # a token with no expert
    w = torch.rand(20, k, requires_grad=True)
    y = TorchDroplessBackend()(ex, x, idx, w)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, w, ex.w1, ex.w2, ex.b1, ex.b2])
    y_ref = naive_moe(ex, x, idx, w)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, w, ex.w1, ex.w2, ex.b1, ex.b2])
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.all(y[7] == 0)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)


def _dense_ffn(d, d_ff, act=nn.GELU):
    torch.manual_seed(3)
    ffn = nn.Sequential(nn.Linear(d, d_ff), act(), nn.Linear(d_ff, d))
    return ffn


@pytest.mark.parametrize("router, extra", [
    ("topk", {"initial_experts": 4, "top_k": 2}),
    ("topk", {"initial_experts": 4, "top_k": 1, "gate_noise": 1.0}),
    ("cosine", {"initial_experts": 6, "top_k": 1}),
    ("cosine", {"initial_experts": 6, "top_k": 2}),
    ("topany", {"initial_experts": 4, "max_experts": 8, "top_k": 1}),
])
@pytest.mark.parametrize("fusion", [None, {"ema_decay": 0.9}])
def test_upcycled_layer_reproduces_dense_ffn_in_eval(router, extra, fusion):
    d, d_ff = 16, 32
    ffn = _dense_ffn(d, d_ff)
    layer = build_moe_layer(d, d_ff, router=router, fusion=fusion, **extra)
    layer.upcycle_from(ffn[0], ffn[2]).eval()
    x = torch.randn(3, 7, d)
    y, rec = layer(x)
    if extra["top_k"] == 1 and router != "topany" and fusion is None:
        # Switch-style top-1: the gate is the top probability itself (SPEC: renormalised only for k > 1)
        p1 = torch.softmax(rec.router_logits, -1).max(-1).values
        assert torch.allclose(y, ffn(x) * p1.reshape(3, 7, 1), atol=1e-5)
    else:
        # each token's weights sum to 1 -> the upcycled layer is the dense FFN
        assert torch.allclose(rec.expert_weights.sum(-1), torch.ones(21), atol=1e-6)
        assert torch.allclose(y, ffn(x), atol=1e-5)


def test_upcycle_noise_perturbs_experts_differently():
    ffn = _dense_ffn(8, 16)
    layer = build_moe_layer(8, 16, initial_experts=3, top_k=1, upcycle_noise=0.1).upcycle_from(ffn[0], ffn[2])
    assert not torch.allclose(layer.experts.w1[0], layer.experts.w1[1])
    assert torch.allclose(layer.experts.w1[0], ffn[0].weight.t(), atol=0.1 * 5 * float(ffn[0].weight.detach().std()))


def test_split_ffn_expert_e_owns_hidden_units_of_part_e():
    d, d_ff, e = 8, 12, 3
    ffn = _dense_ffn(d, d_ff)
    layer = build_moe_layer(d, d_ff // e, initial_experts=e, top_k=3, normalize_gate=False).split_from(ffn[0], ffn[2])
    x = torch.randn(5, d)
    h = F.gelu(ffn[0](x))
    for j in range(e):
        part = slice(j * 4, (j + 1) * 4)
        expected = h[:, part] @ ffn[2].weight[:, part].t() + ffn[2].bias
        assert torch.allclose(layer.experts.expert_forward(j, x), expected, atol=1e-5)
    # all parts with weight 1 sum to the dense FFN plus (E-1) extra output biases
    total = sum(layer.experts.expert_forward(j, x) for j in range(e))
    assert torch.allclose(total, ffn(x) + (e - 1) * ffn[2].bias, atol=1e-5)


def test_padding_tokens_are_not_routed():
    layer = build_moe_layer(8, 16, router="topk", initial_experts=4, top_k=2).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y, rec = layer(x, mask=mask)
    assert rec.num_tokens == 8 and int(rec.tokens_per_expert.sum()) == 16
    assert torch.all(y[0, 3:] == 0)
    y_full, _ = layer(x)
    assert torch.allclose(y[mask], y_full[mask], atol=1e-6)


def test_contract_fields_and_shapes():
    layer = build_moe_layer(8, 16, router="topany", initial_experts=3, max_experts=5, top_k=1,
                            capacity_factor=0.0, gate_noise=0.0, fusion=None, backend="torch")
    y, r = layer(torch.randn(4, 6, 8))
    assert y.shape == (4, 6, 8)
    assert r.expert_indices.shape[0] == 24 and r.expert_weights.shape == r.expert_indices.shape
    assert r.router_probs.shape == (24, 5) and r.tokens_per_expert.shape == (5,)
    assert r.aux_loss.dim() == 0 and r.z_loss.dim() == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.aux_loss = torch.zeros(())  # immutable record


def test_megablocks_backend_clear_error_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA"):
        build_moe_layer(8, 16, backend="megablocks")


@pytest.mark.gpu
def test_megablocks_matches_torch_backend_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    ref = build_moe_layer(64, 128, router="topk", initial_experts=4, top_k=2).cuda().eval()
    mb = build_moe_layer(64, 128, router="topk", initial_experts=4, top_k=2, backend="megablocks").cuda().eval()
    mb.load_state_dict(ref.state_dict())
    x = torch.randn(32, 64, device="cuda")
    ref_y, mb_y = ref(x)[0], mb(x)[0]
    # MegaBlocks computes in bf16 (grouped_gemm takes bf16 only): bf16 tolerance against fp32
    assert mb_y.dtype == torch.float32
    assert (mb_y - ref_y).abs().max() <= 3e-2 * ref_y.abs().max().clamp_min(1.0)
