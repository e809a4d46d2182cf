"""The ``done`` record of a run whose numerics callback skipped batches says how many (``skipped_batches``),
so collectors can leave it out: a real Lightning fit with one NaN batch and ``on_fault=skip``."""

import json

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.numerics import NumericalFaultCallback
from tasks.job import _skipped_batches
from tasks.results.records import scan
from tasks.run import jobs


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, t = batch
        return torch.nn.functional.cross_entropy(self.lin(x), t)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_done_records_the_skipped_batches_and_scan_leaves_the_run_out(tmp_path):
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    x[9, 0] = float("nan")  # batch 1 of 3 (batch size 8): its loss is NaN
    data = DataLoader(TensorDataset(x, torch.zeros(24, dtype=torch.long)), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, callbacks=[NumericalFaultCallback("skip")], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(Linear(), data)
    assert _skipped_batches(trainer) == 1
    run = tmp_path / "run"
    jobs.mark_done(run, {"val/score": 0.5}, None, skipped_batches=_skipped_batches(trainer))
    assert json.loads((run / "done").read_text())["skipped_batches"] == 1
    (run / "summary.json").write_text(json.dumps({"benchmark": "glue", "task": "cola", "variant": "rmoe"}))
    s = scan(str(tmp_path))
    assert s.skipped_batches == ["run"] and s.runs == []
    assert [r.rel for r in scan(str(tmp_path), include_skipped=True).runs] == ["run"]
