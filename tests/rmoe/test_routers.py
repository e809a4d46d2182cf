"""Routers against hand-computed values on tiny tensors (SPEC §1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from rmoe import MoEConfig, build_moe_layer
from rmoe.routing import CosineRouter, TopAnyRouter, TopKRouter, apply_capacity, ste_sign


def _softmax(row):
    ex = [math.exp(v) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def test_topk_softmax_selection_and_renormalised_gates():
    r = TopKRouter(2, MoEConfig(router="topk", initial_experts=3, top_k=2))
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    rec = r.eval()(x)
    # logits token0: [1, 2, 3]; token1: [-1, 0.5, -0.5]
    p0, p1 = _softmax([1, 2, 3]), _softmax([-1, 0.5, -0.5])
    assert torch.allclose(rec.router_probs, torch.tensor([p0, p1]), atol=1e-6)
    assert rec.expert_indices.tolist() == [[2, 1], [1, 2]]
    g0 = [p0[2] / (p0[2] + p0[1]), p0[1] / (p0[2] + p0[1])]
    g1 = [p1[1] / (p1[1] + p1[2]), p1[2] / (p1[1] + p1[2])]
    assert torch.allclose(rec.expert_weights, torch.tensor([g0, g1]), atol=1e-6)
    assert rec.tokens_per_expert.tolist() == [0, 2, 2]
    # Switch loss: f = [0, 1/2, 1/2] (first choices 2, 1), P = mean probs
    expected = 3 * (0.5 * (p0[1] + p1[1]) / 2 + 0.5 * (p0[2] + p1[2]) / 2)
    assert rec.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in ([1, 2, 3], [-1, 0.5, -0.5])]
    assert rec.z_loss.item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_topk_unnormalised_gates_are_the_probabilities():
    r = TopKRouter(2, MoEConfig(router="topk", initial_experts=3, top_k=2, normalize_gate=False))
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    rec = r.eval()(torch.tensor([[1.0, 2.0]]))
    p = _softmax([1, 2, 3])
    assert torch.allclose(rec.expert_weights, torch.tensor([[p[2], p[1]]]), atol=1e-6)


def test_noise_only_in_training():
    cfg = MoEConfig(router="topk", initial_experts=4, top_k=1, gate_noise=1.0)
    r = TopKRouter(8, cfg)
    x = torch.randn(64, 8)
    a, b = r.eval()(x), r.eval()(x)
    assert torch.equal(a.router_probs, b.router_probs)
    assert torch.allclose(a.router_probs, torch.softmax(x @ r.weight.t(), -1), atol=1e-6)
    c = r.train()(x)
    assert not torch.allclose(c.router_probs, a.router_probs)
    assert torch.allclose(c.router_logits, a.router_logits)  # clean logits are kept


def test_capacity_drops_over_cap_in_rank_then_token_order():
    # N=4, E=2, k=1, cf=1 -> capacity = 1 * floor(1 * ceil(4/2)) = 2
    cfg = MoEConfig(router="topk", initial_experts=2, top_k=1, capacity_factor=1.0)
    r = TopKRouter(1, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.tensor([[1.0], [2.0], [3.0], [-1.0]])  # three tokens want expert 0
    rec = r.eval()(x)
    assert rec.expert_indices.tolist() == [[0], [0], [-1], [1]]
    assert rec.num_dropped.item() == 1
    assert rec.expert_weights[2, 0].item() == 0.0
    assert rec.tokens_per_expert.tolist() == [2, 1]


def test_apply_capacity_prefers_first_choices():
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])
    kept, dropped = apply_capacity(idx, 2, capacity=2)
    # rank 0: tok0->0, tok1->1, tok2->0 (expert 0 now full: 2); rank 1: tok0->1 (ok, 2nd), tok1->0 drop, tok2->1 drop
    assert kept.tolist() == [[0, 1], [1, -1], [0, -1]]
    assert dropped.item() == 2


def test_cosine_router_by_hand():
    cfg = MoEConfig(router="cosine", initial_experts=2, top_k=1, router_options={"proj_dim": 2})
    r = CosineRouter(2, cfg)
    with torch.no_grad():
        r.proj.weight.copy_(torch.eye(2))
        r.proj.bias.zero_()
        r.sim.copy_(torch.tensor([[3.0, 0.0], [0.0, 5.0]]))  # columns -> unit (1,0), (0,1)
    x = torch.tensor([[3.0, 4.0]])  # normalised (0.6, 0.8)
    rec = r.eval()(x)
    scale = 2.0  # exp(log(1/0.5))
    assert torch.allclose(rec.router_logits, torch.tensor([[0.6 * scale, 0.8 * scale]]), atol=1e-6)
    assert rec.expert_indices.tolist() == [[1]]
    assert rec.expert_weights.tolist() == [[pytest.approx(_softmax([1.2, 1.6])[1], rel=1e-6)]]
    with torch.no_grad():
        r.log_temp.fill_(10.0)  # clamped at log 100
    assert torch.allclose(r.eval()(x).router_logits, torch.tensor([[60.0, 80.0]]), atol=1e-4)


def _topany(num=2, emax=3):
    cfg = MoEConfig(router="topany", initial_experts=num, max_experts=emax, top_k=1)
    r = TopAnyRouter(2, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))  # columns (1,0), (0,1), (-1,0)
    return r


def test_topany_training_and_eval_fallback():
    r = _topany()
    x = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    rec = r.train()(x)
    # token0: cos = (1, 0, -1) -> s = (σ(1), 0.5, masked 0) ; thresholds σ(0)=0.5 -> z = (1, 0, 0)
    # token1: cos = (0, -1) -> s = (0.5, σ(-1)) -> none
    # token2: cos = (1/√2, 1/√2) -> both > 0.5 -> two experts, gates 1/2 each
    c = 1 / math.sqrt(2)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert torch.allclose(rec.router_probs, torch.tensor(
        [[sig(1), 0.5, 0.0], [0.5, sig(-1), 0.0], [sig(c), sig(c), 0.0]]), atol=1e-6)
    assert rec.expert_indices.tolist() == [[0, -1], [-1, -1], [0, 1]] or rec.expert_indices.tolist() == [
        [0, -1], [-1, -1], [1, 0]]
    assert rec.expert_weights.sum(-1).tolist() == [1.0, 0.0, 1.0]
    assert sorted(rec.expert_weights[2].tolist()) == [0.5, 0.5]
    assert rec.tokens_per_expert.tolist() == [2, 1, 0]
    ev = r.eval()(x)
    assert ev.expert_indices[1].tolist() == [0, -1]  # fallback to the top-1 by s (0.5 > σ(-1))
    assert ev.expert_weights[1, 0].item() == 1.0


def test_ste_sign_forward_values_and_identity_gradient():
    v = torch.tensor([-2.0, 0.0, 0.3, 5.0], requires_grad=True)
    out = ste_sign(v)
    assert out.tolist() == [-1.0, 0.0, 1.0, 1.0]
    (out * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert v.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_topany_gradient_flows_through_straight_through_sign():
    layer = build_moe_layer(2, 2, router="topany", initial_experts=2, max_experts=3, top_k=1, activation="relu",
                            bias=False)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))
        layer.experts.w1.copy_(torch.eye(2).expand(3, 2, 2))
        layer.experts.w2.copy_(torch.stack([torch.diag(torch.tensor([2.0, 3.0])), torch.eye(2), torch.eye(2)]))
    x = torch.tensor([[2.0, 1.0]])  # cos with (1,0) = 2/√5, with (0,1) = 1/√5: both > 0 -> both active
    y, rec = layer.train()(x)
    assert rec.expert_indices.tolist() == [[0, 1]]
    y.sum().backward()
    # y = (z0 f0 + z1 f1) / k with k = z0 + z1 NOT detached (DynMoE); f0 = (4, 3), f1 = (2, 1):
    # dL/dg = (7, 3), dL/dz_e = (1/k)(dL/dg_e − mean_S dL/dg) = (1, −1); dz_e/dG_e = −σ'(0) = −0.25.
    # (A detached k would give (7/2, 3/2) * −0.25.)
    g = layer.router.thresholds.grad
    assert g[0].item() == pytest.approx(-0.25, rel=1e-6)
    assert g[1].item() == pytest.approx(0.25, rel=1e-6)
    assert g[2].item() == 0.0
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


class _Sign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v):
        return torch.sign(v)

    @staticmethod
    def backward(ctx, g):
        return g


def _topany_reference(x, w, g, mask, w1, b1, w2, b2, detach_k=False):
    """DynMoE's top-any forward written from SPEC §1: dense over all experts, gates z / Σz."""
    s = torch.sigmoid(F.normalize(x, dim=-1) @ F.normalize(w, dim=0)) * mask
    z = _Sign.apply(F.relu(s - torch.sigmoid(g)))
    k = z.sum(-1, keepdim=True)
    k = k.detach() if detach_k else k
    gates = z / (k + 1e-12) if bool((k.detach() > 1).any()) else z
    h = torch.einsum("nd,edf->enf", x, w1) + b1[:, None]
    out = torch.einsum("enf,efd->end", F.gelu(h), w2) + b2[:, None]
    return torch.einsum("ne,end->nd", gates, out)


