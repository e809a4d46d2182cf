"""MoEModule: loss = task + λ·block_weight·Σaux + z_loss_weight·Σz, λ through set_lambda and saved
once (in the curriculum callback's state), best score, shared hyper-parameter checks."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from callbacks.curriculum import CurriculumCallback
from rmoe import build_moe_layer
from tasks.domainbed.module import DomainBedModule
from tasks.glue.module import GLUEModule
from tasks.run.moe_module import MoEModule


class TinyMoE(MoEModule):
    """One top-1-of-2 MoE layer (Switch loss) and a linear head on 4 features, 2 classes."""

    def __init__(self, block_weight=0.5, z_loss_weight=0.0):
        super().__init__(lr=0.1, weight_decay=0.0, block_weight=block_weight, z_loss_weight=z_loss_weight)
        torch.manual_seed(0)
        self.layer = build_moe_layer(4, 8, router="topk", initial_experts=2, top_k=1)
        self.head = torch.nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        return self.head(self.layer(x)[0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, _, _ = self.moe_loss(F.cross_entropy(self(x), y), self.layer)
        self.seen.append(self.lambda_aux)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.get("lr", 0.1))


def loader(n=4):
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)),
                      batch_size=1)


def test_set_lambda_reaches_the_loss_by_hand():
    module = TinyMoE(block_weight=0.5, z_loss_weight=0.1).eval()  # eval: no gate noise
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    module.set_lambda(0.2)
    task = F.cross_entropy(module(x), y)
    loss, aux, z = module.moe_loss(task, module.layer)
    # by hand from the router weights: logits = x Wᵀ, p = softmax, top-1 e_t
    logits = x @ module.layer.router.weight.t()
    p = torch.softmax(logits, -1)
    f = F.one_hot(p.argmax(-1), 2).float().mean(0)
    aux_hand = 2 * (f * p.mean(0)).sum()  # Switch: E Σ_e f_e P_e
    z_hand = torch.logsumexp(logits, -1).pow(2).mean()  # router z-loss
    assert aux.item() == pytest.approx(aux_hand.item(), rel=1e-5) and aux.item() >= 1.0 - 1e-6
    assert z.item() == pytest.approx(z_hand.item(), rel=1e-5)
    assert loss.item() == pytest.approx((task + 0.2 * 0.5 * aux_hand + 0.1 * z_hand).item(), rel=1e-5)
    assert module.aux_weight == pytest.approx(0.1)  # λ · block_weight, the one place it is computed
    module.set_lambda(0.0)
    assert module.moe_loss(task, module.layer)[0].item() == pytest.approx((task + 0.1 * z_hand).item(), rel=1e-5)


def test_lambda_is_set_only_through_set_lambda():
    module = TinyMoE()
    assert module.lambda_aux == 0.0  # until the curriculum sets it
    module.set_lambda(3)
    assert module.lambda_aux == 3.0
    with pytest.raises(AttributeError):
        module.lambda_aux = 0.5
    for bad in (-0.1, math.nan, math.inf, "0.1", True):
        with pytest.raises(ValueError, match="allowed: a finite number >= 0"):
            module.set_lambda(bad)
    assert module.lambda_aux == 3.0


@pytest.mark.parametrize("key,kwargs,allowed", [
    ("module.lr", {"lr": 0.0}, "> 0"),
    ("module.weight_decay", {"weight_decay": -1e-4}, ">= 0"),
    ("module.block_weight", {"block_weight": True}, ">= 0"),
    ("module.z_loss_weight", {"z_loss_weight": math.nan}, ">= 0"),
])
def test_shared_hparam_checks_name_key_value_and_range(compose_cfg, key, kwargs, allowed):
    """The module's arguments and the composed config are checked by the same code, with the same message."""
    from tasks.run.checks import ConfigError, check_learning_rates

    args = {"lr": 1e-3, "weight_decay": 0.0, "block_weight": 1.0, "z_loss_weight": 0.0, **kwargs}
    value = next(iter(kwargs.values()))
    want = f"invalid config: {key}={value!r}; allowed: a finite number {allowed}"
    with pytest.raises(ConfigError) as err:
        MoEModule(**args)
    assert str(err.value) == want
    cfg = compose_cfg(["task=glue/rte", f"{key}={value}"])
    with pytest.raises(ConfigError) as err:
        check_learning_rates(cfg)
    assert str(err.value) == want


def test_best_score_is_the_running_max_and_a_nan_never_counts():
    module = TinyMoE()
    assert module.update_best_score(math.nan) != module.update_best_score(math.nan)  # no best yet: the score
    got = [module.update_best_score(s) for s in (0.5, 0.25, 0.75, math.nan, 0.625)]
    assert got == [0.5, 0.5, 0.75, 0.75, 0.75]  # values exact in the float32 buffer
    assert float(module.best_score) == 0.75 and "best_score" in module.state_dict()


