"""The balancing methods MoE practice moved to, on tiny tensors with values worked out by hand:
auxiliary-loss-free bias balancing (DeepSeek-V3), the global-batch Switch loss (Qwen), the
sequence-level balance loss (DeepSeek-V3), expert-choice routing (Zhou et al. 2022)."""

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from rmoe import ConfigError, MoEConfig, build_moe_layer, moe_losses, moefy_bert
from rmoe.losses import global_batch_balance_loss
from rmoe.registry import ROUTERS
from rmoe.routing import TopKRouter


def fail_message(**cfg):
    with pytest.raises(ConfigError) as err:
        MoEConfig(**cfg)
    return str(err.value)


def _set_router(layer, weight):
    with torch.no_grad():
        layer.router.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))


# --- auxiliary-loss-free balancing ----------------------------------------------------------------
def test_lossfree_bias_update_sign_and_magnitude_over_two_micro_batches():
    layer = build_moe_layer(4, 8, router="lossfree", initial_experts=4, top_k=1,
                            router_options={"bias_update_rate": 0.25})
    _set_router(layer, 5 * torch.eye(4))  # token e_j (one-hot) has its highest score on expert j
    eye = torch.eye(4)
    layer.train()
    layer(eye[[0, 0, 1]])  # micro-batch 1: experts 0, 0, 1
    layer(eye[[0, 3, 3]])  # micro-batch 2: experts 0, 3, 3
    assert layer.router.load_counts.tolist() == [3, 1, 0, 2]  # both micro-batches accumulate
    layer.eval()
    layer(eye[[2, 2, 2]])  # evaluation forwards do not count
    assert layer.router.load_counts.tolist() == [3, 1, 0, 2]
    layer.router.update_bias()
    # mean load 1.5: overloaded experts 0 and 3 go down by u, underloaded 1 and 2 up by u
    assert layer.router.bias.tolist() == [-0.25, 0.25, 0.25, -0.25]
    assert layer.router.load_counts.tolist() == [0, 0, 0, 0]
    layer.router.update_bias()  # a step without training forwards (all loads equal the mean): no change
    assert layer.router.bias.tolist() == [-0.25, 0.25, 0.25, -0.25]
    sd = layer.state_dict()
    assert "router.bias" in sd and "router.load_counts" in sd  # persistent buffers, saved in checkpoints
    assert not any(n.endswith("bias") and "router" in n for n, _ in layer.named_parameters())


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_lossfree_selection_uses_the_biased_scores_and_the_gates_do_not(score_fn):
    layer = build_moe_layer(3, 6, router="lossfree", initial_experts=3, top_k=2,
                            router_options={"score_fn": score_fn})
    _set_router(layer, torch.eye(3))
    x = torch.tensor([[2.0, 1.0, 0.0]])  # logits (2, 1, 0)
    if score_fn == "softmax":
        z = math.exp(2) + math.exp(1) + 1
        s = [math.exp(2) / z, math.exp(1) / z, 1 / z]
    else:
        s = [1 / (1 + math.exp(-v)) for v in (2.0, 1.0, 0.0)]
    _, rec = layer.eval()(x)
    assert rec.expert_indices.tolist() == [[0, 1]]  # no bias: the two highest scores
    layer.router.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # expert 2 now wins the selection
    _, rec = layer(x)
    assert rec.expert_indices.tolist() == [[2, 0]]  # in order of the biased scores
    want = [s[2] / (s[2] + s[0]), s[0] / (s[2] + s[0])]  # unbiased scores, normalised over the selected
    assert rec.expert_weights[0].tolist() == pytest.approx(want, rel=1e-6)
    assert rec.router_probs[0].tolist() == pytest.approx([v / sum(s) for v in s], rel=1e-6)


