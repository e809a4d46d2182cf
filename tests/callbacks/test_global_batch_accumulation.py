"""The global-batch loss under Lightning's gradient accumulation (callbacks.balancing + rmoe.accumulation) in
real (tiny) runs: one optimizer step over two accumulated halves has the gradient of one step over the full
batch (and per-micro-batch f_e does not); the epoch's shorter last window; the routing pre-pass changes
nothing a run draws or keeps; a checkpoint written inside a window resumes on the same batches, random
numbers and f_e; the checks before training."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from callbacks.balancing import BalancingCallback
from rmoe import ConfigError, build_moe_layer, moe_losses
from rmoe.losses import GlobalBatchWindow
from tasks.run.samplers import resumable_train_loader

LAM = 1.0  # the aux loss weight: large, so its gradient is not lost in the task loss's


class Tiny(pl.LightningModule):
    """Upstream linear -> MoE (top-2 of 4, global_batch) -> head; ``training_forward`` is training_step's forward."""

    def __init__(self, aux_loss="global_batch", lam=LAM, **moe):
        super().__init__()
        torch.manual_seed(1)
        self.inp = torch.nn.Linear(8, 8)
        self.moe = build_moe_layer(8, 16, router="topk", initial_experts=4, top_k=2, aux_loss=aux_loss, **moe)
        with torch.no_grad():
            self.moe.router.weight.mul_(40)  # peaked routing: f_e differs between the halves
        self.head = torch.nn.Linear(8, 3)
        self.lam = lam
        self.aux_values = {}

    def training_forward(self, batch):
        h = self.inp(batch[0])
        return self.head(h + self.moe(h)[0])

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.training_forward(batch), batch[1])
        aux = moe_losses(self)[0]
        self.aux_values[(self.current_epoch, batch_idx)] = float(aux.detach())
        return loss + self.lam * aux

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def hand_loss(module, x, y):
    """CE + λ · E Σ_e f_e P_e on one batch, the global-batch form written out: f_e = selections of e among the
    tokens' top-2 (largest probabilities) / (2 · tokens), P_e = mean probability."""
    h = module.inp(x)
    out = module.head(h + module.moe(h)[0])
    p = torch.softmax(h @ module.moe.router.weight.t(), -1)
    f = torch.bincount(p.topk(2, -1).indices.reshape(-1), minlength=4).double() / (2 * len(x))
    return F.cross_entropy(out, y) + module.lam * 4 * (f.to(p.dtype) * p.mean(0)).sum()


class Grab(pl.Callback):
    """Every optimizer step's gradients and the parameters they were computed at."""

    def __init__(self):
        self.grads, self.states = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.states.append(copy.deepcopy(pl_module.state_dict()))


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _fit(module, loader, acc, callbacks, ckpt_path=None, **kw):
    kw.setdefault("max_epochs", 1)
    trainer = pl.Trainer(accumulate_grad_batches=acc, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         limit_val_batches=0, **kw)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def _max_diff(a, b, names):
    return max(float((a[n] - b[n]).abs().max()) for n in names)


ROUTER_AND_UPSTREAM = ("moe.router.weight", "inp.weight", "inp.bias")


def test_two_accumulated_halves_have_the_gradient_of_the_full_batch():
    data = _data()
    full, halves, own = Grab(), Grab(), Grab()
    _fit(Tiny(), DataLoader(data, batch_size=16), 1, [BalancingCallback(), full], max_steps=1)
    _fit(Tiny(), DataLoader(data, batch_size=8), 2, [BalancingCallback(), halves], max_steps=1)
    # without the callback nothing gives the micro-batches the window: each half takes f_e from itself
    _fit(Tiny(), DataLoader(data, batch_size=8), 2, [own], max_steps=1)
    assert len(full.grads) == len(halves.grads) == len(own.grads) == 1
    # the full-batch gradient written out by hand (autograd of the Switch form, not the code under test)
    reference = Tiny()
    hand_loss(reference, *data.tensors).backward()
    ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert _max_diff(full.grads[0], ref, ROUTER_AND_UPSTREAM) < 1e-6
    assert _max_diff(halves.grads[0], ref, ref.keys()) < 1e-6
    assert _max_diff(own.grads[0], ref, ROUTER_AND_UPSTREAM) > 1e-2  # per-micro-batch f_e: another gradient


