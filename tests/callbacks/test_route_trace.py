"""Route trace of the stability probe and OLMoE's router saturation; the routing/* metrics for the new
routers (loss-free balancing, expert choice) in a real (tiny) Lightning run."""

import csv
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.balancing import BalancingCallback
from callbacks.route_trace import load_route_trace, saturation, write_step
from callbacks.stability import RoutingStabilityCallback
from rmoe import build_moe_layer, moe_losses

ROUTERS = {
    "lossfree": {"router": "lossfree", "initial_experts": 4, "top_k": 2, "router_options": {"bias_update_rate": 0.5}},
    "lossfree_sigmoid_seq": {"router": "lossfree", "initial_experts": 4, "top_k": 2,
                             "router_options": {"score_fn": "sigmoid"}, "aux_loss": "seq_balance"},
    "expert_choice": {"router": "expert_choice", "initial_experts": 4, "capacity_factor": 2.0},
    "topk_global_batch": {"router": "topk", "initial_experts": 4, "top_k": 2, "aux_loss": "global_batch"},
}


class Tiny(pl.LightningModule):
    def __init__(self, moe_kw):
        super().__init__()
        self.moe = build_moe_layer(8, 16, **moe_kw)
        self.head = torch.nn.Linear(8, 3)
        self.lambda_aux = 0.01

    def forward(self, x):
        y, _ = self.moe(x)
        return self.head(x + y)

    def routing_probe(self, batch):
        self(batch[0])

    def training_step(self, batch, batch_idx):
        x, t = batch
        return torch.nn.functional.cross_entropy(self(x), t) + self.lambda_aux * moe_losses(self)[0]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Snapshot(pl.Callback):
    """Router weight and bias after every optimizer step (after the balancing callback, before stability)."""

    def __init__(self):
        self.state = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = pl_module.moe.router
        self.state[trainer.global_step] = (r.weight.detach().clone(), getattr(r, "bias", torch.zeros(4)).clone())


def _fit(tmp_path, module, callbacks, steps):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    trainer = pl.Trainer(max_steps=steps, logger=CSVLogger(str(tmp_path), name="", version=""), callbacks=callbacks,
                         default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(module, DataLoader(data, batch_size=16))
    return trainer


def test_trace_files_hold_the_probe_routing_and_saturation_by_hand(tmp_path):
    torch.manual_seed(0)
    snap = Snapshot()
    cb = RoutingStabilityCallback(log_every_n_steps=1, probe_every_n_steps=2, probe_size=8, plots=False,
                                  route_trace=True)
    _fit(tmp_path, Tiny(ROUTERS["lossfree"]), [BalancingCallback(log=False), snap, cb], steps=6)
    files = sorted(os.listdir(tmp_path / "route_trace"))
    assert files == [f"step_{s:08d}.npz" for s in (1, 2, 4, 6)]
    trace = load_route_trace(str(tmp_path / "route_trace"))
    probe_x = cb.probe_batch[0]
    top1 = {}
    for step in (1, 2, 4, 6):
        w, b = snap.state[step]
        biased = torch.softmax(probe_x @ w.t(), -1) + b  # selection: scores + bias, best first
        want = torch.argsort(biased, dim=-1, descending=True)[:, :2]
        got = trace["moe0"][step]
        assert got.dtype == np.int16 and got.shape == (8, 2)
        assert np.array_equal(got, want.numpy()), step
        top1[step] = want[:, 0].numpy()
    assert any(float(snap.state[s][1].abs().sum()) > 0 for s in (2, 4, 6))  # the bias moved
    sat = saturation(str(tmp_path / "route_trace"))
    for step in (1, 2, 4, 6):
        assert sat["moe0"][step] == pytest.approx(float(np.mean(top1[step] == top1[6])))
    assert sat["moe0"][6] == 1.0


def test_saturation_on_a_written_trace_by_hand(tmp_path):
    d = str(tmp_path / "rt")
    write_step(d, 10, {"moe0": torch.tensor([[0, 1], [2, 3], [1, 0], [3, -1]]), "moe1": torch.tensor([[1], [1]])})
    write_step(d, 20, {"moe0": torch.tensor([[0, 2], [3, 2], [1, 3], [3, -1]]), "moe1": torch.tensor([[0], [1]])})
    write_step(d, 30, {"moe0": torch.tensor([[0, 3], [3, 1], [2, 1], [-1, -1]]), "moe1": torch.tensor([[0], [1]])})
    sat = saturation(d)
    # moe0 top-1 per step: (0,2,1,3), (0,3,1,3), (0,3,2,-1); the final (step 30) is the reference
    assert sat["moe0"] == {10: 0.25, 20: 0.5, 30: 1.0}
    assert sat["moe1"] == {10: 0.5, 20: 1.0, 30: 1.0}
    assert saturation(d, reference_step=20)["moe0"] == {10: 0.75, 20: 1.0, 30: 0.5}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_routing_metrics_for_the_new_routers(tmp_path, name):
    torch.manual_seed(0)
    cb = RoutingStabilityCallback(log_every_n_steps=1, probe_every_n_steps=2, probe_size=16, plots=False)
    _fit(tmp_path, Tiny(ROUTERS[name]), [BalancingCallback(), cb], steps=4)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0])
    for k in ["load_cv", "max_vio", "load_entropy", "dead_experts", "active_experts", "experts_per_token",
              "no_expert_share", "dropped_rate", "router_entropy", "router_confidence", "aux_loss", "z_loss",
              "top1_flip_rate", "jaccard_churn", "last_fluctuation_step"]:
        assert f"routing/moe0/{k}" in header, k
    if name.startswith("lossfree"):
        assert "balancing/moe0/bias_min" in header and "balancing/moe0/bias_max" in header
    per_token = [float(r["routing/moe0/experts_per_token"]) for r in rows if r.get("routing/moe0/experts_per_token")]
    if name == "expert_choice":  # c = max(round(16 * 2 / 4), 4) = 8 tokens per expert: 32 assignments for 16 tokens
        assert per_token and all(v == pytest.approx(2.0) for v in per_token)
        loads = [float(r["routing/moe0/load_cv"]) for r in rows if r.get("routing/moe0/load_cv")]
        assert all(v == 0.0 for v in loads)  # every expert takes exactly c tokens
    else:
        assert per_token and all(v == pytest.approx(2.0) for v in per_token)
