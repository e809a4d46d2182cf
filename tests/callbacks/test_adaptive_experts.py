"""AdaptiveExpertsCallback: when the DynMoE pool records and adapts (SPEC §1 schedules)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.adaptive_experts import AdaptiveExpertsCallback
from rmoe import build_moe_layer

E0, E2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 1.0, 0])


class OneLayer(L.LightningModule):
    """One top-any MoE layer (2 of 4 slots active) whose router sends +e0 to expert 0 only,
    −e0 to expert 1 only, and e2 to no expert (cosine 0 -> score 0.5, not above σ(0) = 0.5)."""

    def __init__(self):
        super().__init__()
        self.moe = build_moe_layer(4, 8, router="topany", initial_experts=2, max_experts=4, top_k=1)
        with torch.no_grad():
            w = torch.zeros(4, 4)
            w[0, 0], w[0, 1], w[1, 2], w[3, 3] = 1.0, -1.0, 1.0, 1.0
            self.moe.router.weight.copy_(w)
        self.masks = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        y, _ = self.moe(x)
        return y.sum() * 0.0 + self.moe.router.weight.sum() * 0.0

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.masks.append(self.moe.router.expert_mask.tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(cb, xs, accumulate=1):
    module = OneLayer()
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        accumulate_grad_batches=accumulate)
    trainer.fit(module, DataLoader(TensorDataset(torch.stack(xs)), batch_size=1))
    return module


def test_window_arithmetic():
    # record batches n//2 .. 3n//4, both ends included (DynMoE's GLUE script)
    assert AdaptiveExpertsCallback.window(8) == (4, 7)
    assert AdaptiveExpertsCallback.window(100) == (50, 76)
    assert AdaptiveExpertsCallback.window(4) == (2, 4)
    assert AdaptiveExpertsCallback.window(2) == (1, 2)
    assert AdaptiveExpertsCallback.window(1) == (0, 1)


def test_epoch_mode_records_third_quarter_then_adapts():
    # batches 0-3 route to expert 1 only (outside the window: not counted); 4, 5 and 6 (the window,
    # 8//2 .. 3*8//4 inclusive) send two tokens to expert 0 and one to no expert; 7 comes after the update
    xs = [-E0] * 4 + [E0, E2, E0] + [-E0]
    cb = AdaptiveExpertsCallback(mode="epoch")
    module = fit(cb, xs)
    initial = [True, True, False, False]
    assert module.masks[:6] == [initial] * 6  # nothing changes before the end of batch 6
    # expert 1 got no token in the window -> removed; the unrouted token opens the first free slot (1)
    # with W[:, 1] = normalize(sum of unrouted x) = e2 and threshold 0
    assert module.masks[6] == [True, True, False, False]
    assert cb.updates == [{"step": 7, "router": 0, "removed": [1], "added": [1]}]
    assert torch.allclose(module.moe.router.weight[:, 1], E2)
    assert float(module.moe.router.thresholds[1]) == 0.0
    assert module.masks[7:] == [initial] and not bool(module.moe.router.recording)


def test_epoch_mode_window_includes_batch_3n_over_4():
    # the only token that uses expert 1 arrives at batch 6 = 3*8//4: inside the window, so expert 1 stays
    xs = [E0] * 6 + [-E0] + [E0]
    cb = AdaptiveExpertsCallback(mode="epoch")
    fit(cb, xs)
    assert cb.updates == [{"step": 7, "router": 0, "removed": [], "added": []}]


def test_epoch_mode_without_unrouted_tokens_only_removes():
    xs = [E0] * 8  # expert 1 never used in the window, no unrouted token
    cb = AdaptiveExpertsCallback(mode="epoch")
    module = fit(cb, xs)
    assert module.masks[6] == [True, False, False, False]
    assert cb.updates == [{"step": 7, "router": 0, "removed": [1], "added": []}]


def test_every_step_mode_adapts_after_each_optimizer_step():
    xs = [E0, E2, -E0, E0]
    cb = AdaptiveExpertsCallback(mode="every_step")
    module = fit(cb, xs, accumulate=2)
    # step 1 (batches 0-1): expert 1 unused -> removed; e2 unrouted -> slot 1 reopened with W = e2
    # step 2 (batches 2-3): −e0 now scores 0.5 on slot 1 (cos 0) and 0 on slot 0 -> expert 0 serves +e0 only,
    # slot 1 (now e2) serves nobody -> removed; −e0 unrouted -> slot 1 reopened with W = −e0
    assert [u["step"] for u in cb.updates] == [1, 2]
    assert cb.updates[0]["removed"] == [1] and cb.updates[0]["added"] == [1]
    assert cb.updates[1]["removed"] == [1] and cb.updates[1]["added"] == [1]
    assert torch.allclose(module.moe.router.weight[:, 1], -E0)
    assert module.masks == [[True, True, False, False]] * 4


def test_noop_without_topany_and_bad_mode():
    class Plain(OneLayer):
        def __init__(self):
            super().__init__()
            self.moe = build_moe_layer(4, 8, router="topk", initial_experts=2, top_k=1)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            pass

    cb = AdaptiveExpertsCallback()
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Plain(), DataLoader(TensorDataset(torch.stack([E0] * 4)), batch_size=1))
    assert cb.updates == []
    with pytest.raises(ValueError, match="allowed: epoch\\|every_step"):
        AdaptiveExpertsCallback(mode="weekly")