def test_lossfree_top1_sigmoid_gate_is_normalised_to_one_and_config_checks():
    """DeepSeek-V3 inference/model.py Gate (sigmoid: weights /= weights.sum, any k) and torchtitan route_norm:
    the selected sigmoid score over itself, 1 at k = 1; normalize_gate=false keeps the raw score s_e."""
    layer = build_moe_layer(2, 4, router="lossfree", initial_experts=2, top_k=1,
                            router_options={"score_fn": "sigmoid"})
    _set_router(layer, torch.eye(2))
    x = torch.tensor([[0.5, -1.0], [-2.0, 0.25]])
    _, rec = layer.eval()(x)
    assert rec.expert_indices.tolist() == [[0], [1]]
    assert rec.expert_weights.tolist() == [[1.0], [1.0]]
    raw = build_moe_layer(2, 4, router="lossfree", initial_experts=2, top_k=1, router_options={"score_fn": "sigmoid"},
                          normalize_gate=False)
    _set_router(raw, torch.eye(2))
    _, rec = raw.eval()(x)
    assert rec.expert_weights[:, 0].tolist() == pytest.approx([1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-0.25))])
    # softmax scores, k = 1: the raw probability, as the top-k router
    soft = build_moe_layer(2, 4, router="lossfree", initial_experts=2, top_k=1,
                           router_options={"score_fn": "softmax"})
    _set_router(soft, torch.eye(2))
    _, rec = soft.eval()(x)
    assert rec.expert_weights[0].tolist() == pytest.approx([math.exp(0.5) / (math.exp(0.5) + math.exp(-1.0))])
    assert fail_message(router="lossfree", gate_noise=1.0) == (
        "invalid MoE config: gate_noise=1.0; allowed: 0 for router 'lossfree' (the bias steers selection; no noise)")
    assert fail_message(router="lossfree", capacity_factor=1.0) == (
        "invalid MoE config: capacity_factor=1.0; allowed: 0 for router 'lossfree' (it is dropless)")
    assert fail_message(router="lossfree", router_options={"score_fn": "tanh"}) == (
        "invalid MoE config: router_options.score_fn='tanh'; allowed: softmax|sigmoid")
    assert fail_message(router="lossfree", router_options={"bias_update_rate": -1e-3}) == (
        "invalid MoE config: router_options.bias_update_rate=-0.001; allowed: a finite number >= 0")
    assert MoEConfig(router="lossfree").aux_loss == "none"
    assert MoEConfig(router="lossfree", aux_loss="seq_balance").aux_loss == "seq_balance"
    assert fail_message(router="lossfree", aux_loss="switch").endswith(
        "allowed: seq_balance|none for router 'lossfree'")


# --- global-batch balance loss ----------------------------------------------------------------------
def test_global_batch_loss_by_hand_and_one_process_equals_switch():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    top1 = torch.tensor([0, 1, 0, 2])
    # E Σ f_e P_e: f = (2, 1, 1)/4, P = column means
    p = [(0.7 + 0.1 + 0.5 + 0.2) / 4, (0.2 + 0.6 + 0.25 + 0.2) / 4, (0.1 + 0.3 + 0.25 + 0.6) / 4]
    want = 3 * (0.5 * p[0] + 0.25 * p[1] + 0.25 * p[2])
    assert float(global_batch_balance_loss(probs, top1)) == pytest.approx(want, rel=1e-6)
    layer = build_moe_layer(4, 8, router="topk", initial_experts=3, top_k=1, aux_loss="global_batch")
    twin = build_moe_layer(4, 8, router="topk", initial_experts=3, top_k=1, aux_loss="switch")
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 4)
    a, b = layer.train()(x)[1].aux_loss.detach(), twin.train()(x)[1].aux_loss.detach()
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_global_batch_loss_counts_all_k_selections_divided_by_k():
    """Megatron-Core switch_load_balancing_loss_func (Qiu et al. 2025): f_e = (selections of e) / (k T), every one
    of a token's k experts counted; loss E Σ_e f_e P_e."""
    probs = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.4, 0.1, 0.5]]
    top2 = [sorted(range(3), key=lambda e, r=r: -r[e])[:2] for r in probs]  # [0,1] [1,2] [2,0 or 1] [2,0]
    top2[2] = [2, 0]
    counts = [sum(e in t for t in top2) for e in range(3)]
    assert counts == [3, 2, 3]
    p_mean = [sum(r[e] for r in probs) / 4 for e in range(3)]
    want = 3 * sum(counts[e] / (2 * 4) * p_mean[e] for e in range(3))
    got = global_batch_balance_loss(torch.tensor(probs), torch.tensor(top2), top_k=2)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # the layer hands the loss every selection: a top-2 layer's loss from its own probabilities and top-2
    layer = build_moe_layer(4, 8, router="topk", initial_experts=3, top_k=2, aux_loss="global_batch")
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    _, rec = layer.train()(x)
    p = rec.router_probs.detach().tolist()
    sel = [sorted(range(3), key=lambda e, r=r: -r[e])[:2] for r in p]
    c = [sum(e in t for t in sel) for e in range(3)]
    ref = 3 * sum(c[e] / (2 * 6) * sum(r[e] for r in p) / 6 for e in range(3))
    assert float(rec.aux_loss) == pytest.approx(ref, rel=1e-6)