def test_topany_gradients_equal_a_differentiable_normaliser_reference():
    torch.manual_seed(0)
    layer = build_moe_layer(6, 5, router="topany", initial_experts=4, max_experts=6, top_k=1)
    with torch.no_grad():
        layer.router.thresholds.copy_(torch.tensor([0.2, -0.3, 0.4, 0.0, 0.1, 0.0]))
    x = torch.randn(40, 6)
    y, rec = layer.train()(x)
    ks = (rec.expert_indices >= 0).sum(-1)
    assert int(ks.max()) > 1 and bool((ks == 1).any()) and bool((ks == 0).any())  # all cases present
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    r, ex = layer.router, layer.experts
    params = [p.detach().clone().requires_grad_(True) for p in (r.weight, r.thresholds)]
    ref = _topany_reference(x, params[0], params[1], r.expert_mask.float(), ex.w1.detach(), ex.b1.detach(),
                            ex.w2.detach(), ex.b2.detach())
    assert torch.allclose(y, ref, atol=1e-5)
    (ref * grad_out).sum().backward()
    assert torch.allclose(r.thresholds.grad, params[1].grad, atol=1e-5)
    assert torch.allclose(r.weight.grad, params[0].grad, atol=1e-5)
    # a detached normaliser trains the thresholds differently, so the comparison above can fail
    detached = params[1].detach().clone().requires_grad_(True)
    ref_d = _topany_reference(x, params[0].detach(), detached, r.expert_mask.float(), ex.w1.detach(),
                              ex.b1.detach(), ex.w2.detach(), ex.b2.detach(), detach_k=True)
    (ref_d * grad_out).sum().backward()
    assert (detached.grad - r.thresholds.grad).abs().max() > 1e-3


