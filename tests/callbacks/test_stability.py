"""The routing-stability callback in a real (tiny) Lightning run: keys in metrics.csv, probe
fluctuation against a hand computation, plots are valid PNGs, state survives a checkpoint."""

import csv
import glob
import os

import lightning.pytorch as pl
import matplotlib.image as mpimg
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.stability import RoutingStabilityCallback
from rmoe import build_moe_layer, moe_losses


class TinyMoEClassifier(pl.LightningModule):
    def __init__(self, router="topk", fusion=None, lr=0.5):
        super().__init__()
        kw = {"router": router, "initial_experts": 4, "top_k": 2, "fusion": fusion}
        if router == "topany":
            kw.update(max_experts=6, top_k=1)
        self.moe = build_moe_layer(8, 16, **kw)
        self.head = torch.nn.Linear(8, 3)
        self.lambda_aux = 0.01
        self.lr = lr

    def forward(self, x):
        y, _ = self.moe(x)
        return self.head(x + y)

    def routing_probe(self, batch):
        self(batch[0])

    def training_step(self, batch, batch_idx):
        x, t = batch
        loss = torch.nn.functional.cross_entropy(self(x), t) + self.lambda_aux * moe_losses(self)[0]
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, t = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self(x), t))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=16)


class Snapshot(pl.Callback):
    """Keeps the router weight after every optimizer step (runs before the stability callback)."""

    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = pl_module.moe.router.weight.detach().clone()


def _fit(tmp_path, module, callbacks, steps=6, val=None):
    trainer = pl.Trainer(max_steps=steps, logger=CSVLogger(str(tmp_path), name="", version=""),
                         callbacks=callbacks, default_root_dir=str(tmp_path), enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
                         limit_val_batches=2, val_check_interval=3, enable_checkpointing=False)
    trainer.fit(module, _loader(), val)
    return trainer