def test_glue_and_domainbed_modules_share_the_base():
    assert issubclass(GLUEModule, MoEModule) and issubclass(DomainBedModule, MoEModule)
    for cls in (GLUEModule, DomainBedModule):  # the loss and the checkpoint hooks are the base's
        assert "training_step" in vars(cls) and "moe_loss" not in vars(cls)
        assert "on_save_checkpoint" not in vars(cls) and "on_load_checkpoint" not in vars(cls)


def key_paths(obj, path=()):
    """Every key path of a nested dict."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*path, k)
            yield from key_paths(v, (*path, k))


def test_lambda_saved_once_in_the_checkpoint_and_put_back_on_load(tmp_path):
    cb = CurriculumCallback({"mode": "linear_ramp", "lambda_min": 0.0, "lambda_max": 1.0})
    module = TinyMoE()
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader(4))
    assert module.seen == [0.0, 0.25, 0.5, 0.75]  # λ = τ/T, T = 4
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    lam_paths = [p for p in key_paths(saved) if "lambda" in str(p[-1])]
    assert lam_paths == [("callbacks", "CurriculumCallback", "lambda")]
    assert saved["callbacks"]["CurriculumCallback"]["lambda"] == 0.75

    # a fresh module and callback: λ is back on the module once the checkpoint is read (this fit has
    # nothing left to run, so no training step sets it)
    module2 = TinyMoE()
    trainer2 = L.Trainer(max_epochs=1, callbacks=[CurriculumCallback({"mode": "linear_ramp", "lambda_min": 0.0,
                                                                       "lambda_max": 1.0})],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer2.fit(module2, loader(4), ckpt_path=ckpt)
    assert module2.lambda_aux == 0.75 and module2.seen == []


def test_sanity_check_does_not_move_fusion_state_under_update_in_eval():
    """Lightning's sanity-check validation (also run again when a run resumes) is not part of the method:
    with update_in_eval the fusion state m must be untouched when training starts."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from rmoe import build_moe_layer
    from tasks.run.moe_module import MoEModule

    class Tiny(MoEModule):
        def __init__(self):
            super().__init__(lr=1e-3, weight_decay=0.0, block_weight=1.0, z_loss_weight=0.0)
            self.moe = build_moe_layer(4, 8, router="topany", initial_experts=2, max_experts=3, top_k=1,
                                       fusion={"ema_decay": 0.5, "agg": "sum", "update_in_eval": True})

        def training_step(self, batch, i):
            return self.moe(batch[0])[0].pow(2).mean()

        def validation_step(self, batch, i):
            self.moe(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    seen = {}

    class AtTrainStart(L.Callback):
        def on_train_start(self, trainer, module):
            seen["m"] = module.moe.fusion.m.clone()

    module = Tiny()
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(max_epochs=1, num_sanity_val_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[AtTrainStart()])
    trainer.fit(module, data, data)
    assert seen["m"].abs().sum() == 0  # the sanity check's two batches left m alone
    assert module.moe.fusion.m.abs().sum() > 0  # training (and the real validation) moved it
    assert not module.moe.fusion.frozen


def test_global_batch_under_accumulation_needs_the_balancing_callback():
    """Without callbacks.balancing nothing gives the micro-batches the window's f_e: refused before training;
    with it, the module's training_forward runs the pre-pass."""
    from callbacks.balancing import BalancingCallback
    from rmoe import ConfigError

    class GlobalBatch(TinyMoE):
        def __init__(self):
            super().__init__()
            self.layer = build_moe_layer(4, 8, router="topk", initial_experts=2, top_k=1, aux_loss="global_batch")

        def training_forward(self, batch):
            return self(batch[0])

    def fit(callbacks, acc=2):
        L.Trainer(max_epochs=1, accumulate_grad_batches=acc, callbacks=callbacks, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0).fit(GlobalBatch(), loader())

    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=2 with moe.aux_loss='global_batch' and no "
                                          r"callbacks.balancing.BalancingCallback .*allowed: the balancing callback"):
        fit([])
    fit([], acc=1)
    fit([BalancingCallback()])


def test_global_batch_megatron_mode_needs_the_balancing_callback_at_any_accumulation():
    """moe.global_batch_mode=megatron: the running counts must be cleared after every optimizer step (the
    balancing callback does it): refused without it, also without accumulation."""
    from callbacks.balancing import BalancingCallback
    from rmoe import ConfigError

    class Running(TinyMoE):
        def __init__(self):
            super().__init__()
            self.layer = build_moe_layer(4, 8, router="topk", initial_experts=2, top_k=1, aux_loss="global_batch",
                                         global_batch_mode="megatron")

    def fit(callbacks, acc):
        L.Trainer(max_epochs=1, accumulate_grad_batches=acc, callbacks=callbacks, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0).fit(Running(), loader())

    for acc in (1, 2):
        with pytest.raises(ConfigError, match=r"moe.global_batch_mode='megatron' and no "
                                              r"callbacks.balancing.BalancingCallback"):
            fit([], acc)
    fit([BalancingCallback()], 2)  # no training_forward needed: no routing pre-pass