def megatron_hand_loss(module, xs, ys):
    """Megatron-Core's global_aux_loss over one step's micro-batches, written out (router.py
    _apply_global_aux_loss): after micro-batch j the running sum of its global top-2 counts, divided by j, is
    tokens_per_expert; loss_j = E · Σ_e P_sum_e · tpe_e / (k · T_j · T_j) (switch_load_balancing_loss_func);
    the step's loss is Σ_j (CE_j + λ loss_j) / M (Lightning divides by accumulate_grad_batches)."""
    total, running = 0.0, torch.zeros(4, dtype=torch.float64)
    for j, (x, y) in enumerate(zip(xs, ys), start=1):
        h = module.inp(x)
        out = module.head(h + module.moe(h)[0])
        p = torch.softmax(h @ module.moe.router.weight.t(), -1)
        running = running + torch.bincount(p.detach().topk(2, -1).indices.reshape(-1), minlength=4).double()
        tpe = (running / j).to(p.dtype)
        t = len(x)
        aux = 4 * (p.sum(0) * tpe).sum() / (2 * t * t)
        total = total + (F.cross_entropy(out, y) + module.lam * aux) / len(xs)
    return total


def test_megatron_mode_running_mean_over_micro_batches_reset_after_each_step():
    """moe.global_batch_mode=megatron: two optimizer steps of two micro-batches; each step's gradient is the
    autograd of megatron_hand_loss at the parameters it was taken at (the running counts start afresh every
    step: the second step's gradient would differ otherwise), and no routing pre-pass runs (no window)."""
    data, grab, spy = _data(16), Grab(), WindowSpy()
    module = Tiny(global_batch_mode="megatron")
    _fit(module, DataLoader(data, batch_size=4), 2, [BalancingCallback(), spy, grab])
    assert spy.windows == [None] * 4
    assert len(grab.grads) == 2
    assert float(module.moe.router.global_batch_steps) == 0.0  # cleared after the last step
    x, y = data.tensors
    for i in range(2):
        at = Tiny(global_batch_mode="megatron")
        at.load_state_dict(grab.states[i])
        at.moe.router.reset_global_batch_counts()
        rows = slice(8 * i, 8 * i + 8)
        megatron_hand_loss(at, x[rows].split(4), y[rows].split(4)).backward()
        ref = {n: p.grad for n, p in at.named_parameters() if p.grad is not None}
        assert _max_diff(grab.grads[i], ref, ref.keys()) < 1e-6
    # the window rule on the same data: another router gradient (f over the whole step's batch)
    window = Grab()
    _fit(Tiny(), DataLoader(data, batch_size=4), 2, [BalancingCallback(), window], max_steps=1)
    assert _max_diff(window.grads[0], grab.grads[0], ROUTER_AND_UPSTREAM) > 1e-3


class WindowSpy(pl.Callback):
    """The window every training micro-batch ran with (runs after the balancing callback)."""

    def __init__(self):
        self.windows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        w = pl_module.moe.router.global_batch_window
        self.windows.append((batch_idx, float(w.scale), float(w.total)) if isinstance(w, GlobalBatchWindow) else w)


def test_the_epochs_shorter_last_window_is_half_the_acc1_gradient_of_its_batch():
    data, grab, spy = _data(24), Grab(), WindowSpy()
    _fit(Tiny(), DataLoader(data, batch_size=8), 2, [BalancingCallback(), spy, grab])
    # 3 batches, accumulation 2: windows [0, 1] (M = 2, 16 tokens) and [2] (M = 1, 8 tokens)
    assert spy.windows == [(0, 2.0, 16.0), (1, 2.0, 16.0), (2, 1.0, 8.0)]
    assert len(grab.grads) == 2
    at = Tiny()
    at.load_state_dict(grab.states[1])  # the parameters of the second step, before it
    x, y = data.tensors
    (hand_loss(at, x[16:], y[16:]) / 2).backward()  # Lightning divides by accumulate_grad_batches=2
    ref = {n: p.grad for n, p in at.named_parameters() if p.grad is not None}
    assert _max_diff(grab.grads[1], ref, ref.keys()) < 1e-6


class Noisy(Dataset):
    """Rows of a tensor dataset; with ``draw``, every item draws from the global torch generator in the main
    process (as data augmentation without workers does) between the micro-batches' forwards."""

    def __init__(self, data, draw):
        self.data, self.draw = data, draw

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        if self.draw:
            x = x + 0.01 * torch.rand(x.shape)
        return x, y


NOISY = {"gate_noise": 0.5, "expert_dropout": 0.3, "fusion": {"ema_decay": 0.5, "mix_alpha": 0.5}}


def test_the_prepass_changes_nothing_a_run_draws_or_keeps():
    """λ = 0, gate noise, expert dropout and Stateful Fusion on: with global_batch (pre-pass before every window)
    and with the Switch loss (no pre-pass) two epochs of 5 batches in windows of 2 end with bitwise the same
    parameters, fusion m and generator state."""
    runs = {}
    for aux in ("global_batch", "switch"):
        module = Tiny(aux_loss=aux, lam=0.0, **NOISY)
        torch.manual_seed(3)
        _fit(module, DataLoader(Noisy(_data(20), draw=False), batch_size=4), 2, [BalancingCallback()], max_epochs=2)
        runs[aux] = (module.state_dict(), torch.get_rng_state())
    (a, rng_a), (b, rng_b) = runs["global_batch"], runs["switch"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["moe.fusion.m"].abs().sum()) > 0
    assert torch.equal(rng_a, rng_b)