def test_global_batch_f_over_two_halves_equals_the_batch_of_both():
    """The counts of two halves summed (what the all-reduce over two ranks computes) give the loss of the
    whole batch, and the two halves' weighted losses average to it (what DDP's gradient mean sees)."""
    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(7, 4), -1)
    top1 = torch.tensor([0, 0, 1, 3, 0, 2, 1])
    full = global_batch_balance_loss(probs, top1)
    halves = [(probs[:4], top1[:4]), (probs[4:], top1[4:])]  # unequal token counts: 4 and 3
    counts = sum(torch.bincount(t, minlength=4).double() for _, t in halves)
    f = counts / 7
    per_rank = [4 * float((f * p.sum(0).double()).sum()) * 2 / 7 for p, _ in halves]
    assert sum(per_rank) / 2 == pytest.approx(float(full), rel=1e-6)
    assert [float(v) for v in f] == [3 / 7, 2 / 7, 1 / 7, 1 / 7]


def test_global_batch_megatron_mode_running_mean_by_hand_and_config_check():
    """global_batch_mode=megatron (Megatron-Core router.py _apply_global_aux_loss): micro-batch j's f uses the mean of
    the global counts of micro-batches 1..j over k · T_j; loss E Σ_e f_e Σ_t p_te / T_j; reset clears the running
    state; evaluation forwards use their own counts and leave it alone."""
    layer = build_moe_layer(3, 6, router="topk", initial_experts=3, top_k=2, aux_loss="global_batch",
                            global_batch_mode="megatron")
    _set_router(layer, torch.eye(3))
    x1 = torch.tensor([[2.0, 1.0, 0.0], [1.5, 0.0, 1.0], [0.0, 2.0, 0.5]])
    x2 = torch.tensor([[0.2, 0.0, 3.0], [0.5, 0.0, 2.0]])

    def probs_and_counts(x):
        p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in x.tolist()]
        top2 = [sorted(range(3), key=lambda e, r=r: -r[e])[:2] for r in p]
        return p, [sum(e in t for t in top2) for e in range(3)]

    p1, c1 = probs_and_counts(x1)
    p2, c2 = probs_and_counts(x2)
    assert (c1, c2) == ([2, 2, 2], [2, 0, 2])
    layer.train()
    got1 = float(layer(x1)[1].aux_loss)
    got2 = float(layer(x2)[1].aux_loss)
    want1 = 3 * sum(c1[e] / (2 * 3) * sum(r[e] for r in p1) / 3 for e in range(3))
    mean = [(c1[e] + c2[e]) / 2 for e in range(3)]
    want2 = 3 * sum(mean[e] / (2 * 2) * sum(r[e] for r in p2) / 2 for e in range(3))
    assert (got1, got2) == (pytest.approx(want1, rel=1e-6), pytest.approx(want2, rel=1e-6))
    assert layer.router.global_batch_counts.tolist() == [4.0, 2.0, 4.0] and float(layer.router.global_batch_steps) == 2
    layer.eval()
    own = 3 * sum(c2[e] / (2 * 2) * sum(r[e] for r in p2) / 2 for e in range(3))
    assert float(layer(x2)[1].aux_loss) == pytest.approx(own, rel=1e-6)
    assert float(layer.router.global_batch_steps) == 2
    layer.router.reset_global_batch_counts()
    assert layer.router.global_batch_counts.tolist() == [0.0, 0.0, 0.0] and float(layer.router.global_batch_steps) == 0
    # window mode (the default) has no running state; the key is checked
    assert "router.global_batch_counts" not in build_moe_layer(3, 6, router="topk", initial_experts=3,
                                                               aux_loss="global_batch").state_dict()
    assert fail_message(aux_loss="global_batch", global_batch_mode="running") == (
        "invalid MoE config: global_batch_mode='running'; allowed: window|megatron")


