"""rmoe.accumulation: the global-batch loss over the micro-batches of an accumulation window, by hand on tiny
tensors; the routing pre-pass leaves buffers, routing records and the random-number stream as the real
forwards need them; a forward that routes otherwise than its pre-pass, or runs without a window under
accumulation, raises."""

import functools

import pytest
import torch

from rmoe import build_moe_layer
from rmoe.accumulation import open_window, routing_prepass
from rmoe.losses import WINDOW_REQUIRED, GlobalBatchWindow, global_batch_balance_loss


def test_window_loss_of_two_micro_batches_by_hand_equals_the_batch_of_both():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25],
                          [0.2, 0.2, 0.6], [0.6, 0.3, 0.1], [0.3, 0.4, 0.3]])
    top1 = torch.tensor([0, 1, 0, 2, 0, 1])
    # the batch of both: f = (3, 2, 1)/6, P = column means; E Σ f_e P_e
    col = [(0.7 + 0.1 + 0.5 + 0.2 + 0.6 + 0.3) / 6, (0.2 + 0.6 + 0.25 + 0.2 + 0.3 + 0.4) / 6,
           (0.1 + 0.3 + 0.25 + 0.6 + 0.1 + 0.3) / 6]
    full = 3 * (3 / 6 * col[0] + 2 / 6 * col[1] + 1 / 6 * col[2])
    window = GlobalBatchWindow(counts=torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), total=6.0, scale=2.0)
    first = global_batch_balance_loss(probs[:3], top1[:3], window=window)
    second = global_batch_balance_loss(probs[3:], top1[3:], window=window)
    # micro-batch 1 by hand: E Σ_e f_e (R·M/N) Σ_{t∈1} p_te with R·M = 2, N = 6
    sums1 = [0.7 + 0.1 + 0.5, 0.2 + 0.6 + 0.25, 0.1 + 0.3 + 0.25]
    assert float(first) == pytest.approx(3 * (3 / 6 * sums1[0] + 2 / 6 * sums1[1] + 1 / 6 * sums1[2]) * 2 / 6, rel=1e-6)
    # what accumulation computes (each micro-batch's loss / 2, summed) is the loss of the batch of both
    assert float((first + second) / 2) == pytest.approx(full, rel=1e-6)
    # per-micro-batch f (each half its own f: (2, 1, 0)/3 and (1, 1, 1)/3) is another number
    own = [3 * (2 / 3 * sums1[0] / 3 + 1 / 3 * sums1[1] / 3),
           3 * (1 / 3 * (0.2 + 0.6 + 0.3) / 3 + 1 / 3 * (0.2 + 0.3 + 0.4) / 3 + 1 / 3 * (0.6 + 0.1 + 0.3) / 3)]
    assert [float(global_batch_balance_loss(probs[:3], top1[:3])),
            float(global_batch_balance_loss(probs[3:], top1[3:]))] == pytest.approx(own, rel=1e-6)
    assert abs(sum(own) / 2 - full) > 0.04  # 1.1083 against 1.0625


def _model(noise=0.0, dropout=0.0, fusion=True):
    """An upstream linear, two global_batch layers (Stateful Fusion on the first, so its m steers the
    second layer's inputs), a head."""

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            kw = {"router": "topk", "initial_experts": 4, "top_k": 2, "aux_loss": "global_batch", "gate_noise": noise,
                  "expert_dropout": dropout}
            self.inp = torch.nn.Linear(6, 6)
            self.a = build_moe_layer(6, 12, **kw, fusion={"ema_decay": 0.5, "mix_alpha": 0.5} if fusion else None)
            self.b = build_moe_layer(6, 12, **kw)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.a(h)[0]
            h = h + self.b(h)[0]
            return self.head(h)

    torch.manual_seed(0)
    return Two().train()


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def test_prepass_keeps_state_and_the_real_forwards_draw_what_a_plain_run_draws():
    """Gate noise and expert dropout on, fusion moving m: the micro-batches run inside the window produce
    bitwise the outputs, final m and final generator state of the same micro-batches run plainly; right
    after the pre-pass every buffer and routing record is as before it."""
    xs = [torch.randn(5, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    model = _model(noise=1.0, dropout=0.3)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(42)
    plain = [model(x) for x in xs]
    plain_m, plain_rng = model.a.fusion.m.clone(), torch.get_rng_state()
    assert float(plain_m.abs().sum()) > 0
    other = model(xs[0])  # other random numbers: another output (noise and dropout are in play)
    assert not torch.equal(other, plain[0])

    model.load_state_dict(start)
    model.a.last_routing = model.b.last_routing = None
    torch.manual_seed(42)
    before = _buffers(model)
    window = open_window(model, [functools.partial(model, x) for x in xs])
    after = _buffers(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.a.last_routing is None and model.b.last_routing is None
    assert model.a.router.global_batch_window is None
    # the pre-pass drew exactly the forwards' random numbers: the generator is where the plain run left it
    assert torch.equal(torch.get_rng_state(), plain_rng)
    # window counts: every micro-batch's selections of each layer, 15 tokens
    assert [float(c[-1]) for c in window.counts] == [15.0, 15.0]
    for j, x in enumerate(xs):
        with window.micro_batch(j):
            out = model(x)
        assert torch.equal(out, plain[j])
    assert torch.equal(model.a.fusion.m, plain_m)
    assert torch.equal(torch.get_rng_state(), plain_rng)


def test_prepass_with_given_states_puts_the_generator_back():
    model = _model(noise=1.0)
    xs = [torch.randn(4, 6), torch.randn(4, 6)]
    torch.manual_seed(7)
    states = routing_prepass(model, [functools.partial(model, x) for x in xs])[1]
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    local, again = routing_prepass(model, [functools.partial(model, x) for x in xs], rng_states=states)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, states))
    assert [tuple(t.shape) for t in local] == [(2, 5), (2, 5)]


def test_plain_loop_accumulation_gives_the_full_batch_gradient():
    """No noise, no dropout: two halves accumulated in the window have the gradient of the full batch;
    without the window (each half its own f) they do not."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    model = _model(fusion=False)
    with torch.no_grad():
        model.a.router.weight.mul_(30)
        model.b.router.weight.mul_(30)

    def aux(out):
        return model.a.last_routing.aux_loss + model.b.last_routing.aux_loss + 0.1 * out.pow(2).mean()

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return g

    aux(model(x)).backward()
    full = grads()
    halves = [x[:8], x[8:]]
    window = open_window(model, [functools.partial(model, h) for h in halves])
    for j, h in enumerate(halves):
        with window.micro_batch(j):
            (aux(model(h)) / 2).backward()
    acc = grads()
    for h in halves:
        (aux(model(h)) / 2).backward()
    own = grads()
    for name in ("a.router.weight", "b.router.weight", "inp.weight"):
        assert float((acc[name] - full[name]).abs().max()) < 1e-6, name
    assert max(float((own[n] - full[n]).abs().max()) for n in ("a.router.weight", "inp.weight")) > 1e-3


def test_a_forward_routing_otherwise_than_its_prepass_and_a_missing_window_raise():
    model = _model()
    x = torch.randn(6, 6)
    window = open_window(model, [functools.partial(model, x)])
    with torch.no_grad():
        model.a.router.weight.mul_(-1.0)  # the real forward now routes otherwise
    with pytest.raises(RuntimeError, match="the routing pre-pass of the same micro-batch routed"):
        with window.micro_batch(0):
            model(x)
    model.a.router.global_batch_window = WINDOW_REQUIRED
    with pytest.raises(RuntimeError, match="no accumulation window"):
        model(x)
    model.eval()(x)  # evaluation does not use the window