def test_random_draws_between_micro_batches_do_not_break_the_window(monkeypatch):
    """Strong gate noise, and items that draw random numbers in the main process between the window's
    forwards: every real forward routes exactly what its pre-pass routed (the loss raises otherwise). Without
    the pre-pass's generator states put in force around the real forwards, the same run raises."""
    def run():
        module = Tiny(gate_noise=4.0, expert_dropout=0.3)
        torch.manual_seed(3)
        _fit(module, DataLoader(Noisy(_data(16), draw=True), batch_size=4), 2, [BalancingCallback(), grab])
        return module

    grab = Grab()
    module = run()
    assert len(grab.grads) == 2 and module.moe.router.global_batch_window is None
    monkeypatch.setattr("rmoe.accumulation.set_rng_state", lambda state, device=None: None)
    with pytest.raises(RuntimeError, match="the routing pre-pass of the same micro-batch routed"):
        run()


class SaveAt(pl.Callback):
    def __init__(self, path, batch_idx):
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


class Inputs(pl.Callback):
    def __init__(self):
        self.x = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.x[(trainer.current_epoch, batch_idx)] = batch[0].clone()


def test_a_checkpoint_inside_a_window_resumes_on_the_same_batches_noise_and_f(tmp_path):
    ckpt = str(tmp_path / "mid.ckpt")

    def loader():
        return resumable_train_loader(_data(40), batch_size=4, seed=0)

    full, seen = Tiny(gate_noise=0.5), Inputs()
    torch.manual_seed(5)
    # accumulation 3: batch 4 is the second micro-batch of the window of batches 3, 4, 5
    _fit(full, loader(), 3, [BalancingCallback(), SaveAt(ckpt, 4), seen], max_epochs=1)
    state = torch.load(ckpt, weights_only=True)
    (window,) = [v["window"] for k, v in state["callbacks"].items() if k.startswith("BalancingCallback")]
    assert (window["epoch"], window["start"], window["size"], window["next"]) == (0, 3, 3, 2)
    assert len(window["pending"]) == 1 and float(window["counts"][0][-1]) == 12.0

    torch.manual_seed(123)  # other random numbers: the checkpoint must bring back those of the window
    resumed, seen_r = Tiny(gate_noise=0.5), Inputs()
    _fit(resumed, loader(), 3, [BalancingCallback(), seen_r], ckpt_path=ckpt, max_epochs=1)
    assert torch.equal(seen_r.x[(0, 5)], seen.x[(0, 5)])  # the read-ahead batch went first
    assert sorted(seen_r.x) == [(0, b) for b in range(5, 10)]
    # batch 5: same parameters (no step since the checkpoint), batch, gate noise and window: the same aux loss
    assert resumed.aux_values[(0, 5)] == full.aux_values[(0, 5)]


def test_resume_inside_a_window_without_its_state_is_refused(tmp_path):
    ckpt = str(tmp_path / "mid.ckpt")
    data = _data(24)
    _fit(Tiny(), DataLoader(data, batch_size=4), 3, [BalancingCallback(), SaveAt(ckpt, 1)])
    with pytest.raises(RuntimeError, match="no routing pre-pass for training batch 2 of epoch 0 .*resumed inside"):
        _fit(Tiny(), DataLoader(data, batch_size=4), 3, [BalancingCallback()], ckpt_path=ckpt)


class NoForward(Tiny):
    """A module without ``training_forward`` (its training_step has the forward inline)."""

    training_forward = None

    def training_step(self, batch, batch_idx):
        h = self.inp(batch[0])
        return F.cross_entropy(self.head(h + self.moe(h)[0]), batch[1]) + self.lam * moe_losses(self)[0]


def test_checks_before_training():
    msg = (r"NoForward has no training_forward\(batch\) with moe.aux_loss='global_batch' and "
           r"trainer.accumulate_grad_batches=2 .*allowed: a module that defines")
    with pytest.raises(ConfigError, match=msg):
        _fit(NoForward(), DataLoader(_data(), batch_size=4), 2, [BalancingCallback()])
    _fit(NoForward(), DataLoader(_data(), batch_size=4), 1, [BalancingCallback()])  # acc 1: no pre-pass needed
    _fit(NoForward(aux_loss="switch"), DataLoader(_data(), batch_size=4), 2, [BalancingCallback()])  # no global_batch
    module = Tiny()
    _fit(module, DataLoader(_data(), batch_size=4), 2, [BalancingCallback()])
    assert module.moe.router.global_batch_window is None  # disarmed after training
