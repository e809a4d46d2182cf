"""W&B (offline): every train(cfg) finishes its run, so consecutive jobs (a multirun) get distinct runs."""

import os

import pytest

from tasks.job import train

wandb = pytest.importorskip("wandb")


@pytest.mark.slow  # ~12-35 s: two tiny runs, W&B starts a run twice
def test_each_job_finishes_its_wandb_run(compose_cfg, tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    ids = []
    for i in range(2):
        overrides = ["task=glue/cola", "backbone=tiny_bert", "debug=fast", "logger=csv_wandb",
                     "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
        cfg = compose_cfg(overrides, output_dir=tmp_path / f"job{i}")
        _, obj = train(cfg)
        assert wandb.run is None  # finished at the end of the job
        wb = [lg for lg in obj["logger"] if type(lg).__name__ == "WandbLogger"][0]
        ids.append(wb.version)
        assert os.path.isfile(tmp_path / f"job{i}" / "metrics.csv")  # the CSV logger ran alongside
        runs = list((tmp_path / f"job{i}" / "wandb").glob(f"offline-run-*-{wb.version}"))
        assert len(runs) == 1
        # each job prints the sync command of its own offline run
        assert f"upload it with: wandb sync {runs[0]}" in capsys.readouterr().out
    assert ids[0] != ids[1]
