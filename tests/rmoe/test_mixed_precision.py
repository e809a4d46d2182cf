"""The MoE layer under mixed precision (CPU autocast, as Lightning's ``bf16-mixed`` / ``16-mixed`` run it).

Every router x every torch-backend implementation x an fp32 or a low-precision input (the output of
an ``nn.Linear`` under autocast is bf16), in training (forward + backward) and in eval under
``no_grad`` (Lightning's sanity check): the layer runs, returns the input's dtype, routes in fp32,
keeps its routing state (fusion ``m``, pool counts, loss-free bias and counts) in its own dtype, and
matches a per-token fp32 loop over the same routing decision within the low precision's rounding.
The sync-free ``grouped_mm`` path the backend takes on CUDA runs here in fp32 against the same loop,
empty slots and tokens without an expert included.
"""

import pytest
import torch

from rmoe import build_moe_layer
from rmoe.experts import Experts, TorchDroplessBackend, compute_dtype

ROUTERS = {
    "topk": dict(router="topk", initial_experts=4, top_k=2),
    "topk_capacity": dict(router="topk", initial_experts=4, top_k=2, capacity_factor=0.5),
    "cosine": dict(router="cosine", initial_experts=4, top_k=2),
    "topany": dict(router="topany", initial_experts=4, max_experts=8, top_k=1),
    # RMoE: fusion with mix_alpha=1, so the combine weights need no gradient (the crash)
    "topany_fusion": dict(router="topany", initial_experts=4, max_experts=8, top_k=1,
                          fusion={"ema_decay": 0.9, "mix_alpha": 1.0}),
    "lossfree": dict(router="lossfree", initial_experts=4, top_k=2),
    "expert_choice": dict(router="expert_choice", initial_experts=4, top_k=2, capacity_factor=1.0),
}
IMPLS = ("auto", "blocked", "grouped_mm", "autograd")


def loop_reference(experts: Experts, x, indices, weights):
    """fp32 per-token, per-slot loop over the routing decision (independent of the backend)."""
    w1, b1, w2, b2 = (t.detach().float() for t in (experts.w1, experts.b1, experts.w2, experts.b2))
    x = x.detach().float()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(indices.shape[1]):
            e = int(indices[t, s])
            if e >= 0:
                h = experts.act(x[t] @ w1[e] + b1[e])
                out[t] += float(weights[t, s]) * (h @ w2[e] + b2[e])
    return out


