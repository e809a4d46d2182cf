"""callbacks.balancing in real (tiny) Lightning runs: ``update_bias`` once per optimizer step (gradient
accumulation and the epoch's last partial accumulation included), a no-op without loss-free routers, the
config check on global_batch under accumulation, and an exact resume from a checkpoint written
mid-accumulation (bias and partial counts restored; the resumed run ends with the uninterrupted run's bias).
global_batch under accumulation itself: tests/callbacks/test_global_batch_accumulation.py."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.balancing import BalancingCallback
from rmoe import build_moe_layer, moe_losses
from tasks.run.samplers import resumable_train_loader

U = 0.25


class Tiny(pl.LightningModule):
    def __init__(self, router="lossfree", aux_loss=None, freeze_router=True):
        super().__init__()
        kw = {"router_options": {"bias_update_rate": U}} if router == "lossfree" else {}
        self.moe = build_moe_layer(8, 16, router=router, initial_experts=4, top_k=1, aux_loss=aux_loss, **kw)
        with torch.no_grad():
            torch.manual_seed(5)
            self.moe.router.weight.copy_(torch.randn(4, 8) * 0.5)
            self.moe.router.weight[0] += 0.4  # expert 0 preferred: the bias has work to do
        if freeze_router:  # routing then depends on the inputs and the bias only
            self.moe.router.weight.requires_grad_(False)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.moe(x)
        return self.head(x + y)

    def training_step(self, batch, batch_idx):
        x, t = batch
        return torch.nn.functional.cross_entropy(self(x), t) + 0.01 * moe_losses(self)[0]

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g) + 0.2, torch.randint(0, 3, (n,), generator=g))


def _trainer(tmp_path, callbacks, acc, epochs=2):
    return pl.Trainer(max_epochs=epochs, accumulate_grad_batches=acc, callbacks=callbacks, logger=False,
                      default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0)


class Spy(pl.Callback):
    """Records (epoch, batch_idx) of every bias update: the counts were just reset (runs after the balancing
    callback; a training forward always counts its tokens)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if int(pl_module.moe.router.load_counts.sum()) == 0:
            self.seen.append((trainer.current_epoch, batch_idx))


def test_update_after_every_optimizer_step_including_the_last_partial_accumulation(tmp_path):
    module, cb, spy = Tiny(), BalancingCallback(log=False), Spy()
    # 40 rows / batch 4 = 10 batches, accumulation 3: steps after batches 2, 5, 8 and the partial 9
    trainer = _trainer(tmp_path, [cb, spy], acc=3)
    trainer.fit(module, DataLoader(_data(), batch_size=4))
    assert trainer.global_step == 8 and cb.updates == 8
    assert spy.seen == [(e, b) for e in (0, 1) for b in (2, 5, 8, 9)]
    b = module.moe.router.bias
    assert torch.equal(b / U, torch.round(b / U)) and float(b.abs().max()) <= 8 * U  # steps of ±u
    assert float(b[0]) < 0  # the preferred expert was pushed down
    assert int(module.moe.router.load_counts.sum()) == 0


def test_noop_without_lossfree_router(tmp_path):
    module, cb = Tiny(router="topk", freeze_router=False), BalancingCallback(log=False)
    _trainer(tmp_path, [cb], acc=2, epochs=1).fit(module, DataLoader(_data(), batch_size=4))
    assert cb.updates == 0


def test_tasks_config_check_accepts_global_batch_with_accumulation_and_refuses_other_strategies(compose_cfg):
    from tasks.run.checks import ConfigError as TaskConfigError
    from tasks.run.checks import check_config

    base = ["task=glue/rte", "moe=moe_topk", "moe.aux_loss=global_batch"]
    ok = [compose_cfg(base + extra)
          for extra in ([], ["trainer.accumulate_grad_batches=4"], ["trainer=ddp", "trainer.accumulate_grad_batches=4"],
                        ["+trainer.strategy=ddp_spawn", "trainer.accumulate_grad_batches=2"])]
    bad = compose_cfg(base + ["trainer.accumulate_grad_batches=4", "+trainer.strategy=fsdp"])
    fsdp_acc1 = compose_cfg(base + ["+trainer.strategy=fsdp"])
    # Megatron-Core's running rule needs no routing pre-pass, so no strategy check
    fsdp_megatron = compose_cfg(base + ["trainer.accumulate_grad_batches=4", "+trainer.strategy=fsdp",
                                        "moe.global_batch_mode=megatron"])
    for cfg in ok + [fsdp_acc1, fsdp_megatron]:
        check_config(cfg)
    with pytest.raises(TaskConfigError, match=r"invalid config: trainer.strategy='fsdp' \(the routing pre-pass .*\); "
                                              r"allowed: auto, single_device or a DDP strategy .* with "
                                              r"moe.aux_loss=global_batch and trainer.accumulate_grad_batches=4, or "
                                              r"trainer.accumulate_grad_batches=1"):
        check_config(bad)


class SaveAt(pl.Callback):
    """Writes a checkpoint at the end of training batch ``batch_idx`` of epoch 0 (after the balancing callback)."""

    def __init__(self, path, batch_idx):
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def _loader():
    return resumable_train_loader(_data(), batch_size=4, seed=0, shuffle=False)


def _record_loads(module) -> list:
    """Wrap the router's ``update_bias`` to keep the load of every step it is called for."""
    router, loads = module.moe.router, []
    update = router.update_bias

    def recording():
        loads.append(update().tolist())

    router.update_bias = recording
    return loads


def test_resume_from_a_mid_accumulation_checkpoint_restores_bias_and_counts_exactly(tmp_path):
    ckpt = str(tmp_path / "mid.ckpt")
    full = Tiny()
    full_loads = _record_loads(full)
    w = full.moe.router.weight.detach().clone()
    # accumulation 3: batch 4 is the second micro-batch of step 2 (batches 3, 4, 5)
    _trainer(tmp_path / "a", [BalancingCallback(log=False), SaveAt(ckpt, 4)], acc=3).fit(full, _loader())

    # by hand: step 1 = batches 0..2 with zero bias, then the update; step 2's first two micro-batches
    x = _data().tensors[0]
    probs = torch.softmax(x @ w.t(), -1)
    c1 = torch.bincount(probs[:12].argmax(-1), minlength=4).double()
    bias1 = U * torch.sign(c1.mean() - c1)
    c2 = torch.bincount((probs[12:20] + bias1).argmax(-1), minlength=4)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert torch.equal(state["moe.router.bias"], bias1.float())
    assert torch.equal(state["moe.router.load_counts"], c2) and int(c2.sum()) == 8

    torch.manual_seed(123)  # another init of the head and experts: the checkpoint must bring everything back
    resumed = Tiny()
    resumed_loads = _record_loads(resumed)
    trainer = _trainer(tmp_path / "b", [BalancingCallback(log=False)], acc=3)
    trainer.fit(resumed, _loader(), ckpt_path=ckpt)
    assert trainer.global_step == 8
    # every step's load from step 2 on (step 2: the restored partial counts + batch 5) and the final bias
    assert resumed_loads == full_loads[1:] and sum(full_loads[1]) == 12
    assert torch.equal(resumed.moe.router.bias, full.moe.router.bias)
    assert float(full.moe.router.bias.abs().sum()) > 0