def test_batch_prioritized_routing_drops_the_least_confident_tokens():
    idx = torch.tensor([[0], [0], [0], [1]])
    top1 = torch.tensor([0.5, 0.9, 0.7, 0.6])
    kept, dropped = apply_capacity(idx, 2, 1)  # token order: token 0 keeps expert 0's place
    assert kept.flatten().tolist() == [0, -1, -1, 1] and int(dropped) == 2
    kept, dropped = apply_capacity(idx, 2, 1, priority=top1)  # most confident first: token 1
    assert kept.flatten().tolist() == [-1, 0, -1, 1] and int(dropped) == 2
    kept, _ = apply_capacity(idx, 2, 2, priority=top1)  # capacity 2: tokens 1 and 2 (0.9, 0.7)
    assert kept.flatten().tolist() == [-1, 0, 0, 1]
    # second choices still come after all first choices
    idx2 = torch.tensor([[0, 1], [1, 0]])
    kept, _ = apply_capacity(idx2, 2, 1, priority=torch.tensor([0.1, 0.9]))
    assert kept.tolist() == [[0, -1], [1, -1]]


def test_router_uses_batch_prioritized_routing_when_configured():
    cfg = MoEConfig(router="topk", initial_experts=2, top_k=1, capacity_factor=0.5, batch_prioritized_routing=True)
    r = TopKRouter(2, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[0.1, 0.0], [3.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # all prefer expert 0
    rec = r.eval()(x)  # capacity = 1 * floor(0.5 * ceil(4/2)) = 1
    assert rec.expert_indices.flatten().tolist() == [-1, 0, -1, -1]  # token 1 is the most confident
    plain = TopKRouter(2, MoEConfig(router="topk", initial_experts=2, top_k=1, capacity_factor=0.5))
    plain.load_state_dict(r.state_dict())
    assert plain.eval()(x).expert_indices.flatten().tolist() == [0, -1, -1, -1]


def test_adaptive_pool_remove_and_add_exactly_as_spec():
    r = _topany(num=2, emax=3)
    r.train()
    r.start_recording()
    x = torch.tensor([[2.0, 0.0], [0.0, -1.0], [0.0, -3.0]])  # token0 -> expert 0; tokens 1,2 -> none
    r(x)
    assert r.routed_count.tolist() == [1.0, 0.0, 0.0]
    assert r.unrouted_count.item() == 2.0
    change = r.adapt()
    # expert 1 got zero tokens -> removed; unrouted tokens -> first free slot (1, freed just now)
    assert change == {"removed": [1], "added": [1]}
    assert r.expert_mask.tolist() == [True, True, False]
    assert torch.allclose(r.weight[:, 1], torch.tensor([0.0, -1.0]))  # normalize((0,-1)+(0,-3))
    assert r.thresholds[1].item() == 0.0
    assert r.routed_count.sum().item() == 0.0 and not bool(r.recording)
    # not recording: forwards leave the counters alone
    r(x)
    assert r.routed_count.sum().item() == 0.0


def test_adaptive_pool_add_uses_first_free_slot_when_none_removed():
    r = _topany(num=2, emax=3)
    with torch.no_grad():
        r.thresholds[0] = -10.0  # expert 0 always on
    r.train().start_recording()
    r(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    with torch.no_grad():
        r.thresholds[0] = 10.0
    r(torch.tensor([[0.5, -1.0]]))  # expert0 off (threshold), expert1 cos<0 -> none
    change = r.adapt()
    assert change == {"removed": [], "added": [2]}
    assert r.expert_mask.tolist() == [True, True, True]
    assert torch.allclose(r.weight[:, 2], torch.tensor([0.5, -1.0]) / math.sqrt(1.25), atol=1e-6)


@pytest.mark.parametrize("router,extra", [("topk", {}), ("cosine", {}), ("topany", {"max_experts": 6})])
def test_routing_is_fp32_under_autocast(router, extra):
    torch.manual_seed(0)
    layer = build_moe_layer(8, 16, router=router, initial_experts=4, top_k=2 if router != "topany" else 1, **extra)
    x = torch.randn(64, 8)
    with torch.no_grad():
        ref = layer.router.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec = layer.router.eval()(x)
            rec_bf16_in = layer.router.eval()(x.bfloat16())
    assert rec.router_logits.dtype == torch.float32 and rec.router_probs.dtype == torch.float32
    # every matmul of the router ran in fp32: the same logits as without autocast
    assert torch.equal(rec.router_logits, ref.router_logits)
    assert torch.equal(rec.expert_indices, ref.expert_indices)
    assert rec_bf16_in.router_logits.dtype == torch.float32
    # (the same matmul in bf16 would differ by far more than fp32 rounding)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer.router.weight if router != "cosine" else layer.router.proj.weight
        lowp = x @ (w if w.shape[0] == 8 else w.t())
    exact = x @ (w if w.shape[0] == 8 else w.t())
    assert lowp.dtype == torch.bfloat16 and (lowp.float() - exact).abs().max() > 1e-4


# --- one routing step for every router (Router.forward, as flaxformer's routing.Router): a router defines its
# logits and its decision (route); fp32, gate noise, aux loss, z-loss and the record come from the base


def _hard_top1_router():
    from torch import nn

    from rmoe.routing import Route, Router

    class HardTop1(Router):
        """Every token to the argmax of its softmax, combine weight 1."""

        family = "softmax"
        default_aux_loss = "switch"

        def __init__(self, d_model, cfg):
            super().__init__(d_model, cfg)
            self.weight = nn.Parameter(torch.zeros(self.max_experts, d_model))

        def logits(self, x):
            return F.linear(x, self.weight.float())

        def route(self, x, logits):
            self.seen = logits  # what the decision was made on
            probs = torch.softmax(logits, dim=-1)
            idx = probs.argmax(-1, keepdim=True)
            return Route(indices=idx, weights=torch.ones_like(idx, dtype=probs.dtype), probs=probs)

    return HardTop1


def test_a_router_that_defines_only_its_decision_gets_the_shared_step():
    router_cls = _hard_top1_router()
    r = router_cls(2, MoEConfig(router="topk", initial_experts=3, top_k=1, gate_noise=0.6))
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = r.eval()(x.bfloat16())
    rows = [[1.0, 2.0, 3.0], [-1.0, 0.5, -0.5]]  # W x by hand (x is exact in bf16)
    p = [_softmax(row) for row in rows]
    assert rec.router_logits.dtype == torch.float32 and rec.router_logits.tolist() == rows
    assert torch.equal(r.seen, rec.router_logits)  # eval: no noise
    assert rec.expert_indices.tolist() == [[2], [1]] and rec.expert_weights.tolist() == [[1.0], [1.0]]
    assert rec.gate_values.tolist() == [[1.0], [1.0]] and torch.equal(rec.dispatch_scores, rec.router_probs)
    assert torch.allclose(rec.router_probs, torch.tensor(p), atol=1e-6)
    assert rec.tokens_per_expert.tolist() == [0, 1, 1] and rec.active_mask.tolist() == [True] * 3
    assert int(rec.num_dropped) == 0 and rec.selection_scores is None and rec.fusion_pi is None
    # ST-MoE z-loss: mean_t (logsumexp_e logits)^2
    lse = [math.log(sum(math.exp(v) for v in row)) for row in rows]
    assert float(rec.z_loss) == pytest.approx(sum(v * v for v in lse) / 2, rel=1e-6)
    # Switch loss E * sum_e f_e P_e, f from the first choices (experts 2 and 1)
    f = [0.0, 0.5, 0.5]
    pm = [(p[0][e] + p[1][e]) / 2 for e in range(3)]
    assert float(rec.aux_loss) == pytest.approx(3 * sum(a * b for a, b in zip(f, pm)), rel=1e-6)
    # training: the decision sees logits + gate_noise * eps / E (eps ~ N(0, 1)); the record keeps the clean ones
    torch.manual_seed(3)
    eps = torch.randn(2, 3)
    torch.manual_seed(3)
    rec = r.train()(x)
    assert torch.allclose(r.seen, torch.tensor(rows) + 0.6 * eps / 3, atol=1e-6)
    assert rec.router_logits.tolist() == rows


def test_a_router_without_parameters_routes_through_the_shared_step():
    from rmoe.routing import Route, Router

    class RoundRobin(Router):
        """Token i to expert i mod E (no parameters, as a hash router)."""

        def logits(self, x):
            return x.new_zeros(x.shape[0], self.max_experts)

        def route(self, x, logits):
            idx = (torch.arange(x.shape[0]) % self.max_experts).unsqueeze(1)
            return Route(indices=idx, weights=torch.ones(x.shape[0], 1), probs=torch.softmax(logits, dim=-1))

    router = RoundRobin(2, MoEConfig(router="topk", initial_experts=3, top_k=1)).eval()
    assert router.active_mask.tolist() == [True, True, True]  # what callbacks read
    rec = router(torch.randn(5, 2))
    assert rec.expert_indices.flatten().tolist() == [0, 1, 2, 0, 1] and rec.tokens_per_expert.tolist() == [2, 2, 1]
    assert rec.active_mask.tolist() == [True, True, True]
    assert float(rec.z_loss) == pytest.approx(math.log(3) ** 2, rel=1e-6)  # logsumexp of 3 zeros