def _state_dtypes(layer):
    return {name: buf.dtype for name, buf in layer.named_buffers()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_trains_and_evaluates(name, impl, input_dtype):
    torch.manual_seed(0)
    layer = build_moe_layer(16, 32, **ROUTERS[name])
    with torch.no_grad():
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
    layer.backend.impl = impl
    dtypes = _state_dtypes(layer)
    x = torch.randn(2, 6, 16).to(input_dtype).requires_grad_(True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, rec = layer(x, mask=mask)
        (y.float().square().sum() + rec.aux_loss).backward()
    assert y.dtype == input_dtype
    assert rec.router_probs.dtype == torch.float32
    assert _state_dtypes(layer) == dtypes  # routing state keeps its own dtype
    # every parameter the step touched got a finite gradient in the parameter's own dtype
    assert x.grad is not None and x.grad.dtype == input_dtype and torch.isfinite(x.grad).all()
    for pname, p in layer.experts.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), pname
    # the output is the fp32 loop's over the same routing decision, up to bf16 rounding
    xr = x.detach().reshape(-1, 16)[mask.reshape(-1)]
    ref = loop_reference(layer.experts, xr, rec.expert_indices, rec.expert_weights)
    got = y.detach().float().reshape(-1, 16)[mask.reshape(-1)]
    assert torch.allclose(got, ref, atol=0.05, rtol=0.05), (got - ref).abs().max()
    assert torch.all(y.reshape(-1, 16)[~mask.reshape(-1)] == 0)

    layer.eval()  # Lightning's sanity check and validation: eval mode, no grad
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_eval, _ = layer(x.detach(), mask=mask)
    assert y_eval.dtype == input_dtype and torch.isfinite(y_eval.float()).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_autocast_runs_the_experts_in_fp16(impl):
    torch.manual_seed(0)
    layer = build_moe_layer(16, 32, router="topk", initial_experts=4, top_k=2)
    layer.backend.impl = impl
    x = torch.randn(12, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_dtype(x, layer.experts) == torch.float16
        y, rec = layer(x)
        y.sum().backward()
    assert y.dtype == torch.float32 and torch.isfinite(layer.experts.w1.grad).all()
    ref = loop_reference(layer.experts, x, rec.expert_indices, rec.expert_weights)
    assert torch.allclose(y.detach(), ref, atol=5e-3, rtol=5e-3)


def test_compute_dtype_outside_autocast_is_the_weights():
    ex = Experts(2, 8, 8)
    assert compute_dtype(torch.randn(1, 8), ex) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(torch.randn(1, 8), ex) == torch.bfloat16


def test_pure_bf16_model_without_autocast():
    """A model cast to bf16 (``model.to(torch.bfloat16)``): experts compute in bf16, no cast."""
    torch.manual_seed(0)
    layer = build_moe_layer(16, 32, router="topk", initial_experts=4, top_k=2).to(torch.bfloat16)
    x = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)
    y, rec = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.experts.w1.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sync_free_grouped_mm_path_equals_the_loop(dropout):
    """The path CUDA takes (all N*K slots sorted, empty ones last, offsets ending at the last valid
    slot, the rest masked): output and every gradient equal the per-token loop, with empty slots and a
    token without any expert; expert dropout through an explicit keep-mask in (token, slot) layout."""
    torch.manual_seed(1)
    n, k, e, d, dff = 14, 3, 4, 8, 12
    ex = Experts(e, d, dff, dropout=dropout)
    with torch.no_grad():
        ex.b1.normal_()
        ex.b2.normal_()
    x = torch.randn(n, d, requires_grad=True)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    idx[2, 1:] = -1
    idx[5] = -1  # no expert at all
    idx[9, 0] = -1
    w = torch.rand(n, k, requires_grad=True)
    mask = torch.rand(n, k, dff) > dropout if dropout else None
    from rmoe.experts import _Params

    y = TorchDroplessBackend._grouped_mm_padded(ex, _Params.of(ex, torch.float32), x, idx, w, mask)
    g = torch.randn_like(y)
    params = [x, w, ex.w1, ex.b1, ex.w2, ex.b2]
    grads = torch.autograd.grad((y * g).sum(), params)

    def ref_fn():  # per (token, slot): act(drop(x W1 + b1)) W2 + b2, weighted
        out = []
        for t in range(n):
            acc = torch.zeros(d)
            for s in range(k):
                j = int(idx[t, s])
                if j < 0:
                    continue
                h = x[t] @ ex.w1[j] + ex.b1[j]
                if mask is not None:
                    h = h * mask[t, s] / (1 - dropout)
                acc = acc + w[t, s] * (ex.act(h) @ ex.w2[j] + ex.b2[j])
            out.append(acc)
        return torch.stack(out)

    y_ref = ref_fn()
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.all(y[5] == 0)
    for name, a, b in zip(["x", "w", "w1", "b1", "w2", "b2"], grads, grads_ref):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5), name


@pytest.mark.gpu
def test_cuda_auto_takes_grouped_mm_without_a_host_sync():
    """On CUDA in bf16, ``impl="auto"`` runs grouped_mm; forward and backward sync with the host 0 times."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs CUDA SM >= 8.0")
    import warnings

    torch.manual_seed(0)
    ex = Experts(8, 64, 128).cuda()
    be = TorchDroplessBackend()
    x = torch.randn(256, 64, device="cuda", requires_grad=True)
    idx = torch.randint(-1, 8, (256, 2), device="cuda")
    w = torch.rand(256, 2, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        be(ex, x, idx, w)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, torch.autocast("cuda", dtype=torch.bfloat16):
            warnings.simplefilter("always")
            y = be(ex, x, idx, w)
            y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert be.last_impl == "grouped_mm"
    assert not [w for w in caught if "synchroniz" in str(w.message)]
    ref = loop_reference(ex.cpu(), x.detach().cpu(), idx.cpu(), w.detach().cpu())
    assert torch.allclose(y.detach().float().cpu(), ref, atol=0.05, rtol=0.05)