# --- sequence-level balance loss -------------------------------------------------------------------
def test_seq_balance_by_hand_from_the_batch_layout_and_mask():
    layer = build_moe_layer(3, 6, router="topk", initial_experts=3, top_k=1, aux_loss="seq_balance")
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    _set_router(layer, w)
    x = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]],    # sequence 0: 2 real tokens
                      [[0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])   # sequence 1: 3 real tokens
    mask = torch.tensor([[True, True, False], [True, True, True]])
    _, rec = layer.eval()(x, mask)
    expected = []
    for seq, n_real in ((0, 2), (1, 3)):
        rows = [[math.exp(v) for v in x[seq, t].tolist()] for t in range(n_real)]
        probs = [[v / sum(r) for v in r] for r in rows]
        chosen = [max(range(3), key=lambda e, p=p: p[e]) for p in probs]
        f = [3 / (1 * n_real) * chosen.count(e) for e in range(3)]
        p_mean = [sum(p[e] for p in probs) / n_real for e in range(3)]
        expected.append(sum(fe * pe for fe, pe in zip(f, p_mean)))
    assert float(rec.aux_loss.detach()) == pytest.approx(sum(expected) / 2, rel=1e-6)
    # a [N, d] input has no sequences: the whole batch is one sequence
    flat = x[mask]
    _, rec_flat = layer(flat)
    probs = torch.softmax(flat, -1)
    f = torch.bincount(probs.argmax(-1), minlength=3).float() * 3 / 5
    assert float(rec_flat.aux_loss) == pytest.approx(float((f * probs.mean(0)).sum()), rel=1e-6)


def test_seq_balance_with_lossfree_sigmoid_counts_the_unbiased_top_k():
    """DeepSeek-V3 eq. 18 (Megatron-Core ``compute_routing_scores_for_aux_loss``): f_e counts the top-k of the
    unbiased scores s, while the dispatch uses the top-k of s + b."""
    layer = build_moe_layer(3, 6, router="lossfree", initial_experts=3, top_k=2, router_options={"score_fn": "sigmoid"},
                            aux_loss="seq_balance")
    _set_router(layer, torch.eye(3))
    layer.router.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))  # expert 2 always dispatched
    x = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 2.0, -0.5]]])
    _, rec = layer.eval()(x)
    assert rec.expert_indices.tolist() == [[2, 0], [2, 1]]  # the biased selection dispatches
    s = [[1 / (1 + math.exp(-v)) for v in row] for row in x[0].tolist()]
    norm = [[v / sum(r) for v in r] for r in s]
    unbiased_top2 = [sorted(range(3), key=lambda e, r=r: -r[e])[:2] for r in s]
    assert unbiased_top2 == [[0, 1], [1, 0]]  # expert 2 in neither: the loss sees its low scores
    counts = [sum(e in t for t in unbiased_top2) for e in range(3)]  # [2, 2, 0]
    f = [3 / (2 * 2) * c for c in counts]  # E / (k T) · count
    p_mean = [(norm[0][e] + norm[1][e]) / 2 for e in range(3)]
    assert float(rec.aux_loss) == pytest.approx(sum(a * b for a, b in zip(f, p_mean)), rel=1e-6)
    # softmax scores: the same rule
    soft = build_moe_layer(3, 6, router="lossfree", initial_experts=3, top_k=1, router_options={"score_fn": "softmax"},
                           aux_loss="seq_balance")
    _set_router(soft, torch.eye(3))
    soft.router.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    _, rec = soft.eval()(x)
    assert rec.expert_indices.tolist() == [[2], [2]]
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in x[0].tolist()]
    f = [3 / 2 * c for c in (1, 1, 0)]  # unbiased top-1: experts 0 and 1
    assert float(rec.aux_loss) == pytest.approx(sum(f[e] * (p[0][e] + p[1][e]) / 2 for e in range(3)), rel=1e-6)


