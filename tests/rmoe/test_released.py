"""The authors' released code where it differs from the paper's equations (SPEC §9), each a switch of
``MoEConfig.released`` that is off by default. Each test ports the released lines into the test (JingyongYe/R-MoE
``RMoE/tutel/tutel/impls/moe_layer.py``, ``.../impls/generalized_fast_dispatch.py``,
``.../gates/gated_multi_gate.py``, ``RMoE/Language/moe_utils.py``) and runs them on tiny tensors; the expected values
come from the port, never from the code under test.

The tiny top-any layer: ``d = E_max = 4``, router columns = the unit vectors, thresholds with ``sigmoid(G) = 0.6``,
3 active slots (slot 3 off), so ``z_e = 1`` iff ``cos(x, e_e) > log(0.6/0.4)`` -- each token's experts are read off
its direction.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmoe import ConfigError, MoEConfig, build_moe_layer

E_MAX = 4
# experts per token: {0}, {0, 1}, none, {1, 2} (slot 3 is inactive)
X = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.3, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])


def _layer(released: dict, fusion: dict | None = None, **kw):
    torch.manual_seed(0)
    cfg = dict(router="topany", initial_experts=3, max_experts=E_MAX, d_ff=8, fusion=fusion, released=released)
    cfg.update(kw)
    d_ff = cfg.pop("d_ff")
    layer = build_moe_layer(4, d_ff, **cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
        layer.router.thresholds.fill_(math.log(0.6 / 0.4))  # sigmoid(G) = 0.6
    return layer


def _expert(layer, e, x):
    ex = layer.experts
    return F.gelu(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]


# --- ports of the released lines ---------------------------------------------------------------------------
def _released_gate(x, sim, gates_param, mask, training):
    """GAMoEGate.forward (gates/gated_multi_gate.py): returns (logits, top_k)."""
    logits = torch.sigmoid(torch.matmul(F.normalize(x, dim=1), F.normalize(sim, dim=0))) * mask
    gates = torch.sigmoid(gates_param)
    if training:
        logits = torch.sign(F.relu(logits - gates))
        top_k = torch.sum(logits > 0, dim=1).to(torch.int)
    else:
        new_logits = torch.sign(F.relu(logits - gates))
        top_k = torch.sum(new_logits > 0, dim=1).to(torch.int)
        logits = ((torch.sum(new_logits, dim=1) == 0).to(torch.int).repeat(logits.shape[1])
                  .reshape(logits.shape[1], -1).T) * logits + new_logits
        top_k = torch.max(top_k, torch.ones(top_k.shape)).to(torch.int)
    return logits, top_k


def _released_extract_critical(scores, top_k, normalize_gate=True):
    """generalized_fast_dispatch.extract_critical: (indices [S, K] padded with E, gates [S, K])."""
    e = int(scores.size(1))
    top_k = [int(k) for k in top_k]
    max_top_k = max(top_k)
    topk_indices = [torch.topk(scores[i], top_k[i]).indices for i in range(len(scores))]
    topk_indices = torch.nn.utils.rnn.pad_sequence(topk_indices, True, padding_value=e)
    indices_s = [t.view(-1) for t in topk_indices.chunk(max_top_k, dim=1)]
    masks_se = [F.one_hot(t, num_classes=e + 1)[:, :e].to(scores.dtype) for t in indices_s]  # padding -> zeros
    gates_s = [(scores * m).sum(dim=1) for m in masks_se]
    if max_top_k > 1 and normalize_gate:
        denom_s = torch.clamp(sum(gates_s), min=torch.finfo(gates_s[0].dtype).eps)
        gates_s = [g / denom_s for g in gates_s]
    return torch.stack(indices_s, dim=1), torch.stack(gates_s, dim=1)


def _released_dw(scores, stacked_indices, ema, momentum, e_max):
    """moe_layer.py, the `if self.dw:` block: (clamped indices, fusion gates, new ema)."""
    clamped = stacked_indices.clamp(max=e_max - 1)
    ema = ema * momentum + (1 - momentum) * scores.sum(dim=0)
    fusion_weights = F.softmax(torch.log1p(ema + 1e-6), dim=0)
    gates = F.normalize(fusion_weights[clamped], p=1, dim=1)
    return clamped, gates, ema


def _released_record(x, indices_first, all_indices, e_max):
    """moe_layer.py record_routing: (routing_records[:E_max], sum of x of tokens whose first index is E_max)."""
    records = torch.zeros(e_max + 1, dtype=torch.long)
    flat = all_indices.t().reshape(-1).to(torch.long)
    records.scatter_add_(0, flat, torch.ones_like(flat))
    unrouted = x[indices_first == e_max]
    return records[:e_max], unrouted.sum(0), unrouted.shape[0]


def _released_route(layer, x, training):
    r = layer.router
    return _released_gate(x, r.weight.detach(), r.thresholds.detach(), r.expert_mask.float(), training)


# --- 9: Stateful Fusion's padding clamp ----------------------------------------------------------------------
def test_fusion_pad_clamp_weights_and_dispatch_follow_the_released_dw_branch():
    fusion = {"ema_decay": 0.9, "agg": "sum", "update_in_eval": False, "mix_alpha": 1.0}
    layer = _layer({"fusion_pad_clamp": True}, fusion=fusion)
    m0 = torch.tensor([20.0, 3.0, 1.0, 0.0])
    layer.fusion.m.copy_(m0)
    layer.train()
    y, rec = layer(X)
    scores, top_k = _released_route(layer, X, training=True)
    idx, _ = _released_extract_critical(scores, top_k)
    clamped, gates, ema = _released_dw(scores, idx, m0, 0.9, E_MAX)
    assert torch.allclose(layer.fusion.m, ema, atol=1e-6)
    # per token, the (index, weight) pairs as multisets (the order of tied experts differs)
    for t in range(len(X)):
        ours = sorted(zip(rec.expert_indices[t].tolist(), rec.expert_weights[t].tolist()))
        ref = sorted(zip(clamped[t].tolist(), gates[t].tolist()))
        assert [i for i, _ in ours] == [i for i, _ in ref], t
        assert [w for _, w in ours] == pytest.approx([w for _, w in ref], abs=1e-6), t
    # the one-expert token: pi_0 and pi_3 share its normalisation (not 1 / 0)
    pi = ((1 + ema) / (1 + ema).sum()).tolist()
    assert rec.expert_weights[0].tolist() == pytest.approx([pi[0] / (pi[0] + pi[3]), pi[3] / (pi[0] + pi[3])],
                                                           abs=1e-6)
    # the padded slots are dispatched to expert E_max - 1 (each token's own input here; SPEC §9)
    with torch.no_grad():
        want = torch.stack([sum(w * _expert(layer, i, X[t]) for i, w in zip(clamped[t].tolist(), gates[t]))
                            for t in range(len(X))])
    assert torch.allclose(y, want, atol=1e-5)


def test_fusion_pad_clamp_is_off_by_default_and_refused_without_fusion():
    fusion = {"ema_decay": 0.9, "agg": "sum", "update_in_eval": False, "mix_alpha": 1.0}
    layer = _layer({}, fusion=fusion)
    layer.train()
    _, rec = layer(X)
    assert rec.expert_indices[0].tolist() == [0, -1] and rec.expert_weights[0].tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(ConfigError, match="released.fusion_pad_clamp"):
        MoEConfig.from_dict({"router": "topany", "released": {"fusion_pad_clamp": True}})
    with pytest.raises(ConfigError, match="released.fusion_pad_clamp"):
        MoEConfig.from_dict({"router": "topk", "fusion": fusion, "released": {"fusion_pad_clamp": True}})
    with pytest.raises(ConfigError, match="released.route_pad"):
        MoEConfig.from_dict({"router": "topk", "released": {"route_pad": True}})


# --- 10: the pool recorder reads the clamped indices ---------------------------------------------------------
@pytest.mark.parametrize("clamped", [False, True])
def test_pool_recorder_follows_the_released_record_routing(clamped):
    fusion = {"ema_decay": 0.9, "agg": "sum", "update_in_eval": False, "mix_alpha": 1.0}
    layer = _layer({"fusion_pad_clamp": clamped, "pool_reads_clamped": clamped}, fusion=fusion)
    layer.train()
    layer.router.start_recording()
    layer(X)
    scores, top_k = _released_route(layer, X, training=True)
    idx, _ = _released_extract_critical(scores, top_k)
    if clamped:
        idx, _, _ = _released_dw(scores, idx, torch.zeros(E_MAX), 0.9, E_MAX)
    counts, usum, ucount = _released_record(X, idx[:, 0], idx, E_MAX)
    r = layer.router
    assert r.routed_count.tolist() == counts.double().tolist()
    assert r.unrouted_count.item() == ucount and torch.allclose(r.unrouted_sum.float(), usum)
    change = r.adapt()
    # with the clamp the token without an expert is never seen: the pool does not grow
    assert change["added"] == ([] if clamped else [3])


def test_pool_reads_clamped_needs_the_clamp():
    with pytest.raises(ConfigError, match="released.pool_reads_clamped"):
        MoEConfig.from_dict({"router": "topany", "released": {"pool_reads_clamped": True}})


# --- 11: the eval fallback gate ------------------------------------------------------------------------------
@pytest.mark.parametrize("switch", [False, True])
def test_eval_fallback_gate_is_s_top1_when_no_token_has_two_experts(switch):
    layer = _layer({"eval_fallback_gate": switch})
    layer.eval()
    x = X[[0, 2]]  # one token with expert 0, one with none: the batch's most experts per token is 1
    with torch.no_grad():
        _, rec = layer(x)
    scores, top_k = _released_route(layer, x, training=False)
    idx, gates = _released_extract_critical(scores, top_k)
    assert rec.expert_indices.tolist() == idx.tolist()
    if switch:
        assert rec.expert_weights.flatten().tolist() == pytest.approx(gates.flatten().tolist(), abs=1e-6)
        assert rec.expert_weights[1, 0].item() < 1.0  # the fallback token keeps s_top1
    else:
        assert rec.expert_weights.tolist() == [[1.0], [1.0]]
    # a batch where some token has two experts: the released gates are normalised, as ours
    with torch.no_grad():
        _, rec2 = layer(X)
    scores, top_k = _released_route(layer, X, training=False)
    idx, gates = _released_extract_critical(scores, top_k)
    for t in range(len(X)):
        ours = sorted((i, w) for i, w in zip(rec2.expert_indices[t].tolist(), rec2.expert_weights[t].tolist())
                      if i >= 0)
        ref = sorted((i, w) for i, w in zip(idx[t].tolist(), gates[t].tolist()) if i < E_MAX)
        assert [i for i, _ in ours] == [i for i, _ in ref]
        assert [w for _, w in ours] == pytest.approx([w for _, w in ref], abs=1e-6)


# --- 12: GLUE upcycling's bias and routed padding --------------------------------------------------------------
@pytest.mark.parametrize("router,kw,div", [("topany", {"initial_experts": 3, "max_experts": 4}, 4),
                                          ("topk", {"initial_experts": 4, "top_k": 2}, 2)])
def test_upcycle_bias_split_is_the_released_moe_utils_rule(router, kw, div):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
    layer = build_moe_layer(4, 8, router=router, released={"upcycle_bias_split": True}, **kw).upcycle_from(fc1, fc2)
    # moe_utils.py: bias_1.unsqueeze(0).repeat(max_expert_num, 1).div(max_expert_num) (top-any) / .div(top_k)
    e = layer.experts.b2.shape[0]
    want = fc2.bias.detach().unsqueeze(0).repeat(e, 1).div(div)
    assert torch.equal(layer.experts.b2.detach(), want)
    assert torch.equal(layer.experts.b1.detach(), fc1.bias.detach().unsqueeze(0).repeat(e, 1))
    plain = build_moe_layer(4, 8, router=router, **kw).upcycle_from(fc1, fc2)
    assert torch.equal(plain.experts.b2.detach(), fc2.bias.detach().unsqueeze(0).repeat(e, 1))


def test_route_padding_sends_every_position_through_the_moe_layer():
    fusion = {"ema_decay": 0.9, "agg": "sum", "update_in_eval": False, "mix_alpha": 1.0}
    layer = _layer({"route_padding": True}, fusion=fusion)
    layer.train()
    x = X.reshape(1, 4, 4)
    mask = torch.tensor([[True, True, False, False]])
    y, rec = layer(x, mask=mask)
    assert rec.num_tokens == 4  # the two padding positions were routed too
    # fusion counted every position's activations: m = (1 - beta) * sum_t z_t over all four tokens
    scores, _ = _released_route(layer, X, training=True)
    assert torch.allclose(layer.fusion.m, 0.1 * scores.sum(0), atol=1e-6)
    assert y[0, 3].abs().sum() > 0  # a padding position gets an MoE output
    off = _layer({}, fusion=fusion)
    off.train()
    y_off, rec_off = off(x, mask=mask)
    assert rec_off.num_tokens == 2 and y_off[0, 2:].abs().sum() == 0
