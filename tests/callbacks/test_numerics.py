"""NaN/Inf in a router output or the loss stops the run (naming step and layer) or skips the batch."""

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks.numerics import NumericalFaultCallback, NumericalFaultError
from rmoe import build_moe_layer, moe_losses


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.moe = build_moe_layer(4, 8, router="topk", initial_experts=2, top_k=1)
        self.head = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, t = batch
        y, _ = self.moe(x)
        return torch.nn.functional.cross_entropy(self.head(x + y), t) + 0.01 * moe_losses(self)[0]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _data(bad_batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    x[bad_batch * 8 + 3, 1] = float("nan")  # one NaN token in batch `bad_batch`
    return DataLoader(TensorDataset(x, torch.randint(0, 2, (40,), generator=g)), batch_size=8)


class Keep(pl.Callback):
    def __init__(self):
        self.params = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


def _trainer(tmp_path, cbs):
    return pl.Trainer(max_epochs=1, callbacks=cbs, default_root_dir=str(tmp_path), logger=False,
                      enable_progress_bar=False, enable_model_summary=False)


def test_stop_names_step_and_layer_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_last=True)
    model = Tiny()
    with pytest.raises(NumericalFaultError, match=r"optimizer step 2 .*moe0"):
        _trainer(tmp_path, [NumericalFaultCallback("stop"), ckpt]).fit(model, _data(bad_batch=2))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(os.path.join(tmp_path, "ckpt", "last.ckpt"), weights_only=False)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_skip_leaves_weights_untouched_on_the_bad_batch(tmp_path):
    torch.manual_seed(0)
    keep, num = Keep(), NumericalFaultCallback("skip")
    model = Tiny()
    _trainer(tmp_path, [num, keep]).fit(model, _data(bad_batch=2))
    assert num.skipped == 1
    # step counter advanced over the skipped batch, but the weights did not move
    for a, b in zip(keep.params[2], keep.params[3]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(keep.params[3], keep.params[4]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_option_is_named():
    with pytest.raises(ValueError, match="on_fault='retry'.*stop\\|skip"):
        NumericalFaultCallback("retry")


# --- one test per fault branch: router output, aux loss, loss, gradient; NaN and Inf -----------------
class Faulty(Tiny):
    """Tiny with one non-finite value injected at batch ``at`` into exactly one place the detector
    checks; everything else stays finite (so each branch must catch its own fault)."""

    def __init__(self, where: str, value: float, at: int = 2):
        super().__init__()
        self.where, self.value, self.at = where, value, at

    def training_step(self, batch, batch_idx):
        x, t = batch
        y, _ = self.moe(x)
        loss = torch.nn.functional.cross_entropy(self.head(x + y), t) + 0.01 * moe_losses(self)[0]
        if batch_idx != self.at:
            return loss
        rec = self.moe.last_routing
        if self.where == "router":  # the logged record only: the loss and the gradients stay finite
            logits = rec.router_logits.detach().clone()
            logits[3, 0] = self.value
            self.moe.last_routing = rec.replace(router_logits=logits)
        elif self.where == "aux":
            self.moe.last_routing = rec.replace(aux_loss=torch.tensor(self.value))
        elif self.where == "loss":  # a constant: gradients stay finite
            loss = loss + self.value
        elif self.where == "grad":
            self._hook = self.head.weight.register_hook(lambda g: g + self.value)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if getattr(self, "_hook", None) is not None:  # parameter hooks persist: this batch only
            self._hook.remove()
            self._hook = None


EXPECTED = {"router": "non-finite router output in MoE layer moe0 (moe)",
            "aux": "non-finite aux loss in MoE layer moe0 (moe)",
            "loss": "non-finite loss ({value})",
            "grad": "non-finite gradient in parameter head.weight"}


def _clean_data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g)),
                      batch_size=8)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["router", "aux", "loss", "grad"])
def test_each_fault_branch_stops_before_the_step_naming_it(tmp_path, where, value):
    torch.manual_seed(0)
    keep, model = Keep(), Faulty(where, value)
    with pytest.raises(NumericalFaultError) as e:
        _trainer(tmp_path, [NumericalFaultCallback("stop"), keep]).fit(model, _clean_data())
    msg = str(e.value)
    assert msg.startswith("numerical fault at optimizer step 2 (epoch 0): " + EXPECTED[where].format(value=value)), msg
    # the faulty step was not applied: the weights are those after step 2
    assert all(torch.equal(a, b) for a, b in zip(keep.params[2], model.parameters()))


@pytest.mark.parametrize("where", ["router", "aux", "loss", "grad"])
def test_each_fault_branch_can_skip_the_batch(tmp_path, where):
    torch.manual_seed(0)
    keep, num, model = Keep(), NumericalFaultCallback("skip"), Faulty(where, float("nan"))
    _trainer(tmp_path, [num, keep]).fit(model, _clean_data())
    assert num.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(keep.params[2], keep.params[3]))  # the bad batch: no update
    assert any(not torch.equal(a, b) for a, b in zip(keep.params[3], keep.params[4]))


# --- the fused check: one host sync a step, the slow scan only when it fails -------------------------
@pytest.mark.parametrize("where", ["router", "aux", "loss", "grad", None])
def test_fused_check_agrees_with_the_scan(where):
    """``all_finite`` (one sync) is False exactly when the scan finds a fault, branch by branch."""
    torch.manual_seed(0)
    model, num = Tiny(), NumericalFaultCallback("stop")
    x, t = torch.randn(8, 4), torch.randint(0, 2, (8,))
    y, _ = model.moe(x)
    loss = torch.nn.functional.cross_entropy(model.head(x + y), t)
    loss.backward()
    rec = model.moe.last_routing
    if where == "router":
        logits = rec.router_logits.detach().clone()
        logits[1, 1] = float("nan")
        model.moe.last_routing = rec.replace(router_logits=logits)
    elif where == "aux":
        model.moe.last_routing = rec.replace(aux_loss=torch.tensor(float("inf")))
    elif where == "loss":
        loss = loss + float("nan")
    elif where == "grad":
        model.head.weight.grad[0, 0] = float("-inf")
    assert num.all_finite(model, loss) is (where is None)
    assert (num.find_fault(model, loss) is None) is (where is None)


def test_overflowing_gradient_norm_is_not_a_fault(tmp_path):
    """Finite gradients whose norm overflows fp32 fail the fused check but not the scan: the step is
    applied (no stop, no skip)."""
    torch.manual_seed(0)
    model, num = Tiny(), NumericalFaultCallback("stop")
    for p in model.parameters():
        p.grad = torch.full_like(p, 3e38)
    assert not num.all_finite(model) and num.find_fault(model) is None
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[num])
    num.on_before_optimizer_step(trainer, model, None)  # returns: nothing raised, nothing skipped
    assert num.skipped == 0 and all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
def test_fused_check_syncs_once_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import warnings

    model, num = Tiny().cuda(), NumericalFaultCallback("stop")
    x, t = torch.randn(8, 4, device="cuda"), torch.randint(0, 2, (8,), device="cuda")
    y, _ = model.moe(x)
    loss = torch.nn.functional.cross_entropy(model.head(x + y), t)
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert num.all_finite(model, loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1