def test_a_router_without_seq_ids_keeps_working(cleanup_router):
    class Plain(TopKRouter):
        def forward(self, x):  # the old signature
            return super().forward(x)

    ROUTERS.register("plain_fwd", Plain)
    cleanup_router.append("plain_fwd")
    layer = build_moe_layer(4, 8, router="plain_fwd", initial_experts=2, top_k=1)
    y, rec = layer(torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    assert y.shape == (2, 3, 4) and rec.num_tokens == 3


@pytest.fixture
def cleanup_router():
    names = []
    yield names
    for n in names:
        ROUTERS.unregister(n)


# --- expert choice ---------------------------------------------------------------------------------
def _flaxformer_capacity(n, cf, e):
    """flaxformer moe_layers.py MoeLayer: int(round(cf * tokens_per_group / num_experts)), at least
    min_expert_capacity = 4 (Python's round: half to even); our top-c needs c <= n."""
    return min(n, max(int(round(cf * n / e)), 4))


@pytest.mark.parametrize("n, cf, e, want", [
    (84, 1.0, 8, 10),   # 10.5 rounds half to even: 10 (ceil: 11)
    (12, 2.0, 8, 4),    # 3, raised to the minimum 4 (ceil: 3)
    (100, 2.0, 8, 25),
    (20, 1.0, 8, 4),    # 2.5 -> 2 -> 4
    (3, 2.0, 8, 3),     # fewer tokens than the minimum: every token
    (27, 1.0, 2, 14),   # 13.5 -> 14 (half to even)
])
def test_expert_choice_capacity_is_flaxformers_rule(n, cf, e, want):
    layer = build_moe_layer(2, 4, router="expert_choice", initial_experts=e, capacity_factor=cf)
    assert _flaxformer_capacity(n, cf, e) == want
    assert layer.router.capacity(n) == want
    _, rec = layer.train()(torch.randn(n, 2))
    assert rec.tokens_per_expert.tolist() == [want] * e


def test_expert_choice_capacity_and_tokens_with_several_or_no_experts():
    layer = build_moe_layer(2, 4, router="expert_choice", initial_experts=2, capacity_factor=0.8, bias=False)
    _set_router(layer, torch.eye(2))
    # logits (a, b): expert 0 prefers large a - b, expert 1 large b - a; tokens 4, 5 nearly neutral
    x = torch.tensor([[3.0, 0.0], [2.5, 0.0], [2.0, 0.0], [1.5, 0.0], [0.1, 0.0],
                      [0.0, 0.1], [0.0, 1.5], [0.0, 2.0], [0.0, 2.5], [0.0, 3.0]])
    assert layer.router.capacity(10) == _flaxformer_capacity(10, 0.8, 2) == 4
    _, rec = layer.eval()(x)
    assert rec.tokens_per_expert.tolist() == [4, 4]
    assert rec.expert_indices.tolist() == [[0], [0], [0], [0], [-1], [-1], [1], [1], [1], [1]]  # 4, 5: no expert
    layer2 = build_moe_layer(2, 4, router="expert_choice", initial_experts=2, capacity_factor=1.2, bias=False)
    _set_router(layer2, torch.eye(2))
    layer2.experts.load_state_dict(layer.experts.state_dict())
    assert layer2.router.capacity(10) == _flaxformer_capacity(10, 1.2, 2) == 6
    y, rec = layer2.eval()(x)
    assert rec.tokens_per_expert.tolist() == [6, 6]
    # the near-neutral tokens 4, 5 are taken by both experts: K = 2, other tokens padded with −1
    experts = [[0], [0], [0], [0], [0, 1], [1, 0], [1], [1], [1], [1]]
    assert rec.expert_indices.tolist() == [t + [-1] * (2 - len(t)) for t in experts]
    for t, ex in enumerate(experts):
        la, lb = x[t].tolist()
        p = [math.exp(la) / (math.exp(la) + math.exp(lb)), math.exp(lb) / (math.exp(la) + math.exp(lb))]
        assert rec.expert_weights[t, : len(ex)].tolist() == pytest.approx([p[e] for e in ex], rel=1e-6)
        want = sum(p[e] * layer2.experts.expert_forward(e, x[t:t + 1])[0] for e in ex)
        assert torch.allclose(y[t], want, atol=1e-6)


def test_expert_choice_gets_the_task_gradient_and_rejects_causal_models():
    layer = build_moe_layer(4, 8, router="expert_choice", initial_experts=3, capacity_factor=2.0)
    y, rec = layer.train()(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))
    y.sum().backward()
    assert layer.router.weight.grad is not None and float(layer.router.weight.grad.abs().sum()) > 0
    assert rec.tokens_per_expert.tolist() == [7, 7, 7]  # round(10 * 2 / 3) = round(6.67)
    assert fail_message(router="expert_choice", capacity_factor=2.0, causal=True) == (
        "invalid MoE config: causal=True; allowed: false for router 'expert_choice' (each expert picks its top "
        "tokens from the whole batch, so a token's experts depend on later tokens: not causal)")
    assert fail_message(router="expert_choice") == (
        "invalid MoE config: capacity_factor=0.0; allowed: > 0 for router 'expert_choice' (each expert takes "
        "max(round(capacity_factor * N / E), 4) tokens)")
    # the surgery marks a decoder (causal) BERT, and the expert-choice config is refused there
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, is_decoder=True)
    with pytest.raises(ConfigError, match="causal=True; allowed: false for router 'expert_choice'"):
        moefy_bert(BertModel(cfg), [1], {"router": "expert_choice", "initial_experts": 2, "capacity_factor": 1.0})
    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16))
    (moe,) = moefy_bert(encoder, [1], {"router": "expert_choice", "initial_experts": 2, "capacity_factor": 1.0})
    assert moe.cfg.causal is False