def _rows(tmp_path):
    with open(os.path.join(tmp_path, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_probe_flip_rate_matches_router_weights_by_hand(tmp_path):
    torch.manual_seed(0)
    snap = Snapshot()
    cb = RoutingStabilityCallback(log_every_n_steps=1, probe_every_n_steps=1, probe_size=16)
    _fit(tmp_path, TinyMoEClassifier(), [snap, cb], steps=4)
    probe_x = cb.probe_batch[0]
    top1 = {s: (probe_x @ w.t()).argmax(-1) for s, w in snap.weights.items()}
    rows = [r for r in _rows(tmp_path) if r.get("routing/moe0/top1_flip_rate")]
    assert rows, "flip rate never logged"
    for r in rows:
        s = int(r["step"]) + 1  # Lightning writes metrics logged after optimizer step s at row s - 1
        expected = float((top1[s] != top1[s - 1]).double().mean())
        assert float(r["routing/moe0/top1_flip_rate"]) == pytest.approx(expected)
    assert torch.equal(cb.prev_top1["moe0"], top1[4])


class BiasSnapshot(pl.Callback):
    """Keeps the loss-free router's bias after every optimizer step (after the balancing callback's update,
    before the stability callback's probe)."""

    def __init__(self):
        self.bias = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.bias[trainer.global_step] = pl_module.moe.router.bias.detach().clone()


def test_probe_flip_rate_of_the_lossfree_router_counts_its_biased_selection(tmp_path):
    """The loss-free router selects by s + b: with its weights frozen only the bias moves, so the top-1 of the
    unbiased scores never changes while the selected expert does."""
    from callbacks.balancing import BalancingCallback

    torch.manual_seed(0)
    module = TinyMoEClassifier(router="lossfree")
    module.moe = build_moe_layer(8, 16, router="lossfree", initial_experts=4, top_k=2,
                                 router_options={"bias_update_rate": 0.02})
    module.moe.router.weight.requires_grad_(False)
    w = module.moe.router.weight.detach().clone()
    snap = BiasSnapshot()
    cb = RoutingStabilityCallback(log_every_n_steps=1, probe_every_n_steps=1, probe_size=16)
    _fit(tmp_path, module, [BalancingCallback(log=False), snap, cb], steps=4)
    probe_x = cb.probe_batch[0]
    scores = torch.softmax(probe_x @ w.t(), -1)
    top1 = {s: (scores + b).argmax(-1) for s, b in snap.bias.items()}
    rows = [r for r in _rows(tmp_path) if r.get("routing/moe0/top1_flip_rate")]
    assert rows, "flip rate never logged"
    expected = []
    for r in rows:
        s = int(r["step"]) + 1  # Lightning writes metrics logged after optimizer step s at row s - 1
        expected.append(float((top1[s] != top1[s - 1]).double().mean()))
        assert float(r["routing/moe0/top1_flip_rate"]) == pytest.approx(expected[-1])
    assert max(expected) > 0  # the selection moved (the unbiased top-1 never does: frozen weights)
    assert torch.equal(cb.prev_top1["moe0"], top1[4])


def test_keys_in_csv_plots_and_state_roundtrip(tmp_path):
    torch.manual_seed(0)
    cb = RoutingStabilityCallback(log_every_n_steps=1, probe_every_n_steps=2, probe_size=16)
    module = TinyMoEClassifier(router="topany", fusion={"ema_decay": 0.9, "update_in_eval": True})
    _fit(tmp_path, module, [cb], steps=6, val=[_loader(32, 1), _loader(32, 2)])
    header = set(_rows(tmp_path)[0].keys())
    for k in ["load_cv", "max_vio", "load_entropy", "dead_experts", "active_experts", "experts_per_token",
              "no_expert_share", "router_entropy", "router_confidence", "aux_loss", "z_loss", "fusion_entropy",
              "top1_flip_rate", "jaccard_churn", "last_fluctuation_step", "fusion_drift", "val_dead_experts",
              "val_load_cv", "domain_js"]:
        assert f"routing/moe0/{k}" in header, k
    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(tmp_path, "plots", "*.png")))
    for name in ["load_heatmap_moe0.png", "tokens_hist_moe0.png", "lambda.png", "fusion_pi_moe0.png",
                 "fluctuation_moe0.png", "domain_expert_moe0.png"]:
        assert name in pngs
        path = os.path.join(tmp_path, "plots", name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(path).ndim == 3
    state = cb.state_dict()
    cb2 = RoutingStabilityCallback()
    cb2.load_state_dict(torch.load(_save(state, tmp_path), weights_only=False))
    assert torch.equal(cb2.prev_top1["moe0"], cb.prev_top1["moe0"])
    assert cb2.history["step"] == cb.history["step"]


def _save(state, tmp_path):
    p = os.path.join(tmp_path, "cb.pt")
    torch.save(state, p)
    return p


def test_probe_leaves_fusion_state_untouched(tmp_path):
    """With update_in_eval=True a probe forward would move m; the callback restores it, so a run
    with the callback ends with exactly the fusion state of a run without it."""
    results = []
    for cbs in ([], [RoutingStabilityCallback(log_every_n_steps=1, probe_every_n_steps=1, plots=False)]):
        torch.manual_seed(0)
        m = TinyMoEClassifier(router="topk", fusion={"ema_decay": 0.9, "update_in_eval": True})
        _fit(tmp_path / str(len(cbs)), m, cbs, steps=5)
        results.append(m.moe.fusion.m.clone())
    assert torch.equal(results[0], results[1])


def test_a_failed_plot_write_warns_records_and_training_goes_on(tmp_path):
    """A plot folder that cannot be created (a file is in the way: a real OSError, as on a full disk)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    cb = RoutingStabilityCallback(log_every_n_steps=1, probe_every_n_steps=2, probe_size=16,
                                  plot_dir=str(blocker / "plots"))
    with pytest.warns(UserWarning, match=rf"routing plots not written to {blocker / 'plots'} at step 3 \("):
        trainer = _fit(tmp_path, TinyMoEClassifier(), [cb], steps=6, val=[_loader(32, 1)])
    assert trainer.global_step == 6  # the run went on to the end
    assert [e["step"] for e in cb.plot_write_errors] == [3, 6]
    assert all(e["plot_dir"] == str(blocker / "plots") and e["error"].startswith(("FileExistsError", "NotADirectory"))
               for e in cb.plot_write_errors)