# --- per-layer losses ------------------------------------------------------------------------------
def test_each_layer_computes_its_own_balance_loss_before_layers_are_summed():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = build_moe_layer(3, 6, router="topk", initial_experts=3, top_k=1, aux_loss="global_batch")
            self.b = build_moe_layer(3, 6, router="topk", initial_experts=3, top_k=1, aux_loss="global_batch")

    m = Two()
    _set_router(m.a, torch.eye(3))
    _set_router(m.b, torch.eye(3)[[1, 2, 0]])
    xa = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [0, 2.0, 0]])
    xb = torch.tensor([[2.0, 0, 0], [0, 0, 2.0], [0, 0, 2.0]])
    m.a.train()(xa)
    m.b.train()(xb)

    def switch(x, w):
        p = torch.softmax(x @ w.t(), -1)
        f = torch.bincount(p.argmax(-1), minlength=3).float() / x.shape[0]
        return 3 * float((f * p.mean(0)).sum())

    own = switch(xa, torch.eye(3)) + switch(xb, torch.eye(3)[[1, 2, 0]])
    assert float(moe_losses(m)[0]) == pytest.approx(own, rel=1e-6)
    # f and P of the two layers pooled first would be another (smaller, balance-hiding) number
    pa, pb = torch.softmax(xa, -1), torch.softmax(xb @ torch.eye(3)[[1, 2, 0]].t(), -1)
    pooled_p = torch.cat([pa, pb])
    pooled_f = torch.bincount(pooled_p.argmax(-1), minlength=3).float() / 6
    assert 2 * 3 * float((pooled_f * pooled_p.mean(0)).sum()) < own - 0.1
